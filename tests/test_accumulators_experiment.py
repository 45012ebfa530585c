"""experiments/accumulators.py: merging a part's results into the existing json keeps the other parts."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import accumulators as acc  # noqa: E402


def test_merge_wide_only_keeps_main_rows_and_key_order():
    old = {"mode": "full", "rows": [1, 2], "seconds": 255.6, "wide": {"rows": ["old"]}}
    new = {"mode": "full", "wide": {"rows": ["new"]}}
    merged = acc.merge_results(old, new, ["wide"])
    assert merged == {"mode": "full", "rows": [1, 2], "seconds": 255.6, "wide": {"rows": ["new"]}}
    assert list(merged) == ["mode", "rows", "seconds", "wide"]


def test_merge_main_only_keeps_wide_and_adds_new_keys():
    old = {"mode": "full", "rows": [1], "wide": {"rows": ["w"]}}
    new = {"mode": "full", "rows": [3], "minilm": {"x": 1}}
    merged = acc.merge_results(old, new, ["main"])
    assert merged == {"mode": "full", "rows": [3], "wide": {"rows": ["w"]}, "minilm": {"x": 1}}


def test_merge_into_empty_file_and_both_parts():
    new = {"mode": "quick", "rows": [1], "wide": {"rows": [2]}}
    assert acc.merge_results({}, new, ["main", "wide"]) == new


def test_unknown_part_is_refused():
    with pytest.raises(ValueError, match="unknown part"):
        acc.merge_results({}, {}, ["wide", "narrow"])


def test_fine_tuned_cell_says_diverged_not_run_or_accuracy():
    assert acc._ft({"ft_ste": None, "ft_ste_diverged": "training diverged: loss is nan"}, "ste") == "diverged"
    assert acc._ft({"bits": 16}, "ste") == "-"
    assert acc._ft({"ft_fine": 0.9388}, "fine") == "93.88"
