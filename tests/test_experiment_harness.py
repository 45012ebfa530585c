"""thrifty.bench.experiment (the experiment harness) and the scripts under experiments/ and benchmarks/ that use it."""
from __future__ import annotations

import ast
import json
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from thrifty.bench.experiment import HEADER, Experiment, environment, fmt, table

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("experiments/*.py"), *ROOT.glob("benchmarks/*.py")])


@pytest.fixture
def threads():
    """The harness sets torch's threads and seeds every RNG: give them back as they were to the next test."""
    import random

    import numpy as np

    n, states = torch.get_num_threads(), (random.getstate(), np.random.get_state(), torch.get_rng_state())
    yield
    torch.set_num_threads(n)
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


def test_standard_flags_seed_threads_and_paths(tmp_path, threads):
    exp = Experiment("demo", "Demo.", threads=2, seed=3)
    exp.parser.add_argument("--repeats", type=int, default=5)
    args = exp.start(["--out", str(tmp_path), "--threads", "1", "--repeats", "2"])
    assert (args.quick, args.seed, args.threads, args.repeats, args.render) == (False, 3, 1, 2, False)
    assert torch.get_num_threads() == 1
    first = torch.rand(4)
    exp.start(["--out", str(tmp_path), "--threads", "1"])  # seeding again gives the same draws
    assert torch.equal(torch.rand(4), first)
    assert exp.path(".json") == tmp_path / "demo.json"
    exp.start(["--out", str(tmp_path), "--quick", "--name", "demo_1thread"])
    assert exp.stem == "demo_1thread_quick"
    assert exp.path("_loss.png") == tmp_path / "demo_1thread_quick_loss.png"
    assert not list(tmp_path.iterdir())  # nothing is written before the script writes


def test_default_out_is_results(threads):
    args = Experiment("demo").start([])
    assert args.out == Path("results")


@pytest.mark.parametrize("argv", [["--threads", "0"], ["--name", "a/b"], ["--name", ".hidden"], ["--seed", "x"]])
def test_bad_flags_exit_with_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        Experiment("demo").start(argv)
    assert e.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_bad_construction_and_use():
    with pytest.raises(ValueError, match="plain file stem"):
        Experiment("../results/x")
    with pytest.raises(RuntimeError, match="start"):
        Experiment("demo").path(".json")


def test_json_has_result_and_environment(tmp_path, threads):
    exp = Experiment("demo")
    exp.start(["--out", str(tmp_path / "new"), "--threads", "1"])
    p = exp.write_json({"acc": torch.tensor(0.5), "shape": (2, 3), "where": tmp_path})
    data = json.loads(p.read_text())
    assert data["acc"] == 0.5 and data["shape"] == [2, 3] and data["where"] == str(tmp_path)
    env = data["environment"]
    assert env["torch"] == torch.__version__ and env["threads"] == 1 and env["seconds"] >= 0
    assert env["command"].startswith("python ") and env["command"].endswith("--threads 1")
    assert set(environment("x")) <= set(env)


def test_writes_are_atomic(tmp_path, threads, monkeypatch):
    exp = Experiment("demo")
    exp.start(["--out", str(tmp_path)])
    exp.write_json({"v": 1})
    exp.write_markdown("# old\n")

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        exp.write_json({"v": 2})
    with pytest.raises(OSError, match="disk full"):
        exp.write_markdown("# new\n")
    assert json.loads(exp.path(".json").read_text())["v"] == 1
    assert exp.path(".md").read_text() == "# old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json", "demo.md"]  # no temp files left


def test_markdown_carries_the_preregistered_hypotheses(tmp_path, threads):
    exp = Experiment("demo", hypotheses=["  m=4 reaches the baseline in <= 0.6x the steps ", "H2: ties go to m=1"])
    exp.start(["--out", str(tmp_path)])
    text = exp.write_markdown("# Title\n\nBody.\n").read_text()
    assert text == (f"# Title\n\n{HEADER}\n\n- m=4 reaches the baseline in <= 0.6x the steps\n- H2: ties go to m=1\n\n"
                    "Body.\n")
    # without hypotheses the text is written as given (with a final newline)
    plain = Experiment("plain")
    plain.start(["--out", str(tmp_path)])
    assert plain.write_markdown("# T\n\nB").read_text() == "# T\n\nB\n"


def test_run_and_render_from_the_json(tmp_path, threads, capsys):
    calls = []

    def science(args):
        calls.append(args.seed)
        return {"rows": [{"case": "a", "ms": 1.25}], "seed": args.seed}

    def render(res):
        return "# Demo\n\n" + table(res["rows"], digits=1)

    exp = Experiment("demo", hypotheses=["h"])
    assert exp.run(science, render, argv=["--out", str(tmp_path), "--seed", "7"]) == 0
    md = exp.path(".md").read_text()
    assert calls == [7] and "| a | 1.2 |" in md and HEADER in md
    exp.path(".md").unlink()
    again = Experiment("demo", hypotheses=["h"])
    assert again.run(lambda a: pytest.fail("--render must not rerun the science"), render,
                     argv=["--out", str(tmp_path), "--render"]) == 0
    assert again.path(".md").read_text() == md
    with pytest.raises(FileNotFoundError, match="demo_quick.json"):
        Experiment("demo").run(science, render, argv=["--out", str(tmp_path), "--render", "--quick"])


def test_fmt_edge_cases():
    assert fmt(None) == "-"
    assert fmt(True) == "True"
    assert fmt("x") == "x"
    assert fmt(7) == "7" and fmt(7, sign=True) == "+7" and fmt(-7, sign=True) == "-7"
    assert fmt(0.123456, 3) == "0.123" and fmt(0.98145, 2, percent=True) == "98.15"
    assert fmt(1, 1, percent=True) == "100.0"
    assert fmt(0.0, 2, sign=True) == "+0.00" and fmt(-0.25, 1, sign=True) == "-0.2"
    assert fmt(float("nan")) == "nan" and fmt(math.inf, 1) == "inf"


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12), st.integers(0, 6),
       st.booleans())
def test_fmt_rounds_to_the_nearest_shown_decimal(x, digits, percent):
    shown = float(fmt(x, digits, percent=percent))
    exact = 100.0 * x if percent else x
    # at most half a unit in the last shown place, plus the double rounding of the value itself
    assert abs(shown - exact) <= 0.5 * 10.0 ** -digits + 4 * math.ulp(exact)


@given(st.lists(st.dictionaries(st.sampled_from("abc"), st.one_of(st.none(), st.integers(), st.floats()),
                                min_size=3, max_size=3), min_size=1, max_size=5))
def test_table_has_one_line_per_row_and_one_cell_per_column(rows):
    lines = table(rows).splitlines()
    assert len(lines) == len(rows) + 2
    assert all(line.count("|") == 4 for line in lines)


def test_table_columns_digits_formats_align():
    rows = [{"a": "x", "b": 0.5, "c": 3}, {"a": "y", "b": None, "c": 12}]
    assert table(rows) == "| a | b | c |\n|---|---|---|\n| x | 0.50 | 3 |\n| y | - | 12 |\n"
    out = table(rows, {"c": "count", "a": "name"}, formats={"c": lambda v: f"{v}x"}, align="rl")
    assert out == "| count | name |\n|---:|---|\n| 3x | x |\n| 12x | y |\n"
    assert "| 0.5000 |" in table(rows, ["b"], digits={"b": 4})
    with pytest.raises(ValueError, match="no rows"):
        table([])
    with pytest.raises(ValueError, match="align"):
        table(rows, align="lr")


# --------------------------------------------------------------------------------------- the scripts themselves
def _tree(path: Path) -> ast.AST:
    return ast.parse(path.read_text(), filename=str(path))


def _results_path_uses(tree: ast.AST) -> list[int]:
    """Lines that build a path into results/ in code: ``x / "results"``, ``Path("results/...")``, ``open(...)``."""
    def is_results(node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and isinstance(node.value, str) and (
            node.value == "results" or node.value.startswith("results/"))

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and (is_results(node.left)
                                                                          or is_results(node.right)):
            lines.append(node.lineno)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                "Path", "open", "read_text", "read_bytes", "load", "loads") and any(map(is_results, node.args)):
            lines.append(node.lineno)
    return lines


def test_the_script_scan_catches_what_it_forbids():
    bad = ast.parse('p = ROOT / "results" / "ptq.json"\nq = Path("results/ptq.json")\nopen("results/x.md")\n')
    assert sorted(_results_path_uses(bad)) == [1, 2, 3]
    ok = ast.parse('"""reads results/ptq.json"""\nlabel = out.get("ptq_json", "results/ptq.json")\n')
    assert _results_path_uses(ok) == []


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_scripts_hold_no_sys_path_edits_nor_implicit_results_reads(script):
    tree = _tree(script)
    sys_path = [n.lineno for n in ast.walk(tree)
                if isinstance(n, ast.Attribute) and n.attr == "path" and getattr(n.value, "id", None) == "sys"]
    assert not sys_path, f"{script.name}: sys.path edited at line(s) {sys_path}; import thrifty as installed"
    assert not _results_path_uses(tree), (f"{script.name}: builds a results/ path at line(s) "
                                          f"{_results_path_uses(tree)}; take it as an argument (--out, --...-json)")


@pytest.mark.parametrize("script", [s for s in SCRIPTS if "__main__" in s.read_text()],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_script_runs_on_the_harness(script):
    text = script.read_text()
    assert "Experiment(" in text, f"{script.name}: use thrifty.bench.experiment.Experiment for flags and outputs"
    assert "argparse" not in text and "atomic_write_text(out" not in text


# every committed results/<stem>.md is what its script renders from results/<stem>.json: the numbers in the docs
# come from the JSON, and a change of a script's formatting shows up here until the markdown is re-rendered
RENDERED = [("benchmarks/accumulators.py", "bench_accumulators", []), ("benchmarks/bench_int8.py", "bench_int8", []),
            ("benchmarks/blockwise_memory.py", "blockwise_memory", []),
            ("benchmarks/datafree.py", "bench_datafree", []), ("benchmarks/grad_sparsity.py", "bench_grad_sparsity", []),
            ("benchmarks/nm_masks.py", "bench_nm_masks", []),
            ("benchmarks/nm_masks.py", "bench_nm_masks_1thread", ["--name", "bench_nm_masks_1thread"]),
            ("benchmarks/ptq_anchor.py", "ptq_anchor", []),
            ("benchmarks/ptq_anchor.py", "ptq_anchor_quick", ["--quick"]), ("benchmarks/train8.py", "bench_train8", []),
            ("experiments/accumulators.py", "accumulators", []), ("experiments/bench.py", "bench", []),
            ("experiments/causal_lm.py", "causal_lm", []),
            ("experiments/causal_lm.py", "causal_lm_quick", ["--quick"]),
            ("experiments/compose.py", "compose", []), ("experiments/coverage_matrix.py", "coverage_matrix", []),
            ("experiments/datafree.py", "datafree", []),
            ("experiments/grad_sparsity.py", "grad_sparsity", []), ("experiments/merge.py", "merge", []),
            ("experiments/minilm_nm.py", "minilm_nm", []),
            ("experiments/nm_masks.py", "nm_masks", []), ("experiments/plan.py", "plan_quick", ["--quick"]),
            ("experiments/plan.py", "plan_resnet20-digits32", ["--only", "resnet20-digits32"]),
            ("experiments/plan.py", "plan_minilm-text", ["--only", "minilm-text"]),
            ("experiments/plan.py", "plan_tinyllama-lm", ["--only", "tinyllama-lm"]),
            ("experiments/ptq.py", "ptq", []),
            ("experiments/ptq_ablation.py", "ptq_ablation", []),
            ("experiments/ptq_ablation.py", "ptq_ablation_steps", ["--name", "ptq_ablation_steps"]),
            ("experiments/ptq_lm_ablation.py", "ptq_lm_ablation", []),
            ("experiments/ptq_lm_ablation.py", "ptq_lm_ablation_quick", ["--quick"]), ("experiments/regimes.py", "regimes", []),
            ("experiments/regimes.py", "regimes_quick", ["--quick"]), ("experiments/train8.py", "train8", [])]


def _script_module(rel: str):
    import importlib.util
    import sys

    path = ROOT / rel
    sys.path.insert(0, str(path.parent))  # as when the script runs: its folder first (regimes imports its sibling)
    try:
        spec = importlib.util.spec_from_file_location(f"_script_{path.parent.name}_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(path.parent))
    return mod


@pytest.mark.parametrize("rel,stem,extra", RENDERED, ids=[f"{r[1]}" for r in RENDERED])
def test_committed_markdown_is_the_render_of_the_committed_json(rel, stem, extra, tmp_path, monkeypatch, threads):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: None)  # plots: not compared
    (tmp_path / f"{stem}.json").write_bytes((ROOT / "results" / f"{stem}.json").read_bytes())
    assert _script_module(rel).main(["--render", "--out", str(tmp_path), *extra]) == 0
    assert (tmp_path / f"{stem}.md").read_text() == (ROOT / "results" / f"{stem}.md").read_text(), (
        f"results/{stem}.md is not what {rel} renders from results/{stem}.json: re-render it with "
        f"`python {rel} --render {' '.join(extra)}` (numbers come from the JSON only)")


def test_regimes_mixed_size_recipe_builds_from_the_recipe():
    # part b rebuilt its TrainConfig from to_dict(), whose "version" key TrainConfig does not take (TypeError)
    from thrifty.train import recipe

    regimes = _script_module("experiments/regimes.py")
    cfg = regimes.mixed_size_config(recipe("resnet20", "digits32")[1], 20, True)
    assert (cfg.optim.steps, cfg.optim.batch_size, cfg.optim.lr, cfg.eval_steps) == (20, 16, 0.05, 10)
    assert cfg.optimizer == recipe("resnet20", "digits32")[1].optimizer


def test_regimes_flops_per_image_counts_conv_macs():
    regimes = _script_module("experiments/regimes.py")
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1))
    assert regimes.flops_per_image(conv, 8) == 2 * (2 * 8 * 8) * 1 * 3 * 3  # 2 x outputs x (in x k x k) MACs


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_scripts_use_no_undefined_name(script):
    # the scripts' long paths (--merge, part b) run only in full runs: a name lost from the imports shows up here
    api = pytest.importorskip("pyflakes.api")
    from pyflakes import messages, reporter

    found = []

    class Collect(reporter.Reporter):
        def __init__(self):
            super().__init__(None, None)

        def flake(self, message):
            if isinstance(message, messages.UndefinedName):
                found.append(str(message))

        def syntaxError(self, *args):  # noqa: N802 (pyflakes' name)
            found.append(f"syntax error {args}")

    api.check(script.read_text(), str(script), Collect())
    assert not found
