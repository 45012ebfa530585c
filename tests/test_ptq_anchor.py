"""benchmarks/ptq_anchor.py degrades cleanly when no anchor (Brevitas) is installed: a message and exit 0."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("extra", [[], ["--anchor-python", sys.executable], ["--workload", "minilm"],
                                   ["--workload", "lm", "--anchor-python", sys.executable]])
def test_anchor_benchmark_without_anchor_exits_cleanly(extra, tmp_path):
    pytest.importorskip("torch")
    try:
        import brevitas  # noqa: F401
        pytest.skip("brevitas is installed here: the no-anchor path cannot be exercised")
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k != "THRIFTY_ANCHOR_PYTHON"}
    env["PYTHONPATH"] = str(ROOT)
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ptq_anchor.py"), "--out", str(tmp_path), *extra],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "nothing to compare" in p.stdout
    assert not list(tmp_path.iterdir())  # no half-written results


def test_stub_torchvision_answers_any_attribute(tmp_path):
    """tools/anchor_venv.py's stub: modules, submodules and attributes are placeholders; pip sees a version."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import anchor_venv
    finally:
        sys.path.remove(str(ROOT / "tools"))
    pkg = anchor_venv.write_stub(tmp_path)
    assert (pkg / "__init__.py").exists() and (tmp_path / f"torchvision-{anchor_venv.STUB_VERSION}.dist-info").is_dir()
    code = ("import importlib.metadata as md, torchvision, torchvision.ops.boxes as b\n"
            "from torchvision.models.detection import MaskRCNN\n"
            "assert md.version('torchvision') == torchvision.__version__ == %r\n"
            "assert isinstance(torchvision.transforms.Resize, type) and isinstance(b.nms, type)\n"
            "try:\n    MaskRCNN()\nexcept RuntimeError as e:\n    print('placeholder:', e)\n"
            % anchor_venv.STUB_VERSION)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)}, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "placeholder: stub torchvision: MaskRCNN is a placeholder" in p.stdout


def _nlp():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import ptq_anchor_nlp
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return ptq_anchor_nlp


def test_expand_blocks_repeats_each_group_scale_over_its_group():
    """The per-element grid given to AIMET's AdaRound for a per-group quantizer: block j of row i covers input
    columns [j * g, (j + 1) * g)."""
    torch = pytest.importorskip("torch")
    nlp = _nlp()
    w = torch.zeros(2, 6)
    scale = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # groups of 2
    assert nlp.expand_blocks(scale, w).tolist() == [[1, 1, 2, 2, 3, 3], [4, 4, 5, 5, 6, 6]]
    assert nlp.expand_blocks(torch.tensor([[7.0], [8.0]]), w).tolist() == [[7] * 6, [8] * 6]  # per channel
    with pytest.raises(ValueError, match="not a multiple of 4 blocks"):
        nlp.expand_blocks(torch.ones(2, 4), w)
    with pytest.raises(ValueError, match="does not match weight"):
        nlp.expand_blocks(torch.ones(6), w)


def test_aimet_estimate_scales_loop_and_caching_separately():
    """A 50-iteration run on 16 samples -> 2000 iterations on 64: the loop x 40 (iterations) x 2 (32 samples per
    step instead of 16), the activation caching x 4 (set size), the rest as measured."""
    nlp = _nlp()
    a = dict(layers=29, loop_cpu_s=10.0, sampling_cpu_s=3.0, layer_cpu_s=15.0, iters=50, n_calib=16)
    assert nlp.aimet_estimate(a, cpu_s=100.0, n_full=64) == pytest.approx(100 - 13 + 3 * 4 + 10 * 40 * 2)
    assert nlp.aimet_estimate({**a, "iters": 2000, "n_calib": 64}, cpu_s=100.0, n_full=64) == pytest.approx(100)


def test_nlp_runs_of_different_precisions_merge_into_one_part():
    """``--precision`` runs share one JSON: a run replaces only its own precisions' rows, keeps the others and the
    commands that produced them (a part written before runs were recorded counts as one run)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import ptq_anchor
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    old = dict(rows=[dict(precision="W4A16", ppl=9.3), dict(precision="W4A16 g64", ppl=9.2)], command="old", load=2.0,
               n_calib=16)
    new = dict(rows=[dict(precision="W4A16 g64", ppl=9.1)], n_calib=64,
               runs=[dict(command="new", load=1.0, precisions=["W4A16 g64"])])
    m = ptq_anchor.merge_precisions(old, new)
    assert m["rows"] == [dict(precision="W4A16", ppl=9.3), dict(precision="W4A16 g64", ppl=9.1)]
    assert m["runs"] == [dict(command="old", load=2.0, precisions=["W4A16"]), *new["runs"]] and m["n_calib"] == 64
    assert ptq_anchor.merge_precisions(None, new) is new
    again = ptq_anchor.merge_precisions(m, dict(new, runs=[dict(new["runs"][0], command="newer")]))
    assert [r["command"] for r in again["runs"]] == ["old", "newer"]  # a rerun replaces its precision's run


def test_precision_filter_is_for_the_transformer_workloads(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ptq_anchor.py"), "--out", str(tmp_path),
                        "--precision", "W4A4"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 2 and "--precision applies to --workload minilm / lm" in p.stderr
