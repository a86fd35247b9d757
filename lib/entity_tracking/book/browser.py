"""Check the built book the way a reader meets it: served over HTTP and opened in a real browser.

:func:`check_site` serves the HTML folder on a loopback port, opens every page in headless
Chromium (Debian's ``chromium``), and reports every problem a reader would hit: a page that does
not load, a figure whose image the browser could not fetch, an internal link that leads nowhere,
and a page that should show a figure but has none. :func:`screenshot` saves a picture of a page
(the landing page goes beside the build), :func:`screenshot_pages` one of each page. Nothing here
reaches beyond ``127.0.0.1``.
"""

from __future__ import annotations

import functools
import http.server
import shutil
import subprocess
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterable, Iterator

__all__ = ["BrowserNotFound", "check_site", "find_chromium", "screenshot", "screenshot_pages", "serve"]

_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]


class BrowserNotFound(RuntimeError):
    """No Chromium binary on this machine."""


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    raise BrowserNotFound("no Chromium found: install Debian's 'chromium' package (apt-get install -y chromium)")


class _Handler(http.server.SimpleHTTPRequestHandler):
    log: list[tuple[str, int]]

    def log_request(self, code="-", size="-"):  # record, don't print
        self.log.append((urllib.parse.unquote(self.path.split("?")[0]), int(code) if str(code).isdigit() else 0))

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a browser closing early is not an error here
        pass


@contextmanager
def serve(root: Path) -> Iterator[tuple[str, list[tuple[str, int]]]]:
    """Serve ``root`` on ``127.0.0.1`` (a free port); yield the base URL and the request log."""
    log: list[tuple[str, int]] = []
    handler = functools.partial(type("H", (_Handler,), {"log": log}), directory=str(root))
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()


def _chromium(args: list[str], timeout: float = 90) -> str:
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([find_chromium(), *_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img" and a.get("src"):
            self.images.append(a["src"])
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data


def _internal(href: str) -> bool:
    return not href.startswith(("http:", "https:", "mailto:", "javascript:", "data:", "#", "//"))


def check_site(html_dir: Path, pages: Iterable[str], need_figure: Iterable[str] = ()) -> list[str]:
    """Open each page (paths relative to ``html_dir``, e.g. ``book/data.html``) in headless
    Chromium over HTTP; return the problems found (empty when the site is sound). A page listed in
    ``need_figure`` is a problem when the rendered page holds no image."""
    html_dir = Path(html_dir)
    need_figure = set(need_figure)
    problems: list[str] = []
    checked_links: dict[str, int] = {}
    with serve(html_dir) as (base, log):
        for page in pages:
            url = f"{base}/{page}"
            start = len(log)
            dom = _chromium(["--virtual-time-budget=5000", "--dump-dom", url])
            requested = dict(log[start:])
            if requested.get(f"/{page}") != 200:
                problems.append(f"{page}: the page did not load (status {requested.get('/' + page)})")
                continue
            parser = _Links()
            parser.feed(dom)
            if not parser.title.strip():
                problems.append(f"{page}: the page has no title")
            if page in need_figure and not parser.images:
                problems.append(f"{page}: the page shows no figure")
            for src in parser.images:
                if src.startswith("data:"):
                    continue
                target = urllib.parse.urlsplit(urllib.parse.urljoin(url, src)).path
                status = requested.get(urllib.parse.unquote(target))
                if status != 200:
                    problems.append(f"{page}: figure {src} did not load (status {status})")
            for href in parser.links:
                if not _internal(href):
                    continue
                target = urllib.parse.urljoin(url, href).split("#")[0]
                if target not in checked_links:
                    try:
                        with urllib.request.urlopen(target, timeout=10) as r:
                            checked_links[target] = r.status
                    except urllib.error.HTTPError as e:
                        checked_links[target] = e.code
                if checked_links[target] != 200:
                    problems.append(f"{page}: link {href} is broken (status {checked_links[target]})")
            for path, status in log[start:]:
                if status >= 400 and not path.endswith("favicon.ico"):
                    problems.append(f"{page}: the browser's request for {path} failed (status {status})")
    return sorted(set(problems))


def screenshot(html_dir: Path, page: str, out: Path, size: tuple[int, int] = (1280, 1600)) -> Path:
    """Save a PNG of ``page`` as the browser renders it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with serve(Path(html_dir)) as (base, _):
        _chromium([f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=5000",
                   f"--screenshot={out}", f"{base}/{page}"])
    if not out.exists():
        raise RuntimeError(f"chromium wrote no screenshot of {page}")
    return out


def screenshot_pages(html_dir: Path, pages: Iterable[str], out_dir: Path,
                     size: tuple[int, int] = (1280, 1600)) -> list[Path]:
    """A PNG of each page (``book/data.html`` -> ``<out_dir>/book/data.png``), served once."""
    out_dir = Path(out_dir)
    shots = []
    with serve(Path(html_dir)) as (base, _):
        for page in pages:
            out = out_dir / Path(page).with_suffix(".png")
            out.parent.mkdir(parents=True, exist_ok=True)
            _chromium([f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=5000",
                       f"--screenshot={out}", f"{base}/{page}"])
            if not out.exists():
                raise RuntimeError(f"chromium wrote no screenshot of {page}")
            shots.append(out)
    return shots
