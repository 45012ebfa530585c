"""benchmarks/ptq_anchor.py degrades cleanly when no anchor (Brevitas) is installed: a message and exit 0."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("extra", [[], ["--anchor-python", sys.executable]])
def test_anchor_benchmark_without_anchor_exits_cleanly(extra, tmp_path):
    pytest.importorskip("torch")
    try:
        import brevitas  # noqa: F401
        pytest.skip("brevitas is installed here: the no-anchor path cannot be exercised")
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k != "THRIFTY_ANCHOR_PYTHON"}
    env["PYTHONPATH"] = str(ROOT)
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ptq_anchor.py"), "--out", str(tmp_path), *extra],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "nothing to compare" in p.stdout
    assert not list(tmp_path.iterdir())  # no half-written results
