"""experiments/coverage_matrix.py: a fast slice of the architecture x method matrix, and how cells report."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

_PATH = Path(__file__).resolve().parents[1] / "experiments" / "coverage_matrix.py"
sys.path.insert(0, str(_PATH.parent))  # as when the script runs: it imports its sibling coverage_cells
_spec = importlib.util.spec_from_file_location("coverage_matrix", _PATH)
cov = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cov)
cells = cov.coverage_cells


@pytest.mark.parametrize("row", ["BERT", "GPT-2", "mlp (zoo)"])
def test_exact_and_w8a8_cells_pass(row):
    m = cov.run_matrix([row], ["exact", "W8A8"], n_calib=4, n_test=4, progress=False)
    for col, cell in m[row].items():
        assert cell["status"] == "ok", (row, col, cell)
    wrapped, total = m[row]["exact"]["detail"].split()[0].split("/")
    assert wrapped == total  # every GEMM these architectures have is wrapped


def test_a_raising_cell_records_the_users_message_not_a_traceback(monkeypatch):
    def broken(arch, calib, test):
        raise ValueError("layer 'fc1': something the user can act on\nsecond line")

    monkeypatch.setitem(cov.CELLS, "broken", broken)
    cell = cov.run_cell(cov.ARCHS["mlp (zoo)"], "broken", None, None)
    assert cell["status"] == "error"
    assert cell["detail"] == "ValueError: layer 'fc1': something the user can act on"


def test_failed_check_and_not_applicable_are_distinguished(monkeypatch):
    monkeypatch.setitem(cov.CELLS, "f", lambda *a: (_ for _ in ()).throw(cov.CellFail("rel. error 0.3 >= 0.1")))
    arch = cov.ARCHS["mlp (zoo)"]
    assert cov.run_cell(arch, "f", None, None)["status"] == "fail"
    bns = cov.run_cell(arch, "BNS", arch.inputs(4, 0), arch.inputs(2, 1))
    assert bns["status"] == "n/a" and "BatchNorm" in bns["detail"]


def test_markdown_has_one_row_per_architecture_and_every_detail():
    m = {"A": {"x": {"status": "ok", "detail": "d1", "seconds": 0.1}, "y": {"status": "error", "detail": "E: m",
                                                                           "seconds": 0.0}}}
    md = cov.to_markdown(m, ["x", "y"])
    assert "| A | ok | error |" in md
    assert "- A / y: **error** - E: m" in md


def test_exact_cell_detects_a_wrapped_layer_that_changes_the_output(monkeypatch):
    real_wrap = cells.wrap

    def bad_wrap(m, name=""):
        w = real_wrap(m, name)
        w.register_forward_hook(lambda mod, i, o: o + 1e-3)
        return w

    monkeypatch.setattr(cells, "wrap", bad_wrap)
    arch = cov.ARCHS["mlp (zoo)"]
    cell = cov.run_cell(arch, "exact", None, arch.inputs(2, 1))
    assert cell["status"] == "fail" and "forward differs" in cell["detail"]


def test_train8_on_transformers_resnet():
    # Range BN's output followed by transformers' ReLU(inplace=True): the backward used to fail ("Output 0 of
    # _RangeBNFunction is a view and is being modified inplace")
    arch = cov.ARCHS["ResNet"]
    cell = cov.run_cell(arch, "Train8", arch.inputs(16, 0), arch.inputs(8, 1))  # the matrix's sizes
    assert cell["status"] == "ok", cell


def test_w8a8_judges_a_unit_norm_embedding_by_cosine():
    class Embed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(16, 8)

        def forward(self, x):
            return torch.nn.functional.normalize(self.fc(x), dim=-1)

    def build():
        torch.manual_seed(0)
        return Embed().eval()

    arch = cov.Arch("unit", build, cov._images(None, (16,)), unit_embedding=True)
    cell = cov.run_cell(arch, "W8A8", arch.inputs(32, 0), arch.inputs(8, 1))
    assert cell["status"] == "ok" and cell["detail"].startswith("mean cosine to FP32"), cell
    cos = float(cell["detail"].split()[4])
    assert cov.W8A8_MIN_COS <= cos <= 1


def test_merge_puts_rerun_cells_in_and_keeps_the_others():
    def cell(status, detail):
        return {"status": status, "detail": detail, "seconds": 1.0}

    old = {"rows": ["BERT", "ResNet"], "cols": ["exact", "W8A8"], "command": "full", "wall_s": 9.0, "threads": 2,
           "matrix": {"BERT": {"exact": cell("ok", "a"), "W8A8": cell("fail", "b")},
                      "ResNet": {"exact": cell("ok", "c"), "W8A8": cell("ok", "d")}},
           "counts": {}, "environment": {"cpu": "x"}}
    update = {"rows": ["BERT"], "cols": ["W8A8"], "command": "rerun", "wall_s": 1.0, "threads": 2, "load": 3.0}
    res = cov._merge(old, {"BERT": {"W8A8": cell("ok", "new")}}, update)
    assert res["matrix"]["BERT"] == {"exact": cell("ok", "a"), "W8A8": cell("ok", "new")}
    assert res["matrix"]["ResNet"] == old["matrix"]["ResNet"] and res["rows"] == ["BERT", "ResNet"]
    assert res["counts"] == {"ok": 4, "fail": 0, "error": 0, "n/a": 0}
    assert res["updates"] == [update] and res["environment_full_run"] == {"cpu": "x"}
    assert "Rerun since, merged into the matrix: BERT x W8A8 with `rerun`" in cov._markdown(res)
    with pytest.raises(ValueError, match="empty cells"):  # a new column must be rerun for every row
        cov._merge(old, {"BERT": {"GradNM": cell("ok", "g")}}, {**update, "cols": ["GradNM"]})
