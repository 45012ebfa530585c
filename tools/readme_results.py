"""Splice results/<name>.md into README.md between markers, so README numbers are the scripts' own output.

In README.md:
    <!-- results:ptq -->
    (replaced by the contents of results/ptq.md, headings demoted by one level)
    <!-- /results:ptq -->

    python tools/readme_results.py          # rewrite README.md in place (atomically)
    python tools/readme_results.py --check  # exit 1 if README.md is out of date
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


def _body(name: str) -> str:
    path = ROOT / "results" / f"{name}.md"
    if not path.is_file():
        return f"_results/{name}.md not produced yet: run the experiment named above._\n"
    text = path.read_text()
    # demote headings so they nest under the README's section; fix relative image links
    text = re.sub(r"^(#+) ", lambda m: "#" * min(len(m.group(1)) + 3, 6) + " ", text, flags=re.M)
    text = re.sub(r"\]\((?!https?:|/|results/)([^)]+\.(?:png|svg|jpg))\)", r"](results/\1)", text)
    return text.rstrip() + "\n"


def render(readme: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + _body(m.group("name")) + m.group(4), readme)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    path = ROOT / "README.md"
    old = path.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print("README.md results blocks are out of date: run python tools/readme_results.py")
            return 1
        return 0
    fd, tmp = tempfile.mkstemp(dir=ROOT, prefix=".README.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(new)
    os.replace(tmp, path)
    print(f"README.md: {len(BLOCK.findall(old))} results blocks refreshed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
