"""The documentation holds: results blocks match results/*.md, links resolve, the README quickstart runs."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path

import pytest
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
METHODS = ["ptq", "train8", "datafree", "accumulators", "nm-weights", "actgrad-sparsity", "mixed-size",
           "batch-augmentation", "merge", "bench"]


def _tool():
    spec = importlib.util.spec_from_file_location("readme_results", ROOT / "tools" / "readme_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _doc_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_results_blocks_match_their_sources():
    assert _tool().stale_blocks(ROOT) == []


def test_every_relative_link_resolves():
    broken = []
    for page in _doc_pages():
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) < 15_000
    for name in METHODS:
        assert (ROOT / "docs" / "methods" / f"{name}.md").is_file()
        assert f"(docs/methods/{name}.md)" in text, name


def _attribute_chain(node: ast.Attribute) -> list[str] | None:
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return [node.id, *reversed(names)] if isinstance(node, ast.Name) else None


def test_names_in_doc_examples_exist():
    # the examples on the method pages are not run (they train real models), but every thrifty name they use must
    # exist: a renamed config or function breaks this test instead of silently breaking the docs
    missing = []
    for page in _doc_pages():
        for code in re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M):
            tree = ast.parse(code, str(page))
            aliases = {"th": "thrifty", "thrifty": "thrifty"}
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module.split(".")[0] == "thrifty":
                    mod = importlib.import_module(node.module)
                    missing += [f"{page.name}: {node.module}.{a.name}" for a in node.names if not hasattr(mod, a.name)]
                elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                    chain = _attribute_chain(node)
                    if chain and chain[0] in aliases:
                        obj = importlib.import_module(aliases[chain[0]])
                        for i, attr in enumerate(chain[1:], 1):
                            if isinstance(obj, type(importlib)) and not hasattr(obj, attr):
                                try:  # a submodule the package does not import eagerly
                                    obj = importlib.import_module(f"{obj.__name__}.{attr}")
                                    continue
                                except ImportError:
                                    missing.append(f"{page.name}: {'.'.join(chain[:i + 1])}")
                                    break
                            if not hasattr(obj, attr):
                                missing.append(f"{page.name}: {'.'.join(chain[:i + 1])}")
                                break
                            obj = getattr(obj, attr)
    assert missing == [], missing


# functions whose contract is (model(s), config, data...): the config comes first after the model(s);
# the value is the config's position (distill takes the student and its teacher first)
_CONFIG_AT = {"fit": 1, "quantize": 1, "adaprune": 1, "synthesize": 1, "apply": 1, "sparsify": 1,
              "prepare_train8": 1, "finetune_accumulators": 1, "merge": 1, "fs_merge": 1, "distill": 2}


def _looks_like_config(node: ast.expr) -> bool:
    if isinstance(node, ast.Call):
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        return name[:1].isupper()  # a config class: th.PTQ(...), TrainConfig(...), th.NM(...)
    return isinstance(node, ast.Name) and any(k in node.id.lower() for k in ("cfg", "config", "plan"))


def test_doc_examples_pass_the_config_first_after_the_model():
    # the old orders still work for one release with a DeprecationWarning; the docs must show the current one
    wrong = []
    for page in [ROOT / "README.md", *_doc_pages()]:
        for code in re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M):
            for node in ast.walk(ast.parse(code, str(page))):
                if isinstance(node, ast.Call):
                    f = node.func
                    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
                    at = _CONFIG_AT.get(name)
                    if at is not None and len(node.args) > at and not _looks_like_config(node.args[at]):
                        wrong.append(f"{page.name}: {ast.unparse(node)[:80]}")
    assert wrong == [], wrong


def test_readme_quickstart_runs(capsys):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"^## Quickstart\n.*?^```python\n(.*?)^```", text, re.S | re.M).group(1)
    ns: dict = {}
    exec(compile(code, "README.md quickstart", "exec"), ns)
    fp_acc, q_acc = map(float, capsys.readouterr().out.split())
    assert 0.5 < fp_acc <= 1 and 0.5 < q_acc <= 1  # 3 epochs on digits: far above chance (0.1)
    assert not any(type(m).__name__.startswith("Gemm") for m in ns["plain"].modules())
    assert sum(isinstance(m, nn.Linear) for m in ns["plain"].modules()) == 2


def test_readme_transformers_example_runs():
    # the "Models you already have" block: a transformers model calibrated with its tokenizer's output
    text = (ROOT / "README.md").read_text()
    code = re.search(r"^## Models you already have\n.*?^```python\n(.*?)^```", text, re.S | re.M).group(1)
    ns: dict = {}
    exec(compile(code, "README.md transformers example", "exec"), ns)
    model, w8a8 = ns["model"], ns["w8a8"]
    assert sum(type(m).__name__ == "GemmLinear" for m in w8a8.modules()) >= 12  # every Linear of 2 layers + head
    masked = [m for m in model.modules() if type(m).__name__ == "GemmLinear"]
    assert masked, "adaprune wrapped no layer"
    for m in masked:
        w = _plain_weight(m)
        assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()


def _plain_weight(layer: nn.Module):
    import thrifty as th
    return th.strip(nn.Sequential(layer))[0].weight.detach()


def _fake_repo(tmp_path: Path, readme: str, page: str) -> Path:
    (tmp_path / "results").mkdir()
    (tmp_path / "docs" / "methods").mkdir(parents=True)
    (tmp_path / "results" / "r.md").write_text(
        "# Title\n\nintro ![plot](r.png)\n\n## Part a\n\nA = 1\n\n### deeper\n\n## Part b\n\nB = 2\n")
    (tmp_path / "README.md").write_text(readme)
    (tmp_path / "docs" / "methods" / "p.md").write_text(page)
    return tmp_path


def test_splice_nests_headings_selects_sections_and_fixes_image_paths(tmp_path):
    root = _fake_repo(tmp_path, "# R\n\n### Sec\n\n<!-- results:r -->\n<!-- /results:r -->\n",
                      "# P\n\n## Results\n\n```\n# not a heading\n```\n"
                      "<!-- results:r#part-b -->\nold\n<!-- /results:r#part-b -->\n")
    tool = _tool()
    assert len(tool.stale_blocks(root)) == 2
    assert tool.main([], root) == 0
    assert tool.stale_blocks(root) == []
    readme = (root / "README.md").read_text()
    assert "#### Title\n" in readme and "##### Part a\n" in readme and "###### deeper\n" in readme
    assert "![plot](results/r.png)" in readme
    page = (root / "docs" / "methods" / "p.md").read_text()
    assert "### Title\n" in page and "![plot](../../results/r.png)" in page
    assert "#### Part b\n\nB = 2\n" in page and "Part a" not in page and "old" not in page


def test_check_exits_nonzero_naming_the_stale_block(tmp_path, capsys):
    root = _fake_repo(tmp_path, "# R\n", "# P\n\n<!-- results:r#part-a -->\nA = 0\n<!-- /results:r#part-a -->\n")
    before = (root / "docs" / "methods" / "p.md").read_text()
    assert _tool().main(["--check"], root) == 1
    out = capsys.readouterr().out
    assert "docs/methods/p.md: block 'r#part-a' differs from results/r.md" in out
    assert (root / "docs" / "methods" / "p.md").read_text() == before  # --check never writes


@pytest.mark.parametrize("page, message", [
    ("<!-- results:r -->\nno closing marker\n", "without a closing marker"),
    ("<!-- results:r#part-z -->\n<!-- /results:r#part-z -->\n", "no '## ' section matches '#part-z'"),
])
def test_bad_markers_raise_naming_the_file(tmp_path, page, message):
    root = _fake_repo(tmp_path, "# R\n", page)
    with pytest.raises(ValueError, match=message):
        _tool().stale_blocks(root)
