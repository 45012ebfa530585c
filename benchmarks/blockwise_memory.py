"""Peak memory of block-wise calibration against whole-model capture, on a 12-layer BERT (issue 16, item 3).

Both modes run one-shot 2:4 AdaPrune (same steps, learning rate and seed) on the same calibration tokens of a
randomly initialised 12-layer ``transformers.BertModel``; each runs in its own subprocess, whose peak resident
set size (``ru_maxrss``) is read at the end:

* ``whole``: whole-model capture: one forward pass of the dense model caches every prunable layer's input and
  output for all calibration samples, then each layer is fitted from the cache (what one does to avoid a
  forward pass per layer; the fitted inputs are the dense model's);
* ``blockwise``: ``adaprune(..., blocks="auto")``: block 0's inputs captured once, then one transformer layer
  at a time on the pruned and the dense stream (the fitted inputs are the pruned prefix's);
* ``layerwise`` (optional, slow): ``adaprune`` without blocks: one layer at a time, each capture a forward
  pass of the model's prefix.

Two ratios are reported, block-wise over whole-model capture:

* ``peak_ratio``: the process's total peak RSS. It includes the baseline every Python process with torch and
  transformers imported and this model loaded pays before calibrating anything (about 400 MiB here, the same
  in both modes), which bounds it from below by baseline / whole-model peak however little the calibration
  holds;
* ``calib_ratio``: the calibration's own peak, ``peak - start``, where ``start`` is the process's resident set
  right before calibration begins (imports, model, data and the dense reference outputs in place). It is what a
  larger model or calibration set scales, and what block-wise mode is meant to bound. ``start`` is the current
  RSS, not the setup's peak, so a transient during setup cannot hide calibration memory.

The default setting makes activations dominate, as they do when a real large model is calibrated: 256
sequences of up to 128 tokens (about 25k real tokens), so whole-model capture holds GiBs (every layer's
input and output rows: 18 x hidden floats per token and transformer layer) while block-wise mode holds the two
block streams and one layer's rows; the baseline is then a small part of the whole-model peak and both ratios
are meaningful. (With 256 sequences of 64 tokens, whole-model capture took about 1.5 GiB and the total-peak
ratio was 0.28 at a calibration-memory ratio of 0.08: the baseline dominated.)

Where the time goes: whole-model capture runs the dense model once over the calibration set; block-wise mode
runs, per block, a capture of the prefix of the block up to each layer on the pruned stream (an input capture
stops before the layer; consecutive layers reading the same tensor, like query/key/value, share one capture)
and on the dense stream (the target), then advances both streams through the block. That is several block
passes per block against one, the price of fitting each layer on the pruned prefix's inputs; the fits
themselves (``--steps`` batches of 64 rows, and two whole-set error evaluations per layer) are the same in both.

Accuracy: relative MSE of the last hidden state and mean cosine of the mean-pooled embedding to the dense
model, on held-out tokens.

Each worker uses --threads torch threads (default 2, torch's own default on a 2-core machine; the committed run
used 1 per worker, its two workers side by side on 2 cores).

    python benchmarks/blockwise_memory.py --quick    # CI-sized: 64 sequences of up to 64 tokens, 5 steps per layer
    python benchmarks/blockwise_memory.py --jobs 2 --threads 1  # as committed: results/blockwise_memory.{json,md}
                                                     # (256 x 128 tokens, 50 steps per layer; 3.3 GiB peak)
    python benchmarks/blockwise_memory.py --samples 256 --seq 64 --steps 2  # the earlier, baseline-dominated one
    python benchmarks/blockwise_memory.py --render   # rewrite results/blockwise_memory.md from its JSON
"""
from __future__ import annotations

import copy
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

from thrifty.bench.experiment import Experiment, table


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_mib() -> float:
    """The current resident set (Linux /proc/self/statm: pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def worker(mode: str, a: SimpleNamespace) -> dict:
    """One mode's run in this process (the parent's flags in ``a``); the row of the table."""
    import torch
    import transformers

    from thrifty.quant.calib import as_batches, run, token_rows
    from thrifty.sparse import NM, adaprune, nm_masks, sparsify
    from thrifty.sparse.adaprune import prune_layer

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=a.hidden, num_hidden_layers=12,
                                  num_attention_heads=a.hidden // 64, intermediate_size=4 * a.hidden,
                                  max_position_embeddings=a.seq)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(a.seed + 1)

    def tokens(n: int) -> dict:
        ids = torch.randint(1, 1000, (n, a.seq), generator=g)
        mask = (torch.arange(a.seq) < torch.randint(a.seq // 2, a.seq + 1, (n, 1), generator=g)).long()
        return {"input_ids": ids * mask, "attention_mask": mask}

    calib, test = tokens(a.samples), tokens(a.test)
    with torch.no_grad():
        ref = model(**test).last_hidden_state
    setup, start = _peak_mib(), _rss_mib()
    t0 = time.perf_counter()
    nm = NM(2, 4)
    if mode == "whole":
        batches = as_batches(calib, 256)
        dense = copy.deepcopy(model).eval()
        sparsify(model, replace(nm, recompute_every=0, straight_through=False))
        masked = list(nm_masks(model))
        ins: dict[str, list] = {n: [] for n, _, _ in masked}
        outs: dict[str, list] = {n: [] for n, _, _ in masked}
        cur: list = []

        def hook(_m, inp, out, n):
            ins[n].append(token_rows(inp[0].detach(), cur[0]))
            outs[n].append(token_rows(out.detach(), cur[0]))
        hs = [dense.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n)) for n, _, _ in masked]
        with torch.no_grad():
            for b in batches:
                cur[:] = [b]
                run(dense, b)
        for h in hs:
            h.remove()
        gen = torch.Generator().manual_seed(a.seed)
        for n, layer, mk in masked:
            prune_layer(layer, mk, torch.cat(ins.pop(n)), torch.cat(outs.pop(n)), steps=a.steps, lr=1e-3,
                        batch_size=64, remask_every=a.remask_every, gen=gen)
    else:
        adaprune(model, nm, calib, steps=a.steps, lr=1e-3, batch_size=64, remask_every=a.remask_every,
                 progress=False, seed=a.seed, blocks="auto" if mode == "blockwise" else None)
    seconds = time.perf_counter() - t0
    peak = _peak_mib()
    with torch.no_grad():
        out = model(**test).last_hidden_state
    m = test["attention_mask"].unsqueeze(-1).float()
    pool = lambda h: (h * m).sum(1) / m.sum(1)  # noqa: E731
    real = test["attention_mask"].bool()
    rel_mse = float((out[real] - ref[real]).pow(2).mean() / ref[real].pow(2).mean())
    cos = float(torch.nn.functional.cosine_similarity(pool(out), pool(ref), dim=1).mean())
    return {"mode": mode, "tokens": int(calib["attention_mask"].sum()), "setup_mib": setup, "start_mib": start,
            "peak_mib": peak, "calib_mib": peak - start,
            "seconds": seconds,
            "rel_mse": rel_mse, "cos_mean": cos}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:  # a child of science(): --worker MODE FLAGS_JSON; prints its row as JSON
        print(json.dumps(worker(argv[1], SimpleNamespace(**json.loads(argv[2])))))
        return 0
    exp = Experiment("blockwise_memory", __doc__, threads=2)
    ap = exp.parser
    ap.add_argument("--modes", default="whole,blockwise", help="comma list of whole, blockwise, layerwise")
    ap.add_argument("--samples", type=int, default=None, help="calibration sequences (default 256, quick 64)")
    ap.add_argument("--test", type=int, default=32, help="held-out sequences (default %(default)s)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 128, quick 64); each "
                    "sequence has between half of it and all of it real tokens, the rest padding")
    ap.add_argument("--hidden", type=int, default=128, help="hidden size (default %(default)s)")
    ap.add_argument("--steps", type=int, default=None, help="AdaPrune steps per layer (default 50, quick 5)")
    ap.add_argument("--remask-every", type=int, default=10, help="AdaPrune re-masks every that many steps")
    ap.add_argument("--jobs", type=int, default=1, help="mode workers run at a time (default %(default)s; each "
                    "is its own process, so the peaks stay separate; the seconds then share the machine)")
    return exp.run(lambda args: science(args, exp), render, argv=argv)


def science(args, exp: Experiment) -> dict:
    """Each mode in its own subprocess (a fresh peak RSS); the rows and the block-wise / whole ratios."""
    flags = {"seed": args.seed, "threads": args.threads, "samples": args.samples or (64 if args.quick else 256),
             "steps": args.steps if args.steps is not None else (5 if args.quick else 50), "test": args.test,
             "seq": args.seq or (64 if args.quick else 128), "hidden": args.hidden, "remask_every": args.remask_every}
    for k in ("samples", "test", "seq", "hidden", "steps"):
        if flags[k] < (0 if k == "steps" else 1) or (k == "hidden" and flags[k] % 64):
            raise SystemExit(f"blockwise_memory: --{k} must be {'a multiple of 64' if k == 'hidden' else 'positive'}, "
                             f"got {flags[k]}")
    load0 = os.getloadavg()[0]
    rows = []
    modes = args.modes.split(",")
    for i in range(0, len(modes), args.jobs):  # --jobs workers at a time (separate processes: separate peaks)
        procs = [(m, subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", m, json.dumps(flags)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
                 for m in modes[i:i + args.jobs]]
        for mode, proc in procs:
            out, err = proc.communicate()
            if proc.returncode:
                raise SystemExit(f"blockwise_memory: worker {mode} failed:\n{err[-3000:]}")
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    by = {r["mode"]: r for r in rows}
    load = os.getloadavg()[0]
    res = {"model": f"BertModel, 12 layers, hidden {args.hidden}, intermediate {4 * args.hidden}, seq {flags['seq']}",
           "samples": flags["samples"], "tokens": rows[0]["tokens"], "steps": flags["steps"],
           "remask_every": args.remask_every, "seed": args.seed,
           "command": exp.command, "rows": rows,
           "note": f"Seconds are wall time on a shared machine (load {load0:.1f} at the start of the run, "
                   f"{load:.1f} at the end, {os.cpu_count()} cores; this run at nice {os.nice(0)}), "
                   f"{'side by side' if args.jobs == 1 else f'{args.jobs} workers at a time'}."}
    if "whole" in by and "blockwise" in by:
        w, b = by["whole"], by["blockwise"]
        res["peak_ratio"] = b["peak_mib"] / w["peak_mib"]
        res["calib_ratio"] = b["calib_mib"] / max(w["calib_mib"], 1e-9)
    return res


def render(res: dict) -> str:
    lines = [f"# Block-wise calibration memory: {res['model']}", "",
             f"`{res['command']}`: one-shot 2:4 AdaPrune, {res['samples']} calibration sequences"
             + (f" ({res['tokens']} real tokens)" if "tokens" in res else "")
             + f", {res['steps']} steps per layer; each mode in its own process (peak RSS).", "",
             table(res["rows"], {"mode": "mode", "setup_mib": "setup peak MiB", "start_mib": "RSS at start MiB",
                                 "peak_mib": "peak MiB", "calib_mib": "calibration MiB (peak - start)",
                                 "seconds": "seconds", "rel_mse": "rel. MSE to dense", "cos_mean": "mean cosine"},
                   digits={"setup_mib": 0, "start_mib": 0, "peak_mib": 0, "calib_mib": 0, "seconds": 0,
                           "rel_mse": 4, "cos_mean": 4}).rstrip("\n")]
    if "peak_ratio" in res:
        lines += ["", f"Block-wise / whole-model capture: calibration memory (peak - start) "
                      f"{res['calib_ratio']:.3f}, total process peak RSS {res['peak_ratio']:.3f} "
                      "(target: peak memory at most 0.25 of whole-model capture, accuracy equal or better).", "",
                  "The total peak includes the process's baseline (Python, torch, transformers, the model: the "
                  "'RSS at start' column, the same in both modes), which bounds that ratio from below; the "
                  "calibration memory is what grows with the model and the calibration set (see the script's "
                  "docstring)."]
        if res.get("note"):
            lines += ["", res["note"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
