"""Subprocess entry of thrifty.bench.run: ``python -m thrifty.bench.worker job.json``.

The parent sets OMP_NUM_THREADS/MKL_NUM_THREADS in the environment, so torch starts with the right thread
pools; this module then loads the samples and the backend and runs the scenarios.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["execute"]


def _load_backend(job: dict[str, Any], threads: int):
    from thrifty.bench.backends import OrtBackend, TorchBackend

    if job["backend"] == "onnxruntime":
        return OrtBackend(job["model"], threads=threads)
    import torch

    model = torch.load(job["model"], weights_only=False, map_location="cpu")
    return TorchBackend(model, threads=threads)


def execute(job: dict[str, Any]) -> dict[str, Any]:
    """Run a job written by thrifty.bench.run (in this process)."""
    from thrifty.bench.harness import Samples
    from thrifty.bench.settings import BenchConfig
    from thrifty.bench.suite import run_suite
    from thrifty.core import from_yaml

    settings = from_yaml(job["settings"])
    if not isinstance(settings, BenchConfig):
        raise TypeError("job settings are not BenchConfig")
    z = np.load(job["samples"])
    inputs = tuple(z[k] for k in sorted((k for k in z.files if k.startswith("input_")), key=lambda k: int(k[6:])))
    samples = Samples(inputs, z["labels"] if "labels" in z.files else None, job.get("dataset", "samples"),
                      job.get("trim_mask"))
    reference = z["reference"] if "reference" in z.files else None
    backend = _load_backend(job, settings.intra_threads())
    res = run_suite(backend, samples, settings, job["scenarios"], job["outdir"], accuracy=job["accuracy"],
                    reference=reference)
    res["threads"] = settings.intra_threads()
    res["workers"] = settings.n_workers()
    res["settings"] = json.loads(json.dumps({k: v for k, v in vars(settings).items()}, default=str))
    return res


def main(argv: list[str]) -> int:
    job_path = Path(argv[0])
    job = json.loads(job_path.read_text())
    res = execute(job)
    (Path(job["outdir"]) / "worker_result.json").write_text(json.dumps(res, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
