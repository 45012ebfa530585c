"""The main job (``thrifty demo`` / ``make demo``): train resnet20 on digits32, evaluate, run every
registered demo stage, write a report folder.

Later features append stages without editing this file: put ``thrifty/<pkg>/demo_stages.py`` with

    from thrifty.demo import DemoContext, demo_stage

    @demo_stage(order=20, name="quantize")
    def quantize_stage(ctx: DemoContext) -> dict:
        ...  # ctx.model is a private copy of the trained model; ctx.splits, ctx.report_dir, ctx.quick, ctx.progress
        return {"test_acc": 0.97, "markdown": "optional text for summary.md"}

Stages run in ``order``; each returns a JSON-able dict that lands in results.json and summary.md
(a ``"markdown"`` entry is inserted verbatim; ``"files"`` lists files it wrote into ``ctx.report_dir``).
The trained model is saved as ``model.safetensors`` + ``model.yaml`` in the report folder (so ``thrifty
quantize --model reports/demo`` starts from it); a stage may save its own model beside it.

Example:
    >>> import tempfile
    >>> results = run_demo(tempfile.mkdtemp(), quick=True, only=["evaluate"], progress=False)  # 4 training steps
    >>> sorted(results["stages"]), results["failed_stages"]
    (['evaluate'], [])

    ``run_demo("reports/demo")`` is the full run (a few minutes on 2 cores).
"""
from __future__ import annotations

import copy
import json
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import TensorDataset

__all__ = ["DemoContext", "demo_stage", "stages", "run_demo", "TARGET_ACC", "TARGET_SECONDS"]

TARGET_ACC, TARGET_SECONDS = 0.95, 180.0
MODEL, DATASET = "resnet20", "digits32"


@dataclass
class DemoContext:
    model: torch.nn.Module  # a private deep copy of the trained FP32 model
    splits: Any  # thrifty.data.Splits
    report_dir: Path
    quick: bool
    seed: int
    results: dict[str, Any] = field(default_factory=dict)  # results of the training and earlier stages
    progress: bool = False  # draw progress bars (thrifty.utils.show_progress decided it)


_STAGES: dict[str, tuple[int, Callable[[DemoContext], dict]]] = {}


def demo_stage(order: int, name: str | None = None) -> Callable:
    """Decorator registering ``fn(ctx: DemoContext) -> dict`` as a demo stage run in ``order``."""

    def deco(fn: Callable[[DemoContext], dict]) -> Callable[[DemoContext], dict]:
        _STAGES[name or fn.__name__] = (int(order), fn)
        return fn

    return deco


def stages(discover: bool = True) -> list[tuple[str, int, Callable]]:
    """Registered stages sorted by (order, name), after importing every ``thrifty.<pkg>.demo_stages``."""
    if discover:
        from thrifty.train.options import discover_plugins

        discover_plugins("demo_stages")
    return sorted(((n, o, f) for n, (o, f) in _STAGES.items()), key=lambda t: (t[1], t[0]))


@demo_stage(order=0, name="evaluate")
def _evaluate_stage(ctx: DemoContext) -> dict:
    from thrifty.models import count_params, model_size_bytes
    from thrifty.train import evaluate

    t0 = time.perf_counter()
    ev = evaluate(ctx.model, ctx.splits.test)
    seconds = time.perf_counter() - t0
    return {"test_acc": ev["acc"], "test_loss": ev["loss"], "test_samples": ev["n"],
            "eval_seconds": round(seconds, 3), "params": count_params(ctx.model),
            "size_bytes": model_size_bytes(ctx.model)}


def _plot(history: Any, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(range(1, len(history.losses) + 1), history.losses, lw=1)
    ax[0].set(xlabel="step", ylabel="training loss", yscale="log", title="training loss")
    recs = [r for r in history.records if "test_acc" in r]
    ax[1].plot([r["step"] for r in recs], [100 * r["test_acc"] for r in recs], "o-", label="test")
    ax[1].plot([r["step"] for r in recs], [100 * r["train_acc"] for r in recs], "s--", label="train (running)")
    ax[1].axhline(100 * TARGET_ACC, color="gray", ls=":", label=f"target {100 * TARGET_ACC:.0f}%")
    ax[1].set(xlabel="step", ylabel="accuracy (%)", title=f"{MODEL} on {DATASET}")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary(results: dict) -> str:
    from thrifty.utils import fmt_acc, fmt_value

    tr = results["train"]
    ok_acc = tr["test_acc"] >= TARGET_ACC
    ok_time = results["total_seconds"] < TARGET_SECONDS
    quick = " (a --quick smoke run: the targets are for the full run)" if results["env"].get("quick") else ""
    lines = [f"# thrifty demo: {MODEL} on {DATASET}", "",
             f"- test accuracy **{fmt_acc(tr['test_acc'])}** (target >= {fmt_acc(TARGET_ACC)}: "
             f"{'met' if ok_acc else 'NOT met'}), {tr['steps']} steps in {tr['train_seconds']:.1f} s "
             f"on {results['env']['threads']} threads",
             f"- whole demo: {results['total_seconds']:.1f} s (target < {TARGET_SECONDS:.0f} s: "
             f"{'met' if ok_time else 'NOT met'}){quick}",
             f"- trained model: `{results['train'].get('saved', 'model.safetensors')}` (+ `.yaml`; `thrifty eval`, "
             "`quantize`, `sparsify` and `bench` take this folder as `--model`)",
             "", "## Training curve", "", "![training curve](training_curve.png)", "",
             "| epoch | step | lr | train loss | test acc (%) |", "|---|---|---|---|---|"]
    for r in results["history"]["records"]:
        lines.append(f"| {r['epoch']:g} | {r['step']} | {r['lr']:.4f} | {r['train_loss']:.4f} | "
                     f"{fmt_acc(r.get('test_acc', float('nan')))[:-1]} |")
    for name, res in results["stages"].items():
        lines += ["", f"## Stage: {name}", ""]
        if "error" in res:
            lines.append(f"**failed**: `{res['error']}`")
            continue
        if res.get("markdown"):
            lines += [res["markdown"], ""]
        scalars = {k: v for k, v in res.items() if k not in ("markdown", "files") and not isinstance(v, (dict, list))}
        if scalars:
            lines += ["| key | value |", "|---|---|"] + [f"| {k} | {fmt_value(k, v)} |" for k, v in scalars.items()]
    return "\n".join(lines) + "\n"


def run_demo(out: str | Path = "reports/demo", *, quick: bool = False, seed: int = 0, epochs: float | None = None,
             only: list[str] | None = None, progress: bool = True, config: dict | None = None) -> dict[str, Any]:
    """Train, evaluate, run stages, write ``results.json``, ``summary.md``, ``training_curve.png``, ``config.yaml``.

    ``quick`` trains a few steps on a subset (smoke test); ``only`` restricts the stages by name."""
    import dataclasses

    from thrifty.cli._common import write_resolved_config
    from thrifty.core import to_dict
    from thrifty.data import load_dataset
    from thrifty.models import create
    from thrifty.train import fit, model_kwargs_for, recipe, save_model
    from thrifty.utils import atomic_write_text, seed_everything

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = load_dataset(DATASET, seed=0)
    extra_kw, cfg = recipe(MODEL, DATASET)
    cfg = dataclasses.replace(cfg, seed=seed, **({"epochs": epochs} if epochs else {}))
    if quick:  # smoke test: a few steps, a slice of the test set
        cfg = cfg.replace(optim={"steps": 4, "batch_size": 32})
        splits = dataclasses.replace(splits, test=TensorDataset(*(t[:128] for t in splits.test.tensors)))
    kwargs = model_kwargs_for(MODEL, splits.input_shape, splits.num_classes, **extra_kw)
    seed_everything(seed)
    model = create(MODEL, **kwargs)
    print(f"[demo] training {MODEL} on {DATASET} ({len(splits.train)} train / {len(splits.test)} test images)",
          file=sys.stderr, flush=True)
    hist = fit(model, cfg, splits.train, splits.test, progress=progress)
    model.eval()
    results: dict[str, Any] = {
        "train": {"model": MODEL, "model_kwargs": kwargs, "dataset": DATASET, "test_acc": hist.final["test_acc"],
                  "steps": hist.final["step"], "train_seconds": round(hist.seconds, 2), "config": to_dict(cfg)},
        "history": hist.to_dict(), "stages": {},
        "env": {"torch": str(torch.__version__), "python": platform.python_version(),
                "threads": torch.get_num_threads(), "quick": quick},
    }
    print(f"[demo] test accuracy {100 * hist.final['test_acc']:.2f}% after {hist.final['step']} steps "
          f"({hist.seconds:.1f} s)", file=sys.stderr, flush=True)
    saved = save_model(model, out / "model", {"model": MODEL, "model_kwargs": kwargs, "dataset": DATASET,
                                              "seed": seed, "train_config": to_dict(cfg),
                                              "test_acc": hist.final["test_acc"]},
                       provenance={"command": "thrifty demo"})
    results["train"]["saved"] = saved.name
    failed = []
    for name, _, fn in stages():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        print(f"[demo] stage {name} ...", file=sys.stderr, flush=True)
        ctx = DemoContext(copy.deepcopy(model), splits, out, quick, seed, copy.deepcopy(results), progress)
        try:
            res = dict(fn(ctx) or {})
        except Exception as e:  # record and report; the demo exits non-zero after writing the report
            traceback.print_exc()
            res, failed = {"error": f"{type(e).__name__}: {e}"}, failed + [name]
        res["seconds"] = round(time.perf_counter() - t0, 2)
        results["stages"][name] = res
    _plot(hist, out / "training_curve.png")
    results["total_seconds"] = round(time.perf_counter() - t_start, 2)
    results["failed_stages"] = failed
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    atomic_write_text(out / "summary.md", _summary(results))
    write_resolved_config(out, config or {"out": str(out), "quick": quick, "seed": seed, "epochs": epochs,
                                          "only": only})
    return results
