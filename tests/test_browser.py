"""The built book in a real browser: pages load, figures resolve, internal links work.

Needs Debian's ``chromium`` (``make test`` installs it). Without it the tests skip, except under
CI (``CI=true``), where a missing browser is a failure."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from entity_tracking.book import runner
from entity_tracking.book.browser import BrowserNotFound, check_site, find_chromium, screenshot, screenshot_pages
from entity_tracking.config import find_repo_root

REPO = find_repo_root(Path(__file__).parent)


@pytest.fixture(scope="module")
def chromium():
    try:
        return find_chromium()
    except BrowserNotFound as e:
        if os.environ.get("CI"):
            pytest.fail(str(e))
        pytest.skip(str(e))


def _pages() -> list[str]:
    return [f"{c.name}.html" for c in runner.chapters_from_toc(REPO)]


def test_every_page_loads_with_its_figures_and_links(chromium, built_book):
    problems = check_site(built_book.parent, _pages())
    assert problems == []


def test_a_removed_figure_is_caught(chromium, built_book, tmp_path):
    site = tmp_path / "html"
    shutil.copytree(built_book.parent, site)
    page = site / "book" / "data.html"
    images = [p for p in (site / "_images").iterdir() if p.name in page.read_text()]
    assert images, "the data chapter should have figures"
    images[0].unlink()
    problems = check_site(site, ["book/data.html"])
    assert any(images[0].name in p and "did not load" in p for p in problems), problems


def test_a_broken_link_is_caught(chromium, built_book, tmp_path):
    site = tmp_path / "html"
    shutil.copytree(built_book.parent, site)
    (site / "book" / "dcm.html").unlink()
    problems = check_site(site, ["book/index.html"])
    assert any("dcm.html" in p for p in problems), problems


def test_landing_page_screenshot_is_saved_with_the_build(chromium, built_book):
    out = screenshot(built_book.parent, "book/index.html", built_book.parent / "landing.png")
    assert out.stat().st_size > 10_000


def _chapter_pages() -> list[str]:
    """The chapters (not the landing page, a table of verdicts): each must show a figure."""
    return [p for p in _pages() if p != f"{runner.chapters_from_toc(REPO)[0].name}.html"]


def test_every_chapter_shows_its_figures_and_is_screenshot(chromium, built_book):
    problems = check_site(built_book.parent, _chapter_pages(), need_figure=_chapter_pages())
    assert problems == []
    shots = screenshot_pages(built_book.parent, _pages(), built_book.parent / "screenshots")
    assert len(shots) == len(_pages())
    for shot in shots:
        assert shot.stat().st_size > 10_000, f"{shot}: an empty page?"


def test_a_chapter_without_figures_is_caught(chromium, built_book, tmp_path):
    site = tmp_path / "html"
    shutil.copytree(built_book.parent, site)
    page = site / "book" / "data.html"
    page.write_text(re.sub(r"<img[^>]*>", "", page.read_text()))
    problems = check_site(site, ["book/data.html"], need_figure=["book/data.html"])
    assert "book/data.html: the page shows no figure" in problems, problems
