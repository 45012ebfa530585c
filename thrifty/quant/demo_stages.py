"""Demo stage: post-training quantization of the trained resnet20 to W4A8 with the advanced pipeline.

The quantized model is saved as ``quantized.safetensors`` + ``quantized.yaml`` in the report folder
(``thrifty.load("reports/demo/quantized")``, ``thrifty eval reports/demo/quantized``)."""
from __future__ import annotations

from thrifty.demo import DemoContext, demo_stage


@demo_stage(order=20, name="quantize")
def quantize_stage(ctx: DemoContext) -> dict:
    import time

    from thrifty.data import calibration_subset
    from thrifty.core.saved import save
    from thrifty.quant import PTQ, quantize
    from thrifty.train import evaluate
    from thrifty.utils import fmt_acc

    calib = calibration_subset(ctx.splits.train, per_class=10, seed=ctx.seed)
    iters = dict(adaquant_iters=10, bias_iters=5) if ctx.quick else dict(adaquant_iters=150, bias_iters=100)
    t0 = time.perf_counter()
    res = quantize(ctx.model, PTQ(w_bits=4, a_bits=8, pipeline="advanced", seed=ctx.seed, **iters), calib,
                   progress=ctx.progress)
    seconds = time.perf_counter() - t0
    acc = evaluate(res.model, ctx.splits.test)["acc"]
    fp = ctx.results["train"]["test_acc"]
    parent = ctx.report_dir / ctx.results["train"].get("saved", "model.safetensors")
    tr = ctx.results["train"]
    path = save(res, ctx.report_dir / "quantized", meta={"model": tr["model"], "model_kwargs": tr["model_kwargs"],
                                                         "dataset": tr["dataset"], "test_acc": acc,
                                                         "fp32_test_acc": fp},
                provenance={"command": "thrifty demo (quantize stage)", "parent": str(parent)})
    md = (f"W4A8 advanced PTQ (AdaQuant + BN tuning + bias tuning, first/last layer 8 bit) on {len(calib)} "
          f"calibration images: test acc {fmt_acc(acc)} vs FP32 {fmt_acc(fp)} "
          f"(size {res.size_fraction:.3f} of FP32, {seconds:.1f} s); saved as `{path.name}`.")
    return {"w4a8_advanced_acc": round(acc, 4), "fp32_acc": round(fp, 4), "size_fraction": round(res.size_fraction, 4),
            "seconds": round(seconds, 1), "markdown": md, "files": [str(path), str(path.with_suffix(".yaml"))]}
