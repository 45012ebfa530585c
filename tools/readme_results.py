"""Splice results/<name>.md into README.md and docs/**/*.md between markers, so the numbers in the docs are
the scripts' own output.

Markers in a page:
    <!-- results:ptq -->                    (replaced by all of results/ptq.md)
    <!-- /results:ptq -->
    <!-- results:regimes#mixed-size -->     (only the "## " sections of results/regimes.md whose heading
    <!-- /results:regimes#mixed-size -->     slug starts with "mixed-size", after the file's title)

Spliced headings are demoted to nest under the page heading above the marker, and relative image links are
rewritten to point into results/ from the page's folder.

    python tools/readme_results.py          # rewrite the pages in place (atomically)
    python tools/readme_results.py --check  # exit 1, naming every block that differs from its results/*.md
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- results:(?P<key>[\w-]+(?:#[\w-]+)?) -->\n)(?P<body>.*?)(<!-- /results:(?P=key) -->)", re.S)
OPENING = re.compile(r"<!-- results:([\w#-]+) -->")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
HEADING = re.compile(r"^(#+) ", re.M)


def pages(root: Path = ROOT) -> list[Path]:
    """README.md and every markdown page under docs/, the files that may hold results blocks."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def slug(heading: str) -> str:
    """``"Mixed size (Mix & Match)"`` -> ``"mixed-size-mix-match"``."""
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")


def _select(text: str, section: str, where: str) -> str:
    # the title and intro before the first "## " heading, then the matching "## " sections
    parts = re.split(r"(?m)^(?=## )", text)
    chosen = [p for p in parts[1:] if slug(p.splitlines()[0][3:]).startswith(section)]
    if not chosen:
        names = ", ".join(slug(p.splitlines()[0][3:]) for p in parts[1:])
        raise ValueError(f"{where}: no '## ' section matches '#{section}' (sections: {names})")
    return parts[0] + "".join(chosen)


def _level_above(page_text: str, pos: int) -> int:
    # the page's own last heading before the marker: spliced bodies and code fences do not count
    before = BLOCK.sub(lambda m: m.group(1), page_text[:pos])
    levels = HEADING.findall(FENCE.sub("", before))
    return len(levels[-1]) if levels else 0


def body(root: Path, key: str, page: Path, level: int) -> str:
    """The text spliced for block ``key`` into ``page`` below a heading of ``level`` ``#``s."""
    name, _, section = key.partition("#")
    source = root / "results" / f"{name}.md"
    if not source.is_file():
        return f"_results/{name}.md not produced yet: run the experiment named above._\n"
    text = source.read_text()
    if section:
        text = _select(text, section, f"{page.relative_to(root)}, block '{key}' of {source.relative_to(root)}")
    text = HEADING.sub(lambda m: "#" * min(len(m.group(1)) + level, 6) + " ", text)
    results = Path(os.path.relpath(root / "results", page.parent)).as_posix()
    text = re.sub(r"\]\((?!https?:|/)([^)]+\.(?:png|svg|jpg))\)", rf"]({results}/\1)", text)
    return text.rstrip() + "\n"


def render(text: str, page: Path, root: Path = ROOT) -> str:
    """``text`` (the contents of ``page``) with every results block refreshed."""
    unclosed = set(OPENING.findall(text)) - {m.group("key") for m in BLOCK.finditer(text)}
    if unclosed:
        raise ValueError(f"{page.relative_to(root)}: results block(s) without a closing marker: {sorted(unclosed)}")
    return BLOCK.sub(lambda m: m.group(1) + body(root, m.group("key"), page, _level_above(text, m.start()))
                     + m.group(4), text)


def stale_blocks(root: Path = ROOT) -> list[str]:
    """One line per block whose text differs from what its results/*.md gives; empty when all are current."""
    out = []
    for page in pages(root):
        text = page.read_text()
        fresh = {m.group("key"): m.group("body") for m in BLOCK.finditer(render(text, page, root))}
        for m in BLOCK.finditer(text):
            if m.group("body") != fresh[m.group("key")]:
                name = m.group("key").partition("#")[0]
                out.append(f"{page.relative_to(root)}: block '{m.group('key')}' differs from results/{name}.md")
    return out


def main(argv: list[str] | None = None, root: Path = ROOT) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report stale blocks; exit 1 if there are any")
    args = ap.parse_args(argv)
    if args.check:
        stale = stale_blocks(root)
        for line in stale:
            print(line)
        if stale:
            print("run: python tools/readme_results.py")
        return 1 if stale else 0
    for page in pages(root):
        old = page.read_text()
        new = render(old, page, root)
        if new != old:
            fd, tmp = tempfile.mkstemp(dir=page.parent, prefix=f".{page.name}.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(new)
            os.replace(tmp, page)
            print(f"{page.relative_to(root)}: {len(BLOCK.findall(old))} results blocks refreshed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
