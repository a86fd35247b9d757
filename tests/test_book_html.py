"""The built book as its readers meet it: figures on every chapter page, plumbing cells hidden by
the runner's one rule, and no warning, progress bar or path of the build machine anywhere in the
HTML (the `built_book` fixture, in conftest.py: every chapter on the ci profile)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from entity_tracking.book import runner
from entity_tracking.config import find_repo_root
from entity_tracking.io import ResultsPaths

REPO = find_repo_root(Path(__file__).parent)
CHAPTERS = [c for c in runner.chapters_from_toc(REPO) if c.is_notebook]
BAR_TEXT = ("it/s]", "s/it]", "Loading weights", "Writing model shards", "0%|")


def _machine_paths() -> list[str]:
    """Absolute paths that say where and on what this book was built."""
    paths = {str(REPO), str(Path(sys.prefix)), str(Path(sys.executable).parent), "site-packages", "dist-packages"}
    home = str(Path.home())
    if home != "/":
        paths.add(home + "/")
    return sorted(paths)


def _site_files(built_book: Path) -> list[Path]:
    """Every page, and the notebooks the site offers for download (``_sources/``)."""
    html = built_book.parent
    return sorted([*html.rglob("*.html"), *html.rglob("*.ipynb")])


def test_no_path_of_the_build_machine_in_the_site(built_book):
    found = []
    for page in _site_files(built_book):
        text = page.read_text(encoding="utf-8", errors="replace")
        found += [f"{page.relative_to(built_book.parent)}: {p}" for p in _machine_paths() if p in text]
    assert found == []


def test_no_warning_and_no_progress_bar_in_the_pages(built_book):
    found = []
    for ch in CHAPTERS:
        text = (built_book.parent / f"{ch.name}.html").read_text(encoding="utf-8")
        found += [f"{ch.name}: {w}" for w in re.findall(r"\w*Warning\b[^<]{0,60}", text)]
        found += [f"{ch.name}: {b}" for b in BAR_TEXT if b in text]
    assert found == []


def test_executed_notebooks_hold_no_warning_bar_or_path(built_book):
    for ch in CHAPTERS:
        nb = json.loads((ResultsPaths.for_profile("ci", REPO).notebooks / f"{ch.stem}.ipynb").read_text())
        outputs = json.dumps([c.get("outputs", []) for c in nb["cells"]])
        assert not re.search(r"\w+Warning: ", outputs), ch.name
        assert not [b for b in BAR_TEXT if b in outputs], ch.name
        assert not [p for p in _machine_paths() if p in outputs], ch.name


def test_every_chapter_page_has_a_figure(built_book):
    for ch in CHAPTERS[1:]:  # the landing page is a table of verdicts
        text = (built_book.parent / f"{ch.name}.html").read_text(encoding="utf-8")
        assert "<img" in text, f"{ch.name}: no figure"


def test_plumbing_cells_are_hidden_by_the_rule(built_book):
    notebooks = ResultsPaths.for_profile("ci", REPO).notebooks
    for ch in CHAPTERS:
        nb = json.loads((notebooks / f"{ch.stem}.ipynb").read_text())
        for cell in nb["cells"]:
            tags = cell.get("metadata", {}).get("tags", [])
            if runner.is_bootstrap(cell) or {"parameters", "injected-parameters"} & set(tags):
                assert "remove-cell" in tags, (ch.name, tags)
            assert runner.reader_tags(cell) == [], f"{ch.name}: a cell the rule has not tagged: {tags}"
        text = (built_book.parent / f"{ch.name}.html").read_text(encoding="utf-8")
        assert "except ImportError" not in text, f"{ch.name}: the bootstrap cell is on the page"
        assert not re.search(r"profile\s*(<[^>]+>\s*)*=\s*(<[^>]+>\s*)*&quot;ci", text), f"{ch.name}: the parameters"
        if ch.stem != "index":
            assert "tag_hide-input" in text, f"{ch.name}: no collapsed code cell"


def test_tables_show_no_row_number_column(built_book):
    text = (built_book.parent / "book" / "data.html").read_text(encoding="utf-8")
    assert "<table" in text
    assert not re.search(r"<th>0</th>\s*<td>", text), "a default 0..n-1 index column is shown"


def test_a_chapter_runs_from_a_profile_outside_params(tmp_path, monkeypatch):
    """`make book PROFILE=path/to/mine.yaml`: the chapters receive a name they can resolve."""
    mine = tmp_path / "profiles" / "mine.yaml"
    mine.parent.mkdir()
    shutil.copy(REPO / "params" / "ci.yaml", mine)
    monkeypatch.setenv("ENTITY_TRACKING_RESULTS", str(tmp_path / "results"))
    monkeypatch.delenv("ENTITY_TRACKING_PROFILES", raising=False)
    runs = runner.execute_chapters(mine, REPO, only=["data"], progress=False)
    assert [r.chapter.stem for r in runs if r.status == "ran"] == ["data"]
    executed = tmp_path / "results" / "mine" / "notebooks" / "data.ipynb"
    assert executed.exists()
    assert "on profile 'mine'" in executed.read_text()
    assert "ENTITY_TRACKING_PROFILES" not in os.environ
