"""Run the book: execute every chapter of ``_toc.yml`` for one profile, then build the HTML.

Chapters never share notebook state; they hand results to each other as files under
``results/<profile>/``. The runner executes them with papermill, injecting the profile name into
each notebook's ``parameters`` cell, and keeps the executed copies in
``results/<profile>/notebooks/``. The source notebooks in ``book/`` stay clean.

**Chapters at once.** A chapter starts as soon as every chapter it reads has finished: the
``needs`` of its ``setup_chapter(...)`` call (:func:`chapter_needs`; a notebook without one, the
landing page, waits for every earlier chapter). Up to ``--jobs`` run at once (default: one per CPU
core, one where a GPU is present), each kernel with one torch thread (``$ENTITY_TRACKING_THREADS``)
while all of them run: two chapters side by side use two cores better than one chapter with two
threads. Of the chapters ready at once, the one that starts the longest chain of chapters still to
run (by their last run times, :func:`critical_paths`) starts first. The cores of the chapters
not running go to those that are (:mod:`entity_tracking.book.threads`): the circuit chapter, which
every other one waits for, runs alone on every core, and so does the last one still running. The
thread count changes no number of the book.

A chapter is skipped when nothing it depends on changed: its fingerprint hashes the notebook's
cells, the profile file, the library's source and the fingerprints of every earlier chapter
(whose artifacts it may read). ``--force`` runs everything again. A failing chapter stops the run
(no chapter starts after it; one already running finishes) with an error naming the chapter and the
executed notebook that holds the traceback; its partial outputs are kept under a ``.failed.ipynb``
name, never under the name a later run would trust.

Finally the executed notebooks, the markdown pages and the two config files are staged in
``_build/stage/`` and built with ``jupyter-book build -W`` into ``_build/html/``.

**The profile** may be a name (``params/<name>.yaml``) or a YAML file anywhere on disk. Chapters
always receive the profile's *name* (results live in ``results/<name>/``); a file outside
``params/`` is listed in ``$ENTITY_TRACKING_PROFILES`` for the kernels, so that every chapter, and
any earlier chapter it runs on its own, resolves that name to the same file.

**Progress.** While chapters execute, the console shows one line that updates: for each running
chapter, cells done out of its code cells, the section being executed (the last ``#``/``##``
heading above the running cell) and the time elapsed; starts and ends are printed above it. When
stdout is not a terminal (CI logs) a new line, led by the chapter's name, is printed at each change
of section instead. The run ends with each chapter's time and where its page is.

**What readers see** (:func:`prepare_for_readers`, one rule applied to every executed notebook
and again when the book is staged; no tag is set by hand):

* the bootstrap cell (``try: import entity_tracking ... except ImportError``, which only installs
  the library in Colab) and the ``parameters`` / ``injected-parameters`` cells get ``remove-cell``:
  they are plumbing, and the setup cell already prints the profile and the device;
* every other code cell longer than :data:`SHORT_CELL_LINES` non-blank lines gets ``hide-input``:
  a reader comes for the argument and the evidence (the outputs), and the code stays one click away
  on the page; a short cell stays visible, because a line or two that names what is shown
  (``pd.DataFrame(...)``, one library call) reads like a caption;
* any other cell that already carries a display tag is left as its author tagged it; ``show-input``
  keeps a long cell's code visible.

Saved outputs hold no warnings, no progress bars and no path of the build machine
(:func:`clean_outputs`): the kernels run with :data:`KERNEL_ENV` (tqdm, hub and transformers
progress bars off, transformers logging at ``error``, Python warnings ignored), and after execution
every ``stderr`` line that is a progress bar or a warning (with its source line) is dropped, as
are tqdm widgets (with their saved widget state) and a cell's bare ``PosixPath(...)`` value (what
a writer returned), and the repository root, the results folder, the home folder and site-packages prefixes are written as
relative paths. Tables show no default ``0..n-1`` index: ``setup_chapter`` registers a DataFrame
HTML formatter in each kernel (:mod:`entity_tracking.book`).

**The repository URL** is one setting, ``repository.url`` in ``_config.yml``: the launch buttons read
it, and :func:`sync_bootstrap` writes it into the bootstrap cell of every notebook (the only place
a fresh Colab kernel can find it before the library is installed); ``$ENTITY_TRACKING_REPO``
overrides it at run time. The runner warns when a notebook's cell and ``_config.yml`` disagree.

Command line (also what ``make book`` runs)::

    python -m entity_tracking.book.runner --profile default [--force] [--only data] [--no-book] [--jobs 2]
    python -m entity_tracking.book.runner --profile path/to/mine.yaml
    python -m entity_tracking.book.runner --sync-bootstrap   # after editing repository.url
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence, TextIO

import yaml

from ..config import (
    PROFILES_ENV,
    ROOT_ENV,
    ProfileError,
    find_repo_root,
    load_profile,
    profile_path,
)
from ..io import (
    RESULTS_ENV,
    ResultsPaths,
    atomic_path,
    atomic_write_text,
    read_json,
    write_json,
)
from .browser import BrowserNotFound, screenshot
from .threads import SHARE_ENV, write_share

__all__ = [
    "Chapter",
    "ChapterFailed",
    "ChapterRun",
    "KERNEL_ENV",
    "SHORT_CELL_LINES",
    "bootstrap_source",
    "build_book",
    "chapter_needs",
    "critical_paths",
    "chapters_from_toc",
    "clean_outputs",
    "default_jobs",
    "execute_chapters",
    "main",
    "prepare_for_readers",
    "repository_url",
    "run_chapters",
    "sync_bootstrap",
]


class ChapterFailed(RuntimeError):
    """A chapter raised while executing; the message names the notebook with the traceback."""


@dataclass(frozen=True)
class Chapter:
    name: str  # the toc entry without suffix, e.g. "book/data"
    source: Path  # the clean source file (.ipynb or .md)

    @property
    def is_notebook(self) -> bool:
        return self.source.suffix == ".ipynb"

    @property
    def stem(self) -> str:
        return Path(self.name).name


def _toc_entries(node) -> list[str]:
    out: list[str] = []
    if isinstance(node, dict):
        if "file" in node:
            out.append(node["file"])
        for key in ("parts", "chapters", "sections"):
            for child in node.get(key, []) or []:
                out.extend(_toc_entries(child))
    return out


def chapters_from_toc(root: Path) -> list[Chapter]:
    """Every page of ``_toc.yml`` in reading order (root page first)."""
    toc_file = root / "_toc.yml"
    toc = yaml.safe_load(toc_file.read_text(encoding="utf-8"))
    names = [toc["root"], *_toc_entries(toc)]
    chapters = []
    for name in names:
        for suffix in (".ipynb", ".md"):
            src = root / f"{name}{suffix}"
            if src.is_file():
                chapters.append(Chapter(name, src))
                break
        else:
            raise FileNotFoundError(f"{toc_file}: entry '{name}' has no {name}.ipynb or {name}.md")
    return chapters


def _execution_order(root: Path) -> list[Chapter]:
    """The toc's notebooks in order, except the root page (the landing page summarises every
    chapter's results), which runs last."""
    chapters = [c for c in chapters_from_toc(root) if c.is_notebook]
    toc_root = yaml.safe_load((root / "_toc.yml").read_text(encoding="utf-8"))["root"]
    return [c for c in chapters if c.name != toc_root] + [c for c in chapters if c.name == toc_root]


# --- what readers see ------------------------------------------------------------------------

#: A code cell with more non-blank lines than this gets ``hide-input`` (see the module docstring).
SHORT_CELL_LINES = 4

#: The longest one cell may run before the chapter fails instead of waiting for ever (a kernel
#: that stops answering, e.g. a widget cell that never replies, once stalled a build); set
#: ``ENTITY_TRACKING_CELL_TIMEOUT`` (seconds) for slow GPU sweeps on the paper's models.
CELL_TIMEOUT_S = 3 * 3600
#: The estimated seconds of a chapter with no recorded run (see :func:`critical_paths`).
UNKNOWN_CHAPTER_SECONDS = 1.0
#: Jupyter Book display tags; a cell carrying one is left as its author tagged it.
DISPLAY_TAGS = frozenset({"hide-input", "hide-output", "hide-cell", "remove-input", "remove-output",
                          "remove-cell", "show-input"})


def _source(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def is_bootstrap(cell) -> bool:
    """The cell that installs the library in a fresh kernel (``try: import entity_tracking``)."""
    src = _source(cell).lstrip()
    return cell.get("cell_type") == "code" and src.startswith("try:") and "import entity_tracking" in src \
        and "except ImportError" in src


def reader_tags(cell) -> list[str]:
    """The display tags the rule adds to one cell (none for markdown or an already tagged cell)."""
    if cell.get("cell_type") != "code":
        return []
    tags = set(cell.get("metadata", {}).get("tags", []))
    if is_bootstrap(cell) or tags & {"parameters", "injected-parameters"}:
        return [] if "remove-cell" in tags else ["remove-cell"]
    if tags & DISPLAY_TAGS:
        return []
    if sum(1 for line in _source(cell).splitlines() if line.strip()) > SHORT_CELL_LINES:
        return ["hide-input"]
    return []


def prepare_for_readers(nb: dict) -> dict:
    """Apply the display rule to every cell of a notebook (in place; idempotent); return it."""
    for cell in nb.get("cells", []):
        extra = reader_tags(cell)
        if extra:
            meta = cell.setdefault("metadata", {})
            meta["tags"] = list(meta.get("tags", [])) + extra
    return nb


_BAR = re.compile(r"\d+%\|.*\||\d+/\d+ \[\d|it/s\]|s/it\]|\[\d\d:\d\d<")
_PATH_REPR = re.compile(r"^(Posix|Windows)?Path\((['\"]).*\2\)$", re.S)
_WARNING = re.compile(r"(^|: )\w*Warning: |^\w*Warning: |^warnings\.warn\(")


def _is_bar(line: str) -> bool:
    return bool(_BAR.search(line))


def _strip_stream(text: str, stderr: bool) -> str:
    """Drop progress-bar lines (and, on stderr, warnings with their indented source lines)."""
    kept: list[str] = []
    in_warning = False
    for line in text.split("\n"):
        line = line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r")
        if _is_bar(line):
            in_warning = False
            continue
        if stderr and _WARNING.search(line):
            in_warning = True
            continue
        if in_warning and (line.startswith((" ", "\t")) or not line.strip()):
            continue
        in_warning = False
        kept.append(line)
    return "\n".join(kept)


def _path_scrubber(root: Optional[Path]):
    """A function that rewrites this machine's absolute paths in a text as relative ones."""
    pairs: list[tuple[str, str]] = []
    results = os.environ.get(RESULTS_ENV)
    if results:
        pairs.append((str(Path(results).resolve()), "results"))
    if root is not None:
        pairs.append((str(Path(root).resolve()), "."))
    home = str(Path.home())
    if len(home) > 1:
        pairs.append((home, "~"))
    pairs.sort(key=lambda p: -len(p[0]))
    site = re.compile(r"(?:[A-Za-z]:)?[/\\][^\s'\"<>()]*?[/\\](?:site|dist)-packages[/\\]")

    def scrub(text: str) -> str:
        text = site.sub("", text)
        for path, short in pairs:
            text = text.replace(path + "/", "" if short == "." else short + "/").replace(path, short)
        return text

    return scrub


def _scrub_value(value, scrub):
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, list):
        return [_scrub_value(v, scrub) for v in value]
    return value


def clean_outputs(nb: dict, root: Optional[Path] = None) -> dict:
    """Remove warnings and progress bars from a notebook's saved outputs and write this machine's
    absolute paths as relative ones (in place; idempotent); return the notebook."""
    scrub = _path_scrubber(root)
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        outputs = []
        for out in cell.get("outputs", []):
            kind = out.get("output_type")
            if kind == "stream":
                text = _strip_stream("".join(out.get("text", "")), out.get("name") == "stderr")
                if not text.strip():
                    continue
                out["text"] = scrub(text)
            elif kind in ("display_data", "execute_result"):
                data = out.get("data", {})
                plain = "".join(data.get("text/plain", ""))
                if "application/vnd.jupyter.widget-view+json" in data and _is_bar(plain):
                    continue  # a tqdm.notebook bar
                if kind == "execute_result" and set(data) == {"text/plain"} and _PATH_REPR.match(plain):
                    continue  # the path a writer returned as a cell's last value: plumbing, not evidence
                for mime, value in list(data.items()):
                    if mime.startswith("text/"):
                        data[mime] = _scrub_value(value, scrub)
            elif kind == "error":
                out["evalue"] = scrub(out.get("evalue", ""))
                out["traceback"] = [scrub(t) for t in out.get("traceback", [])]
            outputs.append(out)
        cell["outputs"] = outputs
    _prune_widget_state(nb)
    meta = nb.get("metadata", {}).get("papermill")
    if isinstance(meta, dict):
        for key in ("input_path", "output_path", "cwd"):
            if isinstance(meta.get(key), str):
                meta[key] = scrub(meta[key])
    return nb


_WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
_WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def _prune_widget_state(nb: dict) -> None:
    """Keep in the notebook's saved widget state only the models that a remaining output shows
    (and those they refer to): the state of a dropped progress bar would still reach the page."""
    state = nb.get("metadata", {}).get("widgets", {}).get(_WIDGET_STATE, {}).get("state")
    if not isinstance(state, dict):
        return
    todo = [out["data"][_WIDGET_VIEW].get("model_id") for cell in nb.get("cells", [])
            for out in cell.get("outputs", []) if _WIDGET_VIEW in out.get("data", {})]
    keep: set[str] = set()
    while todo:
        mid = todo.pop()
        if mid in keep or mid not in state:
            continue
        keep.add(mid)
        todo += re.findall(r"IPY_MODEL_([0-9a-f]+)", json.dumps(state[mid]))
    for mid in [m for m in state if m not in keep]:
        del state[mid]
    if not state:
        del nb["metadata"]["widgets"]


def _for_readers(path: Path, root: Path) -> None:
    """Apply :func:`prepare_for_readers` and :func:`clean_outputs` to a notebook file."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    text = json.dumps(clean_outputs(prepare_for_readers(nb), root), indent=1, ensure_ascii=False) + "\n"
    atomic_write_text(path, text)


#: The environment every chapter's kernel runs in: no progress bars, no warnings in saved outputs.
KERNEL_ENV: dict[str, str] = {
    "TQDM_DISABLE": "1",  # every tqdm bar, ours and the libraries'
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub (downloads, "Writing model shards")
    "TRANSFORMERS_VERBOSITY": "error",  # transformers' logger ("Loading weights", advice)
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",  # the tokenizers fork warning
    "PYTHONWARNINGS": "ignore",  # FutureWarning and friends, which print the build machine's paths
    "ENTITY_TRACKING_BATCH": "1",  # no interactive widgets: nobody moves them (attention.explorer)
}


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- console progress -------------------------------------------------------------------------


def _headings(nb: dict) -> list[str]:
    """For every cell, the last ``#``/``##`` markdown heading at or above it ('' before any)."""
    current, out = "", []
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            for line in _source(cell).splitlines():
                m = re.match(r"^\s{0,3}#{1,2}\s+(.+?)\s*#*\s*$", line)
                if m:
                    current = m.group(1)
        out.append(current)
    return out


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _Board:
    """The console while chapters run: on a terminal one line, updated in place (refreshed every
    second by a thread, so a long cell still shows the time moving), holding every running
    chapter's progress; elsewhere a new line per message. Messages (:meth:`say`) are printed above
    the line, so two chapters running at once never write into each other's text."""

    def __init__(self, stream: Optional[TextIO] = None, tty: Optional[bool] = None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.active: list["_Progress"] = []
        self._lock = threading.RLock()
        self._width = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _text(self) -> str:
        text = "  |  ".join(p.line(compact=len(self.active) > 1) for p in self.active)
        cols = shutil.get_terminal_size((160, 24)).columns - 1
        return text if len(text) <= cols else text[: cols - 1] + "…"

    def draw(self) -> None:
        with self._lock:
            if not self.tty or not self.active:
                return
            text = self._text()
            self.stream.write("\r" + text + " " * max(0, self._width - len(text)))
            self._width = len(text)
            self.stream.flush()

    def _clear(self) -> None:
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0

    def say(self, msg: str) -> None:
        """Print ``msg`` on a line of its own (above the progress line on a terminal)."""
        with self._lock:
            self._clear()
            self.stream.write(msg + "\n")
            self.stream.flush()
            self.draw()

    def enter(self, progress: "_Progress") -> None:
        with self._lock:
            self.active.append(progress)
            if self.tty and self._thread is None:
                self._stop.clear()
                self._thread = threading.Thread(target=self._tick, daemon=True)
                self._thread.start()
            self.draw()

    def leave(self, progress: "_Progress") -> None:
        with self._lock:
            self.active.remove(progress)
            thread = self._thread if not self.active else None
            if thread is not None:
                self._thread = None
                self._stop.set()
        if thread is not None:
            thread.join()
        with self._lock:
            if self.active:
                self.draw()
            else:
                self._clear()
                self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self.draw()


class _Progress:
    """One chapter's progress on a :class:`_Board` (its own when none is given): cells done out
    of the chapter's code cells, the section being executed and the time elapsed; off a terminal,
    a new line at each change of section."""

    def __init__(self, tag: str, nb: dict, stream: Optional[TextIO] = None, tty: Optional[bool] = None,
                 board: Optional[_Board] = None):
        self.tag = tag
        self.board = board or _Board(stream, tty)
        self.attach(nb)
        self.done, self.section = 0, ""
        self.t0 = time.perf_counter()

    def attach(self, nb: dict) -> None:
        """Read cells and headings from the notebook being executed (with papermill's injected cell)."""
        self.headings = _headings(nb)
        self.code = {i for i, c in enumerate(nb.get("cells", [])) if c.get("cell_type") == "code"}
        self.total = len(self.code)

    def line(self, compact: bool = False) -> str:
        width = 24 if compact else 60
        section = self.section if len(self.section) <= width else self.section[: width - 1] + "…"
        return f"{self.tag}: {self.done}/{self.total} cells · {section} · {_clock(time.perf_counter() - self.t0)}"

    def __enter__(self) -> "_Progress":
        self.t0 = time.perf_counter()
        self.board.enter(self)
        return self

    def __exit__(self, *exc) -> None:
        self.board.leave(self)

    def cell_start(self, index: Optional[int]) -> None:
        if index is None or index not in self.code:
            return
        section = self.headings[index] if index < len(self.headings) else ""
        if section != self.section:
            self.section = section
            if self.board.tty:
                self.board.draw()
            else:
                self.board.say(self.line())

    def cell_complete(self, index: Optional[int]) -> None:
        if index is not None and index in self.code:
            self.done += 1
            self.board.draw()


def _progress_engine():
    """Papermill's nbclient engine, reporting each cell's start and end to a :class:`_Progress`
    (passed to ``execute_notebook`` as ``progress=``)."""
    from papermill.engines import NBClientEngine, papermill_engines

    class ProgressEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, progress: Optional[_Progress] = None, **kwargs):
            if progress is not None:
                progress.attach(nb_man.nb)
                start, complete = nb_man.cell_start, nb_man.cell_complete

                def cell_start(cell, cell_index=None, **kw):
                    progress.cell_start(cell_index)
                    return start(cell, cell_index, **kw)

                def cell_complete(cell, cell_index=None, **kw):
                    progress.cell_complete(cell_index)
                    return complete(cell, cell_index, **kw)

                nb_man.cell_start, nb_man.cell_complete = cell_start, cell_complete
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    papermill_engines.register("entity-tracking", ProgressEngine)
    return "entity-tracking"


# --- the repository URL -----------------------------------------------------------------------

#: The bootstrap cell of every chapter; ``{url}`` is ``repository.url`` of ``_config.yml``.
BOOTSTRAP = '''try:  # the library: installed in a checkout (`make install`) and in the book's build
    import entity_tracking
except ImportError:  # a fresh Colab kernel: clone the book's repository, install it, import it from the clone
    import subprocess, sys
    subprocess.run(f"git clone -q --depth=1 ${{{{ENTITY_TRACKING_REPO:-{url}}}}} entity-tracking && {{sys.executable}} -m pip install -q -e 'entity-tracking[book]'", shell=True, check=True)
    sys.path.insert(0, "entity-tracking/lib")  # the editable install's path file is read by the next kernel only'''


def repository_url(root: Path) -> str:
    """``repository.url`` of the book's ``_config.yml``."""
    cfg = yaml.safe_load((Path(root) / "_config.yml").read_text(encoding="utf-8")) or {}
    url = (cfg.get("repository") or {}).get("url")
    if not url:
        raise ValueError(f"{Path(root) / '_config.yml'}: no repository.url")
    return str(url)


def bootstrap_source(url: str) -> str:
    """The bootstrap cell's source for a repository URL."""
    return BOOTSTRAP.format(url=url)


def _source_lines(text: str) -> list[str]:
    lines = text.split("\n")
    return [line + "\n" for line in lines[:-1]] + [lines[-1]]


def sync_bootstrap(root: Path, check: bool = False) -> list[Path]:
    """Write :func:`bootstrap_source` of ``_config.yml``'s URL into the bootstrap cell of every
    notebook of the toc, touching nothing else; return the notebooks that differed (with
    ``check=True``, only report them)."""
    want = bootstrap_source(repository_url(root))
    changed = []
    for ch in chapters_from_toc(Path(root)):
        if not ch.is_notebook:
            continue
        text = ch.source.read_text(encoding="utf-8")
        nb = json.loads(text)
        cells = [c for c in nb["cells"] if is_bootstrap(c)]
        if not cells or all(_source(c) == want for c in cells):
            continue
        changed.append(ch.source)
        if check:
            continue
        for c in cells:
            c["source"] = _source_lines(want)
        atomic_write_text(ch.source, json.dumps(nb, indent=1, ensure_ascii=False) + "\n")  # as Jupyter writes
    return changed


def _notebook_digest(path: Path) -> str:
    """Hash of a notebook's cell types and sources only (outputs and metadata ignored)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    cells = [(c.get("cell_type"), "".join(c.get("source", ""))) for c in nb.get("cells", [])]
    return hashlib.sha256(json.dumps(cells).encode()).hexdigest()


def library_digest() -> str:
    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parent
    for f in sorted(pkg.rglob("*.py")):
        h.update(str(f.relative_to(pkg)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _fingerprint(chapter: Chapter, profile_file: Path, lib: str, upstream: str) -> str:
    parts = [_notebook_digest(chapter.source), hashlib.sha256(profile_file.read_bytes()).hexdigest(), lib, upstream]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _log(msg: str) -> None:
    print(msg, flush=True)


@dataclass(frozen=True)
class ChapterRun:
    """What happened to one chapter in a run."""

    chapter: Chapter
    notebook: Path  # the executed notebook
    status: str  # "ran", "up to date" or "not selected"
    seconds: Optional[float]  # this run's time, or the last run's for a chapter not run again


#: Torch threads of each chapter's kernel (default 1): the kernels' matrices are small, two
#: threads on two shared cores ran slower than one (contention), and one thread per kernel lets
#: two independent chapters run at once (:func:`default_jobs`).
THREADS_ENV = "ENTITY_TRACKING_THREADS"
#: How many chapters may run at once (default :func:`default_jobs`).
JOBS_ENV = "ENTITY_TRACKING_JOBS"


def kernel_threads() -> int:
    return max(1, int(os.environ.get(THREADS_ENV) or 1))


def default_jobs() -> int:
    """Chapters run at once: ``$ENTITY_TRACKING_JOBS``, else one per :func:`kernel_threads` CPU
    cores, but one where a GPU is present (each chapter loads its models onto it)."""
    if os.environ.get(JOBS_ENV):
        return max(1, int(os.environ[JOBS_ENV]))
    import torch

    if torch.cuda.is_available():
        return 1
    return max(1, (os.cpu_count() or 1) // kernel_threads())


def _kernel_environment(root: Path, pfile: Path) -> dict[str, str]:
    env = dict(KERNEL_ENV)
    env[ROOT_ENV] = str(root)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(kernel_threads())
    if pfile.parent.resolve() != (root / "params").resolve():
        listed = [p for p in os.environ.get(PROFILES_ENV, "").split(os.pathsep) if p]
        env[PROFILES_ENV] = os.pathsep.join([str(pfile), *[p for p in listed if p != str(pfile)]])
    return env


def _check_bootstrap(root: Path) -> None:
    try:
        stale = sync_bootstrap(root, check=True)
    except (OSError, ValueError):
        return
    if stale:
        names = ", ".join(str(p.relative_to(root)) for p in stale)
        _log(f"warning: the bootstrap cell of {names} does not clone _config.yml's repository.url; "
             f"run `python -m entity_tracking.book.runner --sync-bootstrap`")


def _declared_needs(nb: dict) -> Optional[list[str]]:
    """The ``needs`` of the notebook's ``setup_chapter(...)`` call (``[]`` without the keyword),
    or None when no cell calls it."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code" or "setup_chapter" not in _source(cell):
            continue
        try:
            tree = ast.parse(_source(cell))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "setup_chapter":
                kw = {k.arg: k.value for k in node.keywords}
                value = kw.get("needs", node.args[2] if len(node.args) > 2 else None)
                try:
                    return [str(n) for n in ast.literal_eval(value)] if value is not None else []
                except ValueError:
                    return None
    return None


def chapter_needs(chapters: list[Chapter]) -> dict[str, set[str]]:
    """For each notebook (by stem), the earlier chapters whose artifacts it reads: the ``needs``
    its ``setup_chapter`` call declares (the same list that makes a chapter opened on its own run
    them first); every earlier chapter for a notebook that declares none (the landing page)."""
    out: dict[str, set[str]] = {}
    for i, ch in enumerate(chapters):
        earlier = [c.stem for c in chapters[:i]]
        needs = _declared_needs(json.loads(ch.source.read_text(encoding="utf-8")))
        out[ch.stem] = set(earlier) if needs is None else {n for n in needs if n in earlier}
    return out


def execute_chapters(
    profile: str | os.PathLike,
    root: Path | None = None,
    force: bool = False,
    only: list[str] | None = None,
    kernel_name: str = "python3",
    progress: Optional[bool] = None,
    jobs: Optional[int] = None,
) -> list[ChapterRun]:
    """Execute the toc's notebooks for ``profile`` (a name in ``params/`` or a YAML file anywhere);
    return what happened to each chapter, in toc order.

    Up to ``jobs`` chapters (default :func:`default_jobs`) run at once, each as soon as every
    chapter it reads (:func:`chapter_needs`) has run. ``only`` restricts execution to chapters
    whose stem is listed (earlier chapters must then already have run: their artifacts are read
    from disk). ``progress=False`` prints one line per chapter instead of the running progress
    line. When a chapter fails no other chapter starts; those already running finish, and
    :class:`ChapterFailed` names the failed one.
    """
    import papermill as pm

    root = Path(root) if root is not None else find_repo_root()
    prof = load_profile(profile, root)  # validate before anything runs
    pfile = profile_path(profile, root)
    paths = ResultsPaths.for_profile(prof.name, root)
    stamps = paths.root / ".stamps"
    lib = library_digest()
    upstream = ""
    runs: dict[str, ChapterRun] = {}
    notebooks = _execution_order(root)
    os.environ[ROOT_ENV] = str(root)
    env = _kernel_environment(root, pfile)
    engine = _progress_engine()
    board = _Board()
    _check_bootstrap(root)
    todo: list[tuple[Chapter, str, str]] = []
    # each chapter's last run time: the longest chain of chapters starts first. A chapter never run
    # here (a fresh checkout) counts one second, so the chain with the most chapters still leads
    # (dcm, which cmap needs, before the chapters nothing needs: the book's long pole)
    estimates: dict[str, float] = {}
    for i, ch in enumerate(notebooks, 1):
        fp = _fingerprint(ch, pfile, lib, upstream)
        upstream = fp
        out = paths.notebooks / f"{ch.stem}.ipynb"
        stamp = stamps / f"{ch.stem}.json"
        tag = f"[{i}/{len(notebooks)}] {ch.stem}"
        last = read_json(stamp).get("seconds") if stamp.exists() else None
        estimates[ch.stem] = float(last or UNKNOWN_CHAPTER_SECONDS)
        if only and ch.stem not in only:
            _log(f"{tag}: not selected")
            if out.exists():
                runs[ch.stem] = ChapterRun(ch, out, "not selected", last)
            continue
        if not force and out.exists() and stamp.exists() and read_json(stamp).get("fingerprint") == fp:
            _log(f"{tag}: up to date, not run again ({out})")
            runs[ch.stem] = ChapterRun(ch, out, "up to date", last)
            continue
        todo.append((ch, fp, tag))

    def start(ch: Chapter, fp: str, tag: str) -> None:
        stamp = stamps / f"{ch.stem}.json"
        if stamp.exists():
            stamp.unlink()
        board.say(f"{tag}: running {ch.source.relative_to(root)} on profile '{prof.name}' ...")

    def execute(ch: Chapter, fp: str, tag: str) -> ChapterRun:
        out = paths.notebooks / f"{ch.stem}.ipynb"
        stamp = stamps / f"{ch.stem}.json"
        failed = out.with_suffix(".failed.ipynb")
        t0 = time.perf_counter()
        nb = json.loads(ch.source.read_text(encoding="utf-8"))
        shown = _Progress(tag, nb, board=board) if progress is not False else None
        with atomic_path(out, suffix=".ipynb") as tmp:
            try:
                with shown or contextlib.nullcontext():
                    pm.execute_notebook(
                        str(ch.source),
                        str(tmp),
                        parameters={"profile": prof.name},
                        kernel_name=kernel_name,
                        cwd=str(ch.source.parent),
                        engine_name=engine,
                        progress=shown,
                        progress_bar=False,
                        log_output=False,
                        extra_arguments=["--IPKernelApp.log_level=ERROR"],  # no TCP warning mid-line
                        execution_timeout=int(os.environ.get("ENTITY_TRACKING_CELL_TIMEOUT", CELL_TIMEOUT_S)),
                    )
            except Exception as e:  # papermill raises PapermillExecutionError with the cell's error
                if tmp.exists():
                    shutil.copyfile(tmp, failed)
                summary = getattr(e, "ename", type(e).__name__) + ": " + str(getattr(e, "evalue", e))
                raise ChapterFailed(
                    f"chapter '{ch.stem}' ({ch.source.relative_to(root)}) failed on profile '{prof.name}': "
                    f"{summary.strip()[:500]}\n  the executed notebook with the traceback: {failed}"
                ) from None
            _for_readers(tmp, root)
        if failed.exists():
            failed.unlink()
        dt = time.perf_counter() - t0
        write_json(stamp, {"fingerprint": fp, "seconds": round(dt, 2), "chapter": ch.name})
        board.say(f"{tag}: done in {_clock(dt)} -> {out}")
        return ChapterRun(ch, out, "ran", dt)

    needs = chapter_needs(notebooks)
    jobs = jobs or default_jobs()
    share_file = paths.root / ".thread_share"
    share_file.parent.mkdir(parents=True, exist_ok=True)
    env[SHARE_ENV] = str(share_file)

    def share(n_running: int) -> None:  # the cores of the chapters not running go to those that are
        write_share(share_file, max(kernel_threads(), jobs * kernel_threads() // max(1, n_running)))

    with _environment(env):
        for run in _schedule(todo, needs, jobs, start, execute, board,
                             priority=critical_paths([ch.stem for ch, _, _ in todo], needs, estimates),
                             on_change=share):
            runs[run.chapter.stem] = run
    return [runs[ch.stem] for ch in notebooks if ch.stem in runs]


def critical_paths(stems: Sequence[str], needs: Mapping[str, set[str]],
                   seconds: Mapping[str, float]) -> dict[str, float]:
    """For each chapter of ``stems``, the seconds of the longest chain of chapters that starts with
    it (its own ``seconds`` plus the longest chain among the chapters that need it): started
    first, the chapters on the longest chain keep the last chapter from running alone at the end.

    >>> critical_paths(["a", "b", "c"], {"b": {"a"}, "c": {"a"}}, {"a": 1, "b": 5, "c": 2})
    {'a': 6.0, 'b': 5.0, 'c': 2.0}
    """
    out: dict[str, float] = {}
    for stem in reversed(list(stems)):  # needs point to earlier chapters: later ones are done first
        later = [out[s] for s in out if stem in needs.get(s, set())]
        out[stem] = float(seconds.get(stem, 0.0)) + max(later, default=0.0)
    return {s: out[s] for s in stems}


def _schedule(todo: list[tuple[Chapter, str, str]], needs: dict[str, set[str]], jobs: int, start, execute,
              board: _Board, priority: Optional[Mapping[str, float]] = None,
              on_change: Optional[Callable[[int], None]] = None) -> list[ChapterRun]:
    """Run ``execute(*item)`` for every item of ``todo``, ``jobs`` at a time, as soon as every
    chapter an item needs and that is still to run has finished (``start(*item)`` first, in this
    thread, so chapters are announced in order); return the runs. Of the items ready at once the
    highest ``priority`` starts first (:func:`critical_paths`), in toc order among equals.
    ``on_change(n)`` is told the number of chapters running each time it changes.
    After a failure nothing new starts, the running ones finish, and the first failure is raised."""
    rank = {it[0].stem: (-(priority or {}).get(it[0].stem, 0.0), i) for i, it in enumerate(todo)}
    pending = list(todo)
    running: dict[str, threading.Thread] = {}
    done: list[ChapterRun] = []
    errors: list[BaseException] = []
    finished = threading.Condition()

    def work(item) -> None:
        try:
            result = execute(*item)
        except BaseException as e:  # noqa: BLE001 -- handed to the scheduling thread
            result = e
        with finished:
            (errors if isinstance(result, BaseException) else done).append(result)
            del running[item[0].stem]
            if on_change and running:
                on_change(len(running))
            finished.notify_all()

    with finished:
        while pending or running:
            if errors and pending:
                pending.clear()
                if running:
                    board.say(f"a chapter failed: waiting for {', '.join(running)} to finish, starting nothing else")
            blocked = {ch.stem for ch, _, _ in pending} | set(running)
            ready = sorted((it for it in pending if not needs.get(it[0].stem, set()) & blocked),
                           key=lambda it: rank[it[0].stem])[: jobs - len(running)]
            if ready and on_change:  # before the kernels start, so each reads its share first
                on_change(len(running) + len(ready))
            for item in ready:
                pending.remove(item)
                start(*item)
                # a daemon: an interrupted run does not wait for its kernels (they exit with it)
                running[item[0].stem] = t = threading.Thread(target=work, args=(item,), daemon=True)
                t.start()
            if running:
                finished.wait()
            elif pending:  # cannot happen: needs are earlier chapters, so the first pending one is ready
                raise RuntimeError(f"chapters {[ch.stem for ch, _, _ in pending]} wait on each other")
    if errors:
        raise errors[0]
    return done


def run_chapters(
    profile: str | os.PathLike,
    root: Path | None = None,
    force: bool = False,
    only: list[str] | None = None,
    kernel_name: str = "python3",
    jobs: Optional[int] = None,
) -> list[Path]:
    """:func:`execute_chapters`, returning the executed notebooks' paths."""
    return [r.notebook for r in execute_chapters(profile, root, force=force, only=only, kernel_name=kernel_name,
                                                 jobs=jobs)]


def build_book(profile: str | os.PathLike, root: Path | None = None, out_root: Path | None = None,
               strict: bool = True) -> Path:
    """Stage the executed notebooks with the book's pages, build HTML, return its ``index.html``.

    The stage is ``<out_root>/_build/stage`` and the HTML ``<out_root>/_build/html``
    (``out_root`` defaults to the repository root). Every staged notebook goes through
    :func:`prepare_for_readers` and :func:`clean_outputs` again, so the display rule of this library
    applies even to chapters executed before it changed.
    """
    root = Path(root) if root is not None else find_repo_root()
    out_root = Path(out_root) if out_root is not None else root
    profile = load_profile(profile, root).name
    paths = ResultsPaths.for_profile(profile, root)
    stage = out_root / "_build" / "stage"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(root / name, stage / name)
    shutil.copytree(root / "book", stage / "book", ignore=shutil.ignore_patterns("*.ipynb", ".ipynb_checkpoints"))
    missing = []
    for ch in chapters_from_toc(root):
        if not ch.is_notebook:
            continue
        executed = paths.notebooks / f"{ch.stem}.ipynb"
        if not executed.exists():
            missing.append(ch.stem)
            continue
        dest = stage / f"{ch.name}.ipynb"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(executed, dest)
        _for_readers(dest, root)
    if missing:
        raise FileNotFoundError(f"chapters not executed for profile '{profile}': {missing}; run them first")
    launcher = "import sys; from jupyter_book.cli.main import main; sys.exit(main())"
    cmd = [sys.executable, "-c", launcher, "build", str(stage), "--path-output", str(out_root)]
    if strict:
        cmd += ["-W", "--keep-going"]
    _log(f"building the book for profile '{profile}' ...")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"jupyter-book build failed (exit {proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        )
    index = out_root / "_build" / "html" / "index.html"
    if not index.exists():
        raise RuntimeError(f"jupyter-book build succeeded but wrote no {index}")
    _log(f"book built in {time.perf_counter() - t0:.1f} s -> {index}")
    try:

        shot = screenshot(index.parent, f"{yaml.safe_load((root / '_toc.yml').read_text())['root']}.html",
                          index.parent / "landing.png")
        _log(f"landing page screenshot -> {shot}")
    except BrowserNotFound:
        _log("no Chromium here: no landing-page screenshot (install Debian's 'chromium' for one)")
    return index


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m entity_tracking.book.runner", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="default",
                    help="a profile: the name of a file in params/, or a YAML file anywhere (default: default)")
    ap.add_argument("--force", action="store_true", help="run every chapter again even if unchanged")
    ap.add_argument("--only", default=None, help="comma-separated chapter names to run (others are reused)")
    ap.add_argument("--jobs", type=int, default=None,
                    help=f"chapters run at once (default: ${JOBS_ENV}, else one per CPU core, one with a GPU)")
    ap.add_argument("--no-book", action="store_true", help="execute the chapters but do not build the HTML")
    ap.add_argument("--no-run", action="store_true", help="build the HTML from already executed chapters")
    ap.add_argument("--out-root", default=None, help="folder that receives _build/ (default: the repository)")
    ap.add_argument("--sync-bootstrap", action="store_true",
                    help="write _config.yml's repository.url into every notebook's bootstrap cell, and stop")
    args = ap.parse_args(argv)
    root = find_repo_root()
    if args.sync_bootstrap:
        changed = sync_bootstrap(root)
        _log(f"bootstrap cell set to clone {repository_url(root)} in "
             + (", ".join(str(p.relative_to(root)) for p in changed) if changed else "no notebook (all agreed)"))
        return 0
    runs: list[ChapterRun] = []
    index: Optional[Path] = None
    t0 = time.perf_counter()
    try:
        if not args.no_run:
            only = [s.strip() for s in args.only.split(",")] if args.only else None
            runs = execute_chapters(args.profile, root, force=args.force, only=only, jobs=args.jobs)
        if not args.no_book:
            index = build_book(args.profile, root, Path(args.out_root) if args.out_root else None)
    except (ProfileError, ChapterFailed, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _summary(runs, index, time.perf_counter() - t0)
    return 0


def _summary(runs: list[ChapterRun], index: Optional[Path], seconds: float) -> None:
    """Each chapter's time and page, and where the book is."""
    if runs:
        _log("")
        width = max(len(r.chapter.stem) for r in runs)
        rows = []
        for r in runs:
            took = _clock(r.seconds) if r.seconds is not None else "?"
            when = took if r.status == "ran" else f"{r.status} (last run {took})"
            where = (index.parent / f"{r.chapter.name}.html") if index is not None else r.notebook
            rows.append((r.chapter.stem, when, where))
        w2 = max(len(when) for _, when, _ in rows)
        for stem, when, where in rows:
            _log(f"  {stem:<{width}}  {when:<{w2}}  {where}")
    _log(f"total {_clock(seconds)}" + (f"; the book: {index}" if index is not None else ""))


if __name__ == "__main__":
    sys.exit(main())
