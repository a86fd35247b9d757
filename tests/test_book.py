"""End to end: every chapter of _toc.yml executes on the `ci` profile and the book builds with -W
(the `built_book` fixture, in conftest.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from entity_tracking.book import runner
from entity_tracking.config import find_repo_root

REPO = find_repo_root(Path(__file__).parent)


def test_every_chapter_is_a_page(built_book):
    html = built_book.parent
    for ch in runner.chapters_from_toc(REPO):
        page = html / f"{ch.name}.html"
        assert page.is_file(), f"{page} missing"


def test_index_leads_to_the_landing_page(built_book):
    redirect = re.search(r'url=([^"]+)"', built_book.read_text())
    assert redirect, "index.html neither is nor redirects to the landing page"
    landing = built_book.parent / redirect.group(1)
    text = landing.read_text()
    assert "three claims" in text.lower()
    assert "The answer, in this build" in text and "Every verdict" in text and "<table" in text
    assert "Same circuit" in text and "<details>" in text  # the compact answer, each test one click away
    assert 'profile = "ci"' not in text, "the injected parameters cell should be hidden on the landing page"


def test_notebook_pages_embed_figures_and_tables(built_book):
    html = built_book.parent
    for ch in runner.chapters_from_toc(REPO)[1:]:  # chapters; the landing page is tested above
        if not ch.is_notebook:
            continue
        text = (html / f"{ch.name}.html").read_text()
        images = re.findall(r'<img[^>]+src="([^"]+)"', text)
        assert images, f"{ch.name}: no figure in the page"
        for src in images:
            if src.startswith("data:"):
                continue
            assert (html / Path(ch.name).parent / src).resolve().is_file(), f"{ch.name}: broken image {src}"
        assert "<table" in text, f"{ch.name}: no table in the page"
