"""Every ```python block of README.md and docs/*.md runs, so an example that goes stale fails the suite.

Each page runs as one test: its blocks in order, sharing one namespace, in a fresh temporary working
directory (examples may write small tables there). Blocks are found by sybil's Markdown parser.

A block that cannot run here (it needs the 189 GiB DeepSeek-V4.1 download, a GPU or several
processes) is marked by an HTML comment on the line before it, which neither GitHub nor mkdocs shows,
with the reason as a Python string:

    <!-- skip: next "needs several processes (torchrun)" -->

Pages that read files a reader would have on disk get small stand-ins, made here before the page runs
(PAGE_FILES): v41.md finds a miniature DeepSeek-V4.1 checkpoint, in the release's layout, at
DeepSeek-V4.1-Flash/.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable
from pathlib import Path
from unittest import SkipTest

import pytest
from sybil import Document
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def run_page(page: Path) -> tuple[int, list[str]]:
    """Run a page's Python blocks in order in the current directory; return (blocks run, skip reasons)."""
    document = Document.parse(str(page), PythonCodeBlockParser(), SkipParser())
    ran, skipped = 0, []
    try:
        for example in document.examples():
            directive = isinstance(example.parsed, tuple)          # a skip comment: (action, reason)
            if directive and example.parsed[0] == "next" and not example.parsed[1]:
                raise AssertionError(f"{page}, line {example.line}: a skipped block needs a reason, "
                                     f'e.g. <!-- skip: next "needs a GPU" -->')
            try:
                example.evaluate()
            except SkipTest as skip:
                skipped.append(str(skip))
            else:
                ran += not directive
    finally:
        document.namespace.clear()       # tables the page opened close here, inside the test
        gc.collect()
    return ran, skipped


def miniature_v41(v41_release: Callable[..., object], cwd: Path) -> None:
    v41_release(root=cwd / "DeepSeek-V4.1-Flash")


PAGE_FILES = {"docs/v41.md": miniature_v41}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_examples_run(page, tmp_path, monkeypatch, v41_release):
    monkeypatch.chdir(tmp_path)
    make_files = PAGE_FILES.get(str(page.relative_to(ROOT)))
    if make_files is not None:
        make_files(v41_release, tmp_path)
    run_page(page)


def test_the_front_page_and_the_manual_have_examples_that_run():
    pages = {str(p.relative_to(ROOT)) for p in PAGES}
    assert {"README.md", "docs/index.md", "docs/tables.md", "docs/generation.md"} <= pages


def test_the_front_page_links_to_files_that_exist():
    # The manual's own links are checked by `make docs` (--strict); README.md is outside it.
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    relative = [link for link in links if "://" not in link]
    assert "docs/index.md" in relative
    assert [link for link in relative if not (ROOT / link).is_file()] == []


def test_a_stale_example_fails_and_a_marked_one_is_skipped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    page = tmp_path / "page.md"
    page.write_text('Text.\n\n```python\nx = 1\n```\n\n<!-- skip: next "needs a GPU" -->\n```python\n'
                    'raise RuntimeError("not run")\n```\n\n```python\nassert x == 1\nopen("made", "w").close()\n```\n')
    assert run_page(page) == (2, ["needs a GPU"])
    assert (tmp_path / "made").exists()                   # blocks run in the working directory
    page.write_text("```python\nimport engram\nengram.no_such_name\n```\n")
    with pytest.raises(AttributeError, match="no_such_name"):
        run_page(page)
