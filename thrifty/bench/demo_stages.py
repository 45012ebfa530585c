"""Demo stage (last): a short LoadGen benchmark of the demo model, FP32 PyTorch vs int8 ONNX Runtime."""
from __future__ import annotations

from thrifty.demo import DemoContext, demo_stage


@demo_stage(order=90, name="bench")
def bench_stage(ctx: DemoContext) -> dict:
    from thrifty.bench import BenchConfig, Samples, run
    from thrifty.bench.report import markdown_table, plot_results
    from thrifty.data import calibration_subset
    from thrifty.quant import PTQ, quantize
    from thrifty.utils import fmt_acc

    import torch
    from tqdm.auto import tqdm

    test = ctx.splits.test
    x, y = test.tensors
    samples = Samples((x.numpy(),), y.numpy(), "digits32")
    sub = calibration_subset(ctx.splits.train, per_class=10, seed=ctx.seed)
    calib = torch.stack([sub[i][0] for i in range(len(sub))])
    q = quantize(ctx.model, PTQ(w_bits=8, a_bits=8, pipeline="rtn", w_estimator="minmax", a_estimator="minmax"),
                 calib, progress=ctx.progress).model
    s = BenchConfig(min_duration_s=0.5 if ctx.quick else 1.0)
    out = ctx.report_dir / "bench"
    rows = []
    variants = (("fp32_torch", ctx.model, "torch"), ("int8_onnxruntime", q, "onnxruntime"))
    bar = tqdm(variants, desc="bench variants", disable=not ctx.progress, leave=False)
    for var, model, backend in bar:
        bar.set_postfix_str(f"{var}: SingleStream + Offline, {s.min_duration_s} s each")
        rows.append(run(model, s, samples, scenarios=["SingleStream", "Offline"], backend=backend,
                        outdir=out, variant=var, calib=calib))
    plots = plot_results(rows, out)
    res: dict = {}
    for r in rows:
        m = r["accuracy"]["metrics"]
        res[r["variant"]] = {"offline_samples_per_s": round(r["scenarios"]["Offline"]["value"], 1),
                             "singlestream_p90_ms": round(r["scenarios"]["SingleStream"]["value"], 3),
                             "valid": all(v["valid"] for v in r["scenarios"].values()),
                             "top1_loadgen_accuracy_log": m.get("top1"), "bytes": r["artifact_bytes"],
                             # the same model in PyTorch (for int8: the simulated PTQ model the export started from)
                             "top1_pytorch_model": r.get("reference_metrics", {}).get("top1")}
    ratio = res["int8_onnxruntime"]["offline_samples_per_s"] / max(res["fp32_torch"]["offline_samples_per_s"], 1e-9)
    md = (f"MLPerf LoadGen (short run, {s.min_duration_s} s per scenario): int8 ONNX Runtime Offline "
          f"throughput {ratio:.2f}x FP32 PyTorch; top-1 from LoadGen's accuracy log: FP32 "
          f"{fmt_acc(res['fp32_torch']['top1_loadgen_accuracy_log'])}, int8 "
          f"{fmt_acc(res['int8_onnxruntime']['top1_loadgen_accuracy_log'])} (simulated int8 in PyTorch "
          f"{fmt_acc(res['int8_onnxruntime']['top1_pytorch_model'])}).\n\n" + markdown_table(rows))
    return {**res, "int8_vs_fp32_offline": round(ratio, 2), "markdown": md,
            "files": [str(out / "fp32_torch"), str(out / "int8_onnxruntime")] + plots}
