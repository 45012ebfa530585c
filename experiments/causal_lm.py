"""PTQ and N:M sparsity on a causal LM: tinyllama (transformers LlamaForCausalLM, 1.87 M parameters, bytes).

The FP32 model is ``thrifty.train.lm.pretrained_lm()`` (trained once on the stdlib docstring stream and cached);
the metric is the perplexity per byte on the held-out documents (non-overlapping 128-byte windows). Calibration:
64 random 128-byte windows of the training text, given to ``quantize`` as ``{"input_ids": ...}`` batches; the
PTQ loss is the KL divergence of the next-token distributions from FP32's.

Rows: W8A8 RTN; W4A16 (weight-only) per channel and per group of 64 (the reduction of every projection is 192 or
512), RTN vs AdaQuant (layer by layer, sequential: each layer sees the already-quantized prefix's inputs); W4A8
RTN vs AdaQuant; 2:4 on every projection of the decoder layers (the LM head stays dense), magnitude vs
AdaPrune. All layers, the first and last GEMM included, use the row's bit-widths.

Times are wall-clock and CPU seconds of this process (torch uses --threads threads); on a shared machine the
CPU time is the better estimate of the time on an idle one.

    python experiments/causal_lm.py --quick     # CI-sized: fewer windows and optimisation steps
    python experiments/causal_lm.py             # full: writes results/causal_lm.{json,md}
    python experiments/causal_lm.py --render    # rewrite results/causal_lm.md from results/causal_lm.json
"""
from __future__ import annotations

import copy
import time
import warnings

import torch

from thrifty.bench.experiment import Experiment
from thrifty.data.lm import lm_tokens, lm_windows
from thrifty.quant import PTQ, quantize
from thrifty.sparse import NM, adaprune, sparsify
from thrifty.train.lm import LM_SEQ_LEN, perplexity, pretrained_lm

GROUP = 64


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def _calib(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` random training windows (the held-out documents are never seen)."""
    t = lm_tokens("train")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, t.numel() - LM_SEQ_LEN + 1, (n,), generator=g)
    return t[starts[:, None] + torch.arange(LM_SEQ_LEN)]


def _decoder_linears(_m, name: str) -> bool:
    return name.startswith("model.layers.")


def run(quick: bool, log) -> dict:
    (fp, meta), tw, tc = _timed(lambda: pretrained_lm(return_meta=True))
    fp.eval()
    n_test = 32 if quick else None
    test = lm_windows("test", LM_SEQ_LEN, n=n_test)
    calib_ids = _calib(16 if quick else 64)
    calib = [{"input_ids": b} for b in calib_ids.split(32)]
    iters = 20 if quick else 100
    fp_ppl = perplexity(fp, test)
    r: dict = {"model": "tinyllama", "params": sum(p.numel() for p in fp.parameters()),
               "train": {k: meta.get(k) for k in ("train_seconds", "train_cpu_seconds", "final_train_loss", "test_ppl",
                                                 "train_config")},
               "load_seconds": round(tw, 2), "test_windows": int(test.shape[0]), "seq_len": LM_SEQ_LEN,
               "calib_windows": int(calib_ids.shape[0]), "adaquant_iters": iters, "fp32_ppl": fp_ppl, "rows": []}
    log(f"FP32 perplexity {fp_ppl:.4f} on {test.shape[0]} held-out windows")

    def row(name, kind, bits, group, method, make):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "these layers stay in floating point": the embedding and the norms
            model, w, c = _timed(make)
        ppl = perplexity(model, test)
        r["rows"].append({"name": name, "kind": kind, "bits": bits, "group_size": group, "method": method,
                          "ppl": ppl, "rel_ppl": ppl / fp_ppl - 1, "wall_s": round(w, 1), "cpu_s": round(c, 1)})
        log(f"{name:32s} ppl {ppl:8.4f} ({100 * (ppl / fp_ppl - 1):+7.2f} %)  {w:6.1f}s wall {c:6.1f}s cpu")

    def ptq(w_bits, a_bits, pipeline, group=None):
        cfg = PTQ(w_bits=w_bits, a_bits=a_bits, first_last_bits=w_bits, pipeline=pipeline, group_size=group,
                  loss="kl", adaquant_iters=iters, batch_size=32, adaquant_batch=8)
        return lambda: quantize(fp, cfg, calib, progress=False).model

    row("W8A8 RTN", "ptq", "W8A8", None, "rtn", ptq(8, 8, "rtn"))
    for group in (None, GROUP):
        tag = f"g{group}" if group else "per-channel"
        row(f"W4A16 {tag} RTN", "ptq", "W4A16", group, "rtn", ptq(4, None, "rtn", group))
        row(f"W4A16 {tag} AdaQuant", "ptq", "W4A16", group, "adaquant", ptq(4, None, "adaquant", group))
    row("W4A8 RTN", "ptq", "W4A8", None, "rtn", ptq(4, 8, "rtn"))
    row("W4A8 AdaQuant", "ptq", "W4A8", None, "adaquant", ptq(4, 8, "adaquant"))

    def magnitude():
        m = copy.deepcopy(fp)
        return sparsify(m, NM(2, 4), _decoder_linears)

    def ada():
        m = copy.deepcopy(fp)
        adaprune(m, NM(2, 4), calib_ids, filter=_decoder_linears, steps=iters, lr=1e-3, batch_size=8,
                 progress=False)
        return m

    row("2:4 magnitude", "nm", "2:4", None, "magnitude", magnitude)
    row("2:4 AdaPrune", "nm", "2:4", None, "adaprune", ada)
    return r


def _by(r: dict, name: str) -> float:
    return next(x["ppl"] for x in r["rows"] if x["name"] == name)


def _targets(r: dict) -> list[str]:
    fp = r["fp32_ppl"]
    w8 = _by(r, "W8A8 RTN") / fp - 1
    out = [f"W8A8 perplexity within 1 % of FP32: {'yes' if w8 <= 0.01 else 'NO'} ({100 * w8:+.2f} %)"]
    for tag in ("per-channel", f"g{GROUP}"):
        rtn, aq = _by(r, f"W4A16 {tag} RTN"), _by(r, f"W4A16 {tag} AdaQuant")
        gap = rtn - fp
        closed = (rtn - aq) / gap if gap > 0 else float("nan")
        out.append(f"W4A16 {tag}: AdaQuant closes >= half of RTN's perplexity gap: "
                   f"{'yes' if closed >= 0.5 else 'NO'} ({100 * closed:.0f} % of {gap:.4f})")
    return out


def _markdown(r: dict) -> str:
    lines = [f"# Causal LM: PTQ and 2:4 on tinyllama{' (quick)' if r['quick'] else ''}", "",
             f"Command: `{r['command']}` (torch threads: {r['threads']}); total {r['total_seconds']:.0f} s wall.", "",
             f"Model: transformers LlamaForCausalLM, {r['params'] / 1e6:.2f} M parameters, byte-level (vocabulary "
             f"256), trained by `thrifty.train.lm.pretrained_lm()` in {r['train']['train_seconds']} s wall"
             + (f" / {r['train']['train_cpu_seconds']} s CPU" if r["train"].get("train_cpu_seconds") else "")
             + f" (cached; loading took {r['load_seconds']} s here). Metric: perplexity per byte on "
             f"{r['test_windows']} held-out windows of {r['seq_len']} bytes; calibration: {r['calib_windows']} "
             f"training windows; AdaQuant / AdaPrune: {r['adaquant_iters']} steps per layer.", "",
             f"FP32 perplexity: **{r['fp32_ppl']:.4f}**", "",
             "| configuration | weights x activations | group | perplexity | vs FP32 | wall s | CPU s |",
             "|---|---|---|---:|---:|---:|---:|"]
    for x in r["rows"]:
        g = str(x["group_size"]) if x["group_size"] else ("-" if x["kind"] == "nm" else "channel")
        lines.append(f"| {x['name']} | {x['bits']} | {g} | {x['ppl']:.4f} | {100 * x['rel_ppl']:+.2f} % | "
                     f"{x['wall_s']} | {x['cpu_s']} |")
    lines += ["", "Targets:", ""] + [f"- {t}" for t in r["targets"]]
    return "\n".join(lines) + "\n"


def science(args, exp: Experiment) -> dict:
    r = run(args.quick, lambda s: print(s, flush=True))
    r.update(quick=args.quick, threads=args.threads, total_seconds=exp.seconds(), command=exp.command)
    r["targets"] = _targets(r)
    return r


def main(argv=None) -> int:
    exp = Experiment("causal_lm", __doc__)  # one torch thread by default: what the committed results used
    return exp.run(lambda args: science(args, exp), _markdown, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
