"""Demo stage: quantize the demo model W4A8 with no real data (BNS samples from its own BN statistics)."""
from __future__ import annotations

from thrifty.demo import DemoContext, demo_stage


@demo_stage(order=25, name="datafree")
def datafree_stage(ctx: DemoContext) -> dict:
    from thrifty.datafree import bn_similarity, synthesize
    from thrifty.quant import PTQ, quantize
    from thrifty.train import evaluate
    from thrifty.utils import fmt_acc

    n, steps = (20, 5) if ctx.quick else (100, 60)
    calib = synthesize(ctx.model, n=n, method="bns", input_shape=ctx.splits.input_shape, steps=steps, seed=ctx.seed,
                       batch_size=n, progress=ctx.progress)
    sim_real = bn_similarity(ctx.model, ctx.splits.test)
    sim_bns = bn_similarity(ctx.model, calib)
    iters = dict(adaquant_iters=10, bias_iters=5) if ctx.quick else dict(adaquant_iters=100, bias_iters=50)
    res = quantize(ctx.model, PTQ(w_bits=4, a_bits=8, pipeline="advanced", seed=ctx.seed, **iters),
                   calib.tensors[0], progress=ctx.progress)
    acc = evaluate(res.model, ctx.splits.test)["acc"]
    fp = ctx.results["train"]["test_acc"]
    md = (f"W4A8 advanced PTQ calibrated on {n} BNS samples synthesised from the model alone: "
          f"test acc {fmt_acc(acc)} (FP32 {fmt_acc(fp)}). BN-statistics distance: real test set "
          f"{sim_real:.3f}, BNS samples {sim_bns:.3f}.")
    return {"w4a8_datafree_acc": round(acc, 4), "bn_distance_real": round(sim_real, 4),
            "bn_distance_bns": round(sim_bns, 4), "markdown": md}
