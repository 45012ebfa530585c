"""Coverage matrix: which thrifty method works on which architecture, each cell with its numeric check.

Rows are architectures users already have, built from ``transformers`` configs with random weights (no download:
BERT, GPT-2, Llama, ViT, ResNet, ConvNeXt, MobileNetV2, Whisper's encoder), thrifty's own zoo and, when its
package is installed, the real pretrained all-MiniLM-L6-v2. Columns are methods. A cell is

- ``ok``: the method ran and its check passed (the number it measured is shown),
- ``fail``: the method ran but its check failed (the number says by how much),
- ``error``: the method raised; the cell shows the one-line message a user gets (type and text),
- ``n/a``: the method does not apply to the architecture, with the reason (BNS synthesis needs BatchNorm).

A crash with an unexplained traceback is what this matrix exists to catch: every ``error`` cell is either a clear
message naming the layer/argument or a bug to fix. Checks (relative error = ||y - y_fp32|| / ||y_fp32|| over the
model's main output on held-out inputs):

- exact: every GEMM the model has is wrapped with empty slots, forward and backward bit-identical, ``strip``
  gives back the original state_dict keys; the cell shows wrapped/total GEMMs and names the ones refused.
- W8A8: PTQ rtn, relative error < 0.1 (a unit-norm sentence embedding: mean cosine to FP32 >= 0.99, see
  ``W8A8_MIN_COS``).  W4A8 adv.: PTQ advanced pipeline, relative error < 0.5 and no larger than
  its RTN.  2:4+AdaPrune: every pruned weight is exactly 2:4 and the error is below magnitude pruning's (or
  equal). T 4:8: transposable 4:8 masks, checked 4:8 along both axes.  Train8 / GradNM: one training step,
  finite loss and gradients, weights changed.  Acc12: e4m7 accumulator forward, relative error < 0.05.
  BNS: 8 synthetic inputs whose BN statistics are closer to the model's than random inputs'.
  ONNX int8: int8 QDQ export run by ONNX Runtime, relative error to thrifty's simulated model < 0.05.
  LoadGen SS: the official LoadGen SingleStream scenario on ONNX Runtime, a valid run (at least LoadGen's
  early-stopping minimum of 64 queries; an INVALID cell gives LoadGen's reasons).

Every row's model is prepared like a trained one before any method runs (``coverage_cells.make``): a model
with BatchNorm gets running statistics re-estimated on the row's calibration inputs (a train-mode forward with
momentum None, no grad), since random init's (mean 0, var 1) match no activations a trained model sees.

Calibration size: 16 samples per row. Where that is fewer output rows than twice a layer's fan-in (a classifier
fed 16 pooled vectors) AdaQuant and AdaPrune fit the layer without every 4th sample and keep the fit only if those
samples' error fell, and bias tuning is skipped when the outputs are fewer than the biases
(``thrifty.core.revert.holdout_rows``; the cell names what the guards undid). Before that guard ConvNeXt's
classifier, fitted on its 16 calibration samples, cut their error 5x and raised the held-out error (AdaPrune
0.673 vs magnitude 0.566; advanced W4A8 0.114 vs RTN 0.104).

Random weights and deep BatchNorm networks: even with real BatchNorm statistics a random-init network subtracts
each channel's mean, which in a random ReLU network removes part of every layer's signal and none of a
perturbation's, so each layer amplifies relative perturbations (Yang et al., "A Mean Field Theory of Batch
Normalization", ICLR 2019). Over MobileNetV2's 53 GEMMs this compounds: Gaussian noise of 0.1 % of each weight's
std changes its output by 9 % (ResNet's 7 GEMMs here: 0.13 %, ConvNeXt 0.16 %), so 8-bit rounding, a 12-bit
accumulator, or ONNX Runtime's integer rounding one code away from the simulation's is multiplied alike. A failing
error check therefore reports the FP model's own amplification (``_gain``) when it exceeds 10x: that error is the
random model's, not the method's (a pretrained model is not chaotic).

    python experiments/coverage_matrix.py            # the whole matrix -> results/coverage_matrix.{json,md}
    python experiments/coverage_matrix.py --quick    # a small slice (what the tests run)
    python experiments/coverage_matrix.py --render   # rewrite the markdown from the JSON already in --out
    python experiments/coverage_matrix.py --merge --rows ConvNeXt MobileNetV2   # rerun two rows into that JSON
"""
from __future__ import annotations

import os
import sys
import time
import traceback
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn

import coverage_cells  # noqa: F401 - the sibling module: one function per method (this folder is on sys.path)
import thrifty as th
from coverage_cells import CELLS, W8A8_MIN_COS, Arch, CellFail, NotApplicable  # noqa: F401 - also the tests
from thrifty.bench.experiment import Experiment


# ------------------------------------------------------------------------------------------------ architectures
def _ids(vocab: int, seq: int = 16) -> Callable[[int, int], dict]:
    def make(n: int, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (n, seq), generator=g)
        mask = torch.ones(n, seq, dtype=torch.long)
        mask[n // 2:, seq * 3 // 4:] = 0  # some padded sequences: the attention mask must reach the model
        return {"input_ids": ids, "attention_mask": mask}
    return make


def _images(key: str | None, shape: tuple[int, ...]) -> Callable[[int, int], Any]:
    def make(n: int, seed: int) -> Any:
        x = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))
        return {key: x} if key else x
    return make


def _hf(cls_name: str, cfg_name: str, **cfg: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers
        torch.manual_seed(0)
        config = getattr(transformers, cfg_name)(**cfg)
        if hasattr(config, "_attn_implementation"):
            config._attn_implementation = "eager"
        return getattr(transformers, cls_name)(config).eval()
    return build


def _whisper_encoder() -> nn.Module:
    import transformers
    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                                     decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                     num_mel_bins=16, max_source_positions=32, vocab_size=100,
                                     pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0)
    cfg._attn_implementation = "eager"
    return transformers.WhisperModel(cfg).encoder.eval()


def _zoo(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return th.models.create(name, **kw).eval()
    return build


def _minilm() -> nn.Module:
    return th.models.create("minilm")


def _minilm_inputs(n: int, seed: int) -> Any:
    from thrifty.data.text import load_texts
    texts = load_texts(n, seed=seed)
    return _minilm_tokenizer().tokenize(texts, max_length=32)


_TOK: list = []


def _minilm_tokenizer() -> nn.Module:
    if not _TOK:
        _TOK.append(th.models.create("minilm"))
    return _TOK[0]


ARCHS: dict[str, Arch] = {a.name: a for a in [
    Arch("BERT", _hf("BertForSequenceClassification", "BertConfig", vocab_size=500, hidden_size=64,
                     num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, num_labels=4),
         _ids(500)),
    Arch("GPT-2", _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=500, n_embd=64, n_layer=2, n_head=2,
                      n_positions=64, bos_token_id=0, eos_token_id=0), _ids(500)),
    Arch("Llama", _hf("LlamaForCausalLM", "LlamaConfig", vocab_size=500, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64), _ids(500)),
    Arch("ViT", _hf("ViTForImageClassification", "ViTConfig", image_size=32, patch_size=8, num_channels=3,
                    hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                    num_labels=10), _images("pixel_values", (3, 32, 32))),
    Arch("ResNet", _hf("ResNetForImageClassification", "ResNetConfig", num_channels=3, embedding_size=16,
                       hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=10),
         _images("pixel_values", (3, 32, 32)), image_shape=(3, 32, 32)),
    Arch("ConvNeXt", _hf("ConvNextForImageClassification", "ConvNextConfig", num_channels=3, hidden_sizes=[16, 32],
                         depths=[1, 1], num_stages=2, num_labels=10), _images("pixel_values", (3, 32, 32))),
    Arch("MobileNetV2", _hf("MobileNetV2ForImageClassification", "MobileNetV2Config", num_channels=3,
                            image_size=32, depth_multiplier=0.35, num_labels=10),
         _images("pixel_values", (3, 32, 32)), image_shape=(3, 32, 32)),
    Arch("Whisper encoder", _whisper_encoder, _images("input_features", (16, 64))),
    Arch("resnet20 (zoo)", _zoo("resnet20", num_classes=10, in_chans=1), _images(None, (1, 32, 32)),
         image_shape=(1, 32, 32), source="thrifty"),
    Arch("mlp (zoo)", _zoo("mlp", in_features=64, num_classes=10), _images(None, (64,)), source="thrifty"),
    Arch("vit (zoo)", _zoo("vit", num_classes=10), _images(None, (1, 32, 32)), source="thrifty"),
    Arch("cnn1d (zoo)", _zoo("cnn1d", num_classes=10), _images(None, (1, 40)), source="thrifty"),
    Arch("MiniLM (real)", _minilm, _minilm_inputs, source="sentence-transformers", unit_embedding=True),
]}
QUICK_ROWS = ("BERT", "ResNet", "mlp (zoo)")
QUICK_COLS = ("exact", "W8A8", "2:4+AdaPrune", "GradNM")


def run_cell(arch: Arch, col: str, calib: Any, test: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            msg, status = CELLS[col](arch, calib, test), "ok"
    except NotApplicable as e:
        msg, status = str(e), "n/a"
    except CellFail as e:
        msg, status = str(e), "fail"
    except Exception as e:  # noqa: BLE001 - the matrix records what a user would see
        msg, status = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300], "error"
        if os.environ.get("THRIFTY_DEBUG"):
            traceback.print_exc()
    return {"status": status, "detail": msg, "seconds": round(time.perf_counter() - t0, 2)}


def run_matrix(rows: list[str], cols: list[str], n_calib: int = 16, n_test: int = 8,
               progress: bool | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """Run every (row, column) cell; returns ``{row: {col: {"status", "detail", "seconds"}}}``."""
    from thrifty.utils import show_progress
    from tqdm.auto import tqdm
    out: dict[str, dict[str, dict[str, Any]]] = {}
    bar = tqdm(total=len(rows) * len(cols), disable=not show_progress(progress), desc="coverage")
    for r in rows:
        arch = ARCHS[r]
        out[r] = {}
        try:
            calib, test = arch.inputs(n_calib, 0), arch.inputs(n_test, 1)
        except Exception as e:  # noqa: BLE001
            out[r] = {c: {"status": "error", "detail": f"inputs: {type(e).__name__}: {e}"[:300], "seconds": 0.0}
                      for c in cols}
            bar.update(len(cols))
            continue
        for c in cols:
            bar.set_postfix_str(f"{r} / {c}")
            out[r][c] = run_cell(arch, c, calib, test)
            bar.update(1)
            if bar.disable:  # a log still shows where a long run is
                cell = out[r][c]
                print(f"coverage: {r} / {c}: {cell['status']} ({cell['seconds']:.1f} s)", file=sys.stderr, flush=True)
    bar.close()
    return out


_MARK = {"ok": "ok", "fail": "FAIL", "error": "error", "n/a": "n/a"}


def to_markdown(matrix: dict[str, dict[str, dict[str, Any]]], cols: list[str]) -> str:
    lines = ["| architecture | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r, cells in matrix.items():
        lines.append(f"| {r} | " + " | ".join(_MARK[cells[c]["status"]] for c in cols) + " |")
    lines += ["", "Details (the numeric check of every cell, or the message a user gets):", ""]
    for r, cells in matrix.items():
        for c in cols:
            cell = cells[c]
            lines.append(f"- {r} / {c}: **{cell['status']}** - {cell['detail']} ({cell['seconds']:.1f} s)")
    return "\n".join(lines) + "\n"


def _markdown(res: dict[str, Any]) -> str:
    counts = res["counts"]
    head = (f"# Coverage matrix\n\n`{res['command']}`: {len(res['rows'])} architectures x {len(res['cols'])} methods "
            f"in {res['wall_s']:.0f} s ({res['threads']} threads); "
            + ", ".join(f"{v} {k}" for k, v in counts.items()) + ".\n\n")
    for u in res.get("updates", []):
        head += (f"Rerun since, merged into the matrix: {', '.join(u['rows'])} x {', '.join(u['cols'])} with "
                 f"`{u['command']}` ({u['wall_s']:.0f} s, {u['threads']} threads, machine load {u['load']:.1f}).\n\n")
    return head + to_markdown(res["matrix"], res["cols"])


def _merge(old: dict[str, Any], new: dict[str, dict[str, dict[str, Any]]], update: dict[str, Any]) -> dict[str, Any]:
    """``old`` (a previous run's JSON) with the cells of ``new`` put in: rows and columns in the matrix's order,
    every cell not rerun kept as it was, the counts recomputed and the rerun recorded under ``updates``."""
    res = {k: v for k, v in old.items() if k != "environment"}
    res.setdefault("environment_full_run", old.get("environment"))
    matrix = {r: dict(c) for r, c in old["matrix"].items()}
    for r, cells in new.items():
        matrix.setdefault(r, {}).update(cells)
    cols = [c for c in CELLS if c in set(old["cols"]) | set(update["cols"])]
    rows = [r for r in ARCHS if r in matrix]
    gaps = [f"{r} / {c}" for r in rows for c in cols if c not in matrix[r]]
    if gaps:
        raise ValueError(f"coverage_matrix --merge: the merged matrix would have empty cells ({gaps[:3]}...); "
                         "rerun those columns for every row")
    res.update(rows=rows, cols=cols, matrix={r: {c: matrix[r][c] for c in cols} for r in rows},
               counts=_counts({r: matrix[r] for r in rows}, cols), updates=[*old.get("updates", []), update])
    return res


def _counts(matrix: dict[str, dict[str, dict[str, Any]]], cols: list[str]) -> dict[str, int]:
    return {s: sum(cells[c]["status"] == s for cells in matrix.values() for c in cols) for s in _MARK}


def science(args: Any, exp: Experiment) -> dict[str, Any]:
    rows = args.rows or list(QUICK_ROWS if args.quick else ARCHS)
    cols = args.cols or list(QUICK_COLS if args.quick else CELLS)
    unknown = [r for r in rows if r not in ARCHS] + [c for c in cols if c not in CELLS]
    if unknown:
        exp.parser.error(f"unknown rows/columns {unknown}; rows: {list(ARCHS)}; columns: {list(CELLS)}")
    old = exp.read_json() if args.merge else None  # a clear error before any cell runs when there is none
    matrix = run_matrix(rows, cols)
    if old is not None:
        return _merge(old, matrix, {"rows": rows, "cols": cols, "command": exp.command, "wall_s": exp.seconds(),
                                    "threads": args.threads, "load": os.getloadavg()[0]})
    return {"rows": rows, "cols": cols, "matrix": matrix, "counts": _counts(matrix, cols), "wall_s": exp.seconds(),
            "threads": args.threads, "quick": args.quick, "command": exp.command}


def main(argv: list[str] | None = None) -> int:
    exp = Experiment("coverage_matrix", __doc__, threads=2)
    exp.parser.add_argument("--rows", nargs="*", default=None, help="architectures (default: all)")
    exp.parser.add_argument("--cols", nargs="*", default=None, help="methods (default: all)")
    exp.parser.add_argument("--merge", action="store_true",
                            help="rerun only --rows x --cols and put them into the JSON already in --out (the other "
                                 "cells kept); the markdown names the rerun")
    exp.parser.epilog = f"--quick runs rows {QUICK_ROWS} x columns {QUICK_COLS}"
    return exp.run(lambda args: science(args, exp), _markdown, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
