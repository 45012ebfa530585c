"""Build a separate virtual environment holding an anchor (AIMET) for benchmarks/ptq_anchor.py.

aimet-torch requires torchvision, but only builds type tables from it; the real torchvision does not load beside
the CPU torch build these machines use, and installing it would pull a CUDA torch. This script therefore installs
a stub ``torchvision`` package (with pip metadata, so pip sees the requirement met) whose modules and submodules
answer any attribute with a placeholder class, then installs torch (the pinned CPU build) and aimet-torch.

    python3 tools/anchor_venv.py VENV                     # torch==2.13.0 + aimet-torch==2.42.0 into VENV
    python3 tools/anchor_venv.py VENV --stub-only         # only (re)write the stub into an existing VENV
    python benchmarks/ptq_anchor.py --anchor-python VENV/bin/python

The environment is never a dependency of thrifty or of ``make test``.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

STUB_VERSION = "0.28.0"  # what the stub claims to be (inside the pip constraint torchvision<=0.29.1)

_STUB_INIT = '''"""Stub torchvision (tools/anchor_venv.py): every module and attribute is a placeholder class."""
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "{version}"


class _Meta(type):  # attributes of a placeholder are placeholders too (torchvision.transforms.Resize)
    def __getattr__(cls, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        sub = _Meta(name, (_Placeholder,), {{"__module__": cls.__module__}})
        setattr(cls, name, sub)
        return sub


class _Placeholder(metaclass=_Meta):
    def __init__(self, *a, **k):
        raise RuntimeError("stub torchvision: " + type(self).__name__ + " is a placeholder")


def _attr(modname, name):
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(name)
    cls = _Meta(name, (_Placeholder,), {{"__module__": modname}})
    setattr(sys.modules[modname], name, cls)
    return cls


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = types.ModuleType(spec.name)
        mod.__path__ = []
        mod.__getattr__ = lambda name, _m=spec.name: _attr(_m, name)
        return mod

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())


def __getattr__(name):
    return _attr(__name__, name)
'''


def write_stub(site_packages: Path) -> Path:
    """Write the stub torchvision package and its dist-info into ``site_packages``; return the package folder."""
    pkg = site_packages / "torchvision"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(_STUB_INIT.format(version=STUB_VERSION))
    info = site_packages / f"torchvision-{STUB_VERSION}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torchvision\nVersion: {STUB_VERSION}\n"
                                   "Summary: stub (tools/anchor_venv.py) for aimet-torch's import\n")
    (info / "INSTALLER").write_text("thrifty-anchor-stub\n")
    (info / "RECORD").write_text(f"torchvision/__init__.py,,\n{info.name}/METADATA,,\n{info.name}/INSTALLER,,\n"
                                 f"{info.name}/RECORD,,\n")
    return pkg


def _site_packages(py: Path) -> Path:
    out = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("venv", type=Path, help="folder of the virtual environment (created when missing)")
    ap.add_argument("--torch", default="torch==2.13.0", help="torch requirement (the local CPU build)")
    ap.add_argument("--aimet", default="aimet-torch==2.42.0", help="aimet-torch requirement")
    ap.add_argument("--stub-only", action="store_true", help="only write the stub torchvision into VENV")
    args = ap.parse_args(argv)
    py = args.venv / "bin" / "python"
    if not py.exists():
        if args.stub_only:
            raise SystemExit(f"anchor_venv: {py} does not exist (run without --stub-only to create the venv)")
        subprocess.run([sys.executable, "-m", "venv", str(args.venv)], check=True)
    pkg = write_stub(_site_packages(py))
    print(f"anchor_venv: stub torchvision {STUB_VERSION} written to {pkg}")
    if args.stub_only:
        return 0
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [args.torch], check=True)  # first and alone: a bare "torch" would pull a CUDA build
    # torch and torchvision are already satisfied (the CPU build, the stub), so pip keeps both
    subprocess.run(pip + [args.torch, args.aimet], check=True)
    check = subprocess.run([str(py), "-c", "import torch, aimet_torch, importlib.metadata as m; "
                            "print('torch', torch.__version__, 'aimet-torch', m.version('aimet-torch'))"],
                           capture_output=True, text=True)
    print(check.stdout.strip() or check.stderr.strip().splitlines()[-1:])
    return check.returncode


if __name__ == "__main__":
    raise SystemExit(main())
