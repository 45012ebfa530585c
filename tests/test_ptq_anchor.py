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
