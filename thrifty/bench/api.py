"""``thrifty.bench.run``: one model, one backend, any scenarios, in a subprocess with pinned threads.

``run("resnet20", scenarios="all", backend="onnxruntime", outdir="reports/bench")`` benchmarks the pretrained
resnet20; any ``nn.Module`` with a dataset works the same way.

Example:
    >>> import tempfile, torch, torch.nn as nn
    >>> import thrifty as th
    >>> data = torch.utils.data.TensorDataset(torch.rand(64, 16), torch.zeros(64, dtype=torch.long))
    >>> rep = th.bench.run(nn.Linear(16, 4), th.bench.BenchConfig(min_duration_s=0.1), data, scenarios="Offline",
    ...                    backend="torch", outdir=tempfile.mkdtemp())
    >>> rep["scenarios"]["Offline"]["valid"], rep["scenarios"]["Offline"]["value"] > 0   # value: samples/s
    (True, True)
"""
from __future__ import annotations

import json
import inspect
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from thrifty.bench.adapter import KeywordCall, needs_keywords
from thrifty.bench.harness import Samples
from thrifty.core.compat import config_first
from thrifty.bench.report import portable_paths
from thrifty.bench.settings import SCENARIOS, BenchConfig
from thrifty.utils import atomic_write_text, get_logger

__all__ = ["Workload", "load_workload", "run", "tokenize_fixed", "calibration_data", "ptq_int8"]

log = get_logger("thrifty.bench")
BACKENDS = ("torch", "onnxruntime")


@dataclass
class Workload:
    """A model (or ONNX file) with its Query Sample Library contents and export metadata."""

    name: str
    model: Optional[nn.Module]
    samples: Samples
    input_names: list[str]
    onnx_path: Optional[Path] = None


def tokenize_fixed(model: nn.Module, texts: Sequence[str], seq_len: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """MiniLM inputs padded/truncated to exactly ``seq_len`` tokens (fixed-size samples for batching)."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise TypeError(f"{type(model).__name__} has no .tokenizer; pass tokenized data as Samples")
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def _as_samples(data: Any, name: str = "data") -> Samples:
    if isinstance(data, Samples):
        return data
    if isinstance(data, torch.utils.data.TensorDataset):
        ts = [t.numpy() for t in data.tensors]
        return Samples(tuple(ts[:-1]), ts[-1], name) if len(ts) > 1 else Samples(tuple(ts), None, name)
    if isinstance(data, (np.ndarray, torch.Tensor)):
        return Samples((np.asarray(data),), None, name)
    if isinstance(data, dict) and "inputs" in data:
        ins = data["inputs"]
        ins = tuple(np.asarray(a) for a in (ins if isinstance(ins, (tuple, list)) else (ins,)))
        return Samples(ins, None if data.get("labels") is None else np.asarray(data["labels"]), name)
    if isinstance(data, Mapping) and data and all(isinstance(v, (np.ndarray, torch.Tensor)) for v in data.values()):
        return Samples(tuple(np.asarray(v) for v in data.values()), None, name)  # keyword inputs, in order
    raise TypeError(f"data of type {type(data).__name__} is not supported: pass a dataset name, a "
                    f"thrifty.bench.Samples, a TensorDataset (inputs..., labels), an array, "
                    f"{{'inputs': ..., 'labels': ...}} or a dict of named input arrays (a tokenizer's output)")


def _positional_order(model: Optional[nn.Module], data: Mapping) -> dict:
    """A dict of named inputs ordered as ``model.forward`` takes them positionally (backends call
    ``model(*inputs)``); TypeError naming the inputs that are not positional parameters of it."""
    if model is None:
        return dict(data)
    params = [p.name for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = [k for k in data if k not in params]
    if unknown:
        raise TypeError(f"data: {unknown} are not positional parameters of {type(model).__name__}.forward "
                        f"({params[:6]}...)")
    # inputs that are not forward's leading parameters never get here: load_workload wraps such a model in a
    # KeywordCall (thrifty.bench.adapter), which calls it by keyword
    return {k: data[k] for k in sorted(data, key=params.index)}


def load_workload(model: Union[str, os.PathLike, nn.Module], data: Any = None, *, seq_len: int = 128,
                  max_samples: Optional[int] = None, seed: int = 0, dynamic_length: bool = False) -> Workload:
    """Resolve a zoo name ("resnet20" -> pretrained on digits32, "minilm" -> text sentences at ``seq_len``),
    a saved thrifty model, an .onnx file or an nn.Module, and its data (default: the model's bundled set).

    ``dynamic_length``: text batches are padded only to their longest sentence (at most ``seq_len``) instead
    of always ``seq_len`` tokens."""
    from thrifty.data import load_dataset

    keyword_names: list[str] = []
    for name, v in (("max_samples", max_samples), ("seq_len", seq_len)):
        # a negative max_samples would slice off the end (-1: all but one sample), silently
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"load_workload: {name} must be a positive integer or None, got {v!r}")
    onnx_path = None
    if isinstance(model, (str, os.PathLike)):
        s = str(model)
        if s.endswith(".onnx"):
            if not Path(s).is_file():
                raise FileNotFoundError(f"ONNX model not found: {s}")
            onnx_path, name, mod = Path(s), Path(s).stem, None
        elif Path(s).exists() or Path(s + ".yaml").exists() or s.endswith((".safetensors", ".yaml")):
            from thrifty.train import load_model

            mod, meta = load_model(s)
            name = Path(s).stem
            data = data if data is not None else meta.get("dataset")
        elif s == "minilm":
            from thrifty.models import create

            mod, name = create("minilm"), "minilm"
        elif s == "resnet20":
            from thrifty.train import pretrained

            mod, name = pretrained("resnet20", "digits32", seed=seed), "resnet20"
            data = data if data is not None else "digits32"
        elif s == "tinyllama":  # the causal LM trained on the bundled stdlib text (cached after the first time)
            from thrifty.train.lm import pretrained_lm

            mod, name = pretrained_lm("tinyllama", seed=seed), "tinyllama"
            data = data if data is not None else "lm"
        else:
            from thrifty.models import create, list_models

            if s not in list_models():
                raise ValueError(f"model {s!r} is neither a file nor a registered model ({', '.join(list_models())})")
            mod, name = create(s), s
    elif isinstance(model, nn.Module):
        mod, name = model, type(model).__name__.lower()
    else:
        raise TypeError(f"model must be a zoo name, a path or an nn.Module, got {type(model).__name__}")
    if data is None and name == "minilm":
        data = "text"
    if data is None:
        raise ValueError(f"no data for model {name!r}: pass data= (a dataset name, Samples or TensorDataset)")
    if isinstance(data, str) and data == "lm":
        samples = _lm_samples(mod, name, seq_len)
    elif isinstance(data, str):
        splits = load_dataset(data, seed=0)
        if data == "text":
            if mod is None or not hasattr(mod, "tokenizer"):
                raise ValueError("the 'text' dataset needs a model with a tokenizer (MiniLM)")
            ids, mask = tokenize_fixed(mod, splits.test_texts, seq_len)
            samples = Samples((ids, mask), splits.test.tensors[1].numpy(),
                              f"text@{'dyn' if dynamic_length else ''}{seq_len}", 1 if dynamic_length else None)
        else:
            samples = _as_samples(splits.test, data)
    else:
        if isinstance(data, Mapping) and "inputs" not in data:
            if mod is not None and needs_keywords(mod, list(data)):
                # GPT-2 takes its cache between input_ids and attention_mask, decoders return a cache: the
                # backends call KeywordCall(model)(*inputs), i.e. model(**inputs, use_cache=False) -> its logits
                mod = KeywordCall(mod, list(data))
            else:
                data = _positional_order(mod, data)
            keyword_names = list(data)
        samples = _as_samples(data)
    if max_samples is not None and len(samples) > max_samples:
        samples = Samples(tuple(a[:max_samples] for a in samples.inputs),
                          None if samples.labels is None else samples.labels[:max_samples], samples.name,
                          samples.trim_mask)
    names = ["input_ids", "attention_mask"] if len(samples.inputs) == 2 and samples.name.startswith(("text", "lm@")) \
        else keyword_names or [f"input_{i}" for i in range(len(samples.inputs))]
    if mod is not None and not isinstance(model, nn.Module):
        mod = mod.eval()  # ours; a user's module is never modified (backends work on copies)
    return Workload(name, mod, samples, names, onnx_path)


def _lm_samples(mod: Optional[nn.Module], name: str, seq_len: int) -> Samples:
    """The held-out windows of the bundled byte-level text (thrifty.data.lm) for a causal LM: ``input_ids`` and
    an all-ones ``attention_mask`` (without a mask, transformers looks for packed sequences with ``aten::diff``,
    which the ONNX exporter lacks; the logits are the same)."""
    from thrifty.data.lm import VOCAB_SIZE, lm_windows

    vocab = getattr(getattr(mod, "config", None), "vocab_size", None)
    if vocab != VOCAB_SIZE:
        raise ValueError(f"the 'lm' dataset is byte-level text ({VOCAB_SIZE} tokens) for a causal LM such as "
                         f"tinyllama; model {name!r} has vocab_size {vocab}")
    ids = lm_windows("test", seq_len).numpy().astype("int64")
    return Samples((ids, np.ones_like(ids)), None, f"lm@{seq_len}")


_BUNDLED_IMAGES = ("digits", "digits32", "mnist1d")


def _bundled(name: str) -> bool:
    """Whether the samples come from a bundled dataset whose training split can supply calibration data."""
    return name in _BUNDLED_IMAGES or name.startswith("text")


def calibration_data(wl: Workload, per_class: int = 10, seed: int = 0) -> Any:
    """PTQ calibration inputs for a workload, chosen like experiments/ptq.py: ``calibration_subset(train,
    per_class)`` of the bundled dataset (digits32 images; text sentences tokenized in batches of 32, padded to
    the longest, at most the samples' length; for a causal LM on the bundled text, ``10 * per_class`` random
    training windows of the samples' length in batches of 32, as experiments/causal_lm.py), else the first
    ``10 * per_class`` samples."""
    from thrifty.data import calibration_subset, load_dataset

    if wl.samples.name.startswith("lm@"):
        from thrifty.data.lm import lm_tokens

        seq = wl.samples.inputs[0].shape[1]
        t = lm_tokens("train")
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, t.numel() - seq + 1, (10 * per_class,), generator=g)
        ids = t[starts[:, None] + torch.arange(seq)].long()
        return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids.split(32)]
    if wl.samples.name.startswith("text") and wl.model is not None:
        splits = load_dataset("text", seed=0)
        idx = calibration_subset(splits.train, per_class=per_class, seed=seed).tensors[0].tolist()
        texts = [splits.train_texts[int(i)] for i in idx]
        seq = wl.samples.inputs[0].shape[1]
        return [wl.model.tokenize(texts[i:i + 32], max_length=seq) for i in range(0, len(texts), 32)]
    if wl.samples.name in _BUNDLED_IMAGES:
        sub = calibration_subset(load_dataset(wl.samples.name, seed=0).train, per_class=per_class, seed=seed)
        return sub.tensors[0]
    if len(wl.samples.inputs) != 1:
        raise ValueError("pass calibration data explicitly for multi-input models")
    return torch.from_numpy(wl.samples.inputs[0][: 10 * per_class])


def ptq_int8(model: nn.Module, calib: Any, pipeline: str = "rtn", w_bits: int = 8, a_bits: int = 8, **kw: Any):
    """thrifty.quant.quantize with 8-bit weights (per-channel) and activations: returns its QuantResult."""
    from thrifty.quant import PTQ, quantize

    return quantize(model, PTQ(w_bits=w_bits, a_bits=a_bits, pipeline=pipeline, **kw), calib, progress=False)


def _auto_calib(calib: Any, wl: Workload) -> Any:
    if not (isinstance(calib, str) and calib == "auto"):
        return calib
    from thrifty.bench.export import _activation_spec

    if wl.model is None or _activation_spec(wl.model) is None:
        return None  # nothing quantized: nothing to calibrate
    if _bundled(wl.samples.name):
        return calibration_data(wl)
    log.info("thrifty.bench.run: no bundled calibration set for %r; pass calib= to make residual Adds integer "
             "(exporting the simulated PTQ graph as is)", wl.samples.name)
    return None


def _reference(ref: Any, wl: Workload) -> Optional[np.ndarray]:
    from thrifty.bench.backends import TorchBackend

    if ref is None or (isinstance(ref, str) and ref == "none"):
        return None
    if isinstance(ref, np.ndarray):
        return ref
    if isinstance(ref, str) and ref == "auto":
        ref = wl.model
        if ref is None:
            return None
    if not isinstance(ref, nn.Module):
        raise TypeError(f"reference must be 'auto', None, an array or an nn.Module, got {type(ref).__name__}")
    import copy

    be = TorchBackend(copy.deepcopy(ref))
    n = len(wl.samples)
    outs = [np.asarray(be(wl.samples.batch(range(i, min(i + 256, n))))).reshape(min(256, n - i), -1)
            for i in range(0, n, 256)]
    return np.concatenate(outs).astype(np.float32)


def run(model: Union[str, os.PathLike, nn.Module], config: Optional[BenchConfig] = None, data: Any = None, *,
        scenarios: Union[str, Sequence[str]] = "Offline", backend: str = "torch",
        settings: Optional[BenchConfig] = None, outdir: Union[str, os.PathLike] = "reports/bench",
        accuracy: bool = True, reference: Any = "auto", isolate: bool = True, seq_len: int = 128,
        max_samples: Optional[int] = None, variant: Optional[str] = None,
        dynamic_length: bool = False, calib: Any = "auto") -> dict[str, Any]:
    """Benchmark ``model`` under LoadGen scenarios and return (and write ``outdir/<variant>/result.json``, with
    paths relative to that folder) the results.

    ``backend="onnxruntime"`` exports the model (int8 QDQ where it holds thrifty quantizers) and runs ONNX
    Runtime; ``reference`` ("auto" = the given PyTorch model's own outputs, or a module/array) is what the
    accuracy run compares LoadGen's logged responses to. ``isolate`` runs the benchmark in a subprocess with
    OMP/MKL thread counts set before torch is imported (threaded SUTs need it). ``calib``: calibration data for
    the output quantizers an integer residual graph needs (see ``export_onnx``); "auto" = the bundled dataset's
    PTQ calibration subset (:func:`calibration_data`), None = export exactly the simulated PTQ graph.

    ``config`` (default ``BenchConfig()``) comes right after the model; the older ``run(model, data,
    settings=cfg)`` still works for one release, with a DeprecationWarning.
    """
    settings, data = config_first("bench.run", config, data, settings, default=BenchConfig(),
                                  accepts=(BenchConfig,), call="bench.run(model, cfg, data)")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    scen = list(SCENARIOS) if scenarios == "all" else [scenarios] if isinstance(scenarios, str) else list(scenarios)
    wl = load_workload(model, data, seq_len=seq_len, max_samples=max_samples, seed=settings.seed,
                       dynamic_length=dynamic_length)
    psc = settings.performance_sample_count
    if psc is not None and psc > len(wl.samples):
        raise ValueError(f"performance_sample_count={psc} is larger than the dataset ({len(wl.samples)} samples)")
    variant = variant or f"{wl.name}_{backend}"
    out = (Path(outdir) / variant).resolve()  # the worker runs with cwd=out: relative paths would break
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    ref = _reference(reference, wl)
    job: dict[str, Any] = {"backend": backend, "scenarios": scen, "settings": settings.to_yaml(),
                           "accuracy": accuracy, "outdir": str(out.resolve()), "samples": str((out / "samples.npz").resolve()),
                           "trim_mask": wl.samples.trim_mask, "dataset": wl.samples.name}
    arrays = {f"input_{i}": a for i, a in enumerate(wl.samples.inputs)}
    if wl.samples.labels is not None:
        arrays["labels"] = wl.samples.labels
    if ref is not None:
        arrays["reference"] = ref
    np.savez(out / "samples.npz", **arrays)
    if backend == "onnxruntime":
        from thrifty.bench.export import export_onnx

        path = out / "model.onnx"
        if wl.onnx_path is not None:
            shutil.copyfile(wl.onnx_path, path)
        else:
            ex = tuple(torch.from_numpy(a) for a in wl.samples.batch([0, 1]))
            export_onnx(wl.model, ex, path, input_names=wl.input_names, calib=_auto_calib(calib, wl))
        job["model"] = str(path.resolve())
        artifact = path
    else:
        if wl.model is None:
            raise ValueError("the torch backend needs a PyTorch model, not an .onnx file")
        artifact = out / "model.pt"
        torch.save(wl.model, artifact)
        job["model"] = str(artifact.resolve())
    atomic_write_text(out / "job.json", json.dumps(job, indent=1))
    note = None
    if isolate and backend == "torch" and any(type(m).__module__ == "__main__" for m in wl.model.modules()):
        # a class defined in a script cannot be unpickled by the subprocess
        note = "ran in-process: the model's class is defined in __main__ (threads not pinned before torch import)"
        log.warning("thrifty.bench.run: %s", note)
        isolate = False
    if isolate:
        res = _run_subprocess(out, settings)
    else:
        from thrifty.bench.worker import execute

        res = execute(job)
    res.update(variant=variant, model=wl.name, backend=backend, artifact_bytes=artifact.stat().st_size,
               dataset=wl.samples.name, isolated=isolate)
    if backend == "onnxruntime":
        import onnx

        meta = {p.key: p.value for p in onnx.load(str(artifact), load_external_data=False).metadata_props}
        if "thrifty.int8" in meta:
            res["int8_export"] = json.loads(meta["thrifty.int8"])
    if note:
        res["isolation_note"] = note
    if ref is not None:  # the reference model's own metrics (e.g. the simulated-quantized accuracy)
        from thrifty.bench.accuracy import score_outputs

        res["reference_metrics"] = score_outputs({i: ref[i] for i in range(len(ref))}, wl.samples.labels)
    # paths in the file are relative to its folder (portable, nothing about the machine); the returned dict keeps
    # absolute ones, usable from any working directory
    atomic_write_text(out / "result.json", json.dumps(portable_paths(res, out), indent=1, default=_jsonable))
    return res


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _run_subprocess(out: Path, settings: BenchConfig) -> dict[str, Any]:
    threads = str(settings.intra_threads())
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads,
               PYTHONPATH=os.pathsep.join([p for p in sys.path if p] + [os.environ.get("PYTHONPATH", "")]))
    # Run from the output folder: LoadGen and anything else reading the CWD see only our files.
    p = subprocess.run([sys.executable, "-m", "thrifty.bench.worker", str(out / "job.json")], cwd=out, env=env,
                       capture_output=True, text=True)
    (out / "worker.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [f"exit code {p.returncode}"]
        raise RuntimeError(f"benchmark subprocess failed: {tail[0]} (full log: {out / 'worker.log'})")
    return json.loads((out / "worker_result.json").read_text())
