"""Run the book: execute every chapter of ``_toc.yml`` for one profile, then build the HTML.

Chapters never share notebook state; they hand results to each other as files under
``results/<profile>/``. The runner therefore executes them one after another with papermill,
injecting the profile name into each notebook's ``parameters`` cell, and keeps the executed
copies in ``results/<profile>/notebooks/``. The source notebooks in ``book/`` stay clean.

A chapter is skipped when nothing it depends on changed: its fingerprint hashes the notebook's
cells, the profile file, the library's source and the fingerprints of every earlier chapter
(whose artifacts it may read). ``--force`` runs everything again. A failing chapter stops the run
with an error naming the chapter and the executed notebook that holds the traceback; its partial
outputs are kept under a ``.failed.ipynb`` name, never under the name a later run would trust.

Finally the executed notebooks, the markdown pages and the two config files are staged in
``_build/stage/`` and built with ``jupyter-book build -W`` into ``_build/html/``.

Command line (also what ``make book`` runs)::

    python -m entity_tracking.runner --profile default [--force] [--only data] [--no-book]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import ROOT_ENV, ProfileError, find_repo_root, load_profile, profile_path
from .io import ResultsPaths, atomic_path, read_json, write_json

__all__ = ["Chapter", "ChapterFailed", "build_book", "chapters_from_toc", "main", "run_chapters"]


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


def _tag_injected_cell(path: Path) -> None:
    """Give papermill's injected-parameters cell the display tags of the parameters cell
    (papermill copies none, so a hidden parameters cell would reappear in the book)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    tags = next((c["metadata"].get("tags", []) for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])), [])
    extra = [t for t in tags if t != "parameters"]
    if not extra:
        return
    for c in nb["cells"]:
        ctags = c["metadata"].get("tags", [])
        if "injected-parameters" in ctags:
            c["metadata"]["tags"] = ctags + [t for t in extra if t not in ctags]
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False), encoding="utf-8")


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


def run_chapters(
    profile: str,
    root: Path | None = None,
    force: bool = False,
    only: list[str] | None = None,
    kernel_name: str = "python3",
) -> list[Path]:
    """Execute the toc's notebooks for ``profile`` in order; return the executed notebook paths.

    ``only`` restricts execution to chapters whose stem is listed (earlier chapters must then
    already have run: their artifacts are read from disk).
    """
    import papermill as pm

    root = Path(root) if root is not None else find_repo_root()
    prof = load_profile(profile, root)  # validate before anything runs
    pfile = profile_path(profile, root)
    paths = ResultsPaths.for_profile(prof.name, root)
    stamps = paths.root / ".stamps"
    lib = library_digest()
    upstream = ""
    executed: list[Path] = []
    notebooks = _execution_order(root)
    os.environ[ROOT_ENV] = str(root)
    for i, ch in enumerate(notebooks, 1):
        fp = _fingerprint(ch, pfile, lib, upstream)
        upstream = fp
        out = paths.notebooks / f"{ch.stem}.ipynb"
        stamp = stamps / f"{ch.stem}.json"
        tag = f"[{i}/{len(notebooks)}] {ch.stem}"
        if only and ch.stem not in only:
            _log(f"{tag}: not selected")
            if out.exists():
                executed.append(out)
            continue
        if not force and out.exists() and stamp.exists() and read_json(stamp).get("fingerprint") == fp:
            _log(f"{tag}: up to date, not run again ({out})")
            executed.append(out)
            continue
        if stamp.exists():
            stamp.unlink()
        failed = out.with_suffix(".failed.ipynb")
        _log(f"{tag}: running {ch.source.relative_to(root)} on profile '{prof.name}' ...")
        t0 = time.perf_counter()
        with atomic_path(out, suffix=".ipynb") as tmp:
            try:
                pm.execute_notebook(
                    str(ch.source),
                    str(tmp),
                    parameters={"profile": prof.name},
                    kernel_name=kernel_name,
                    cwd=str(ch.source.parent),
                    progress_bar=False,
                    log_output=False,
                )
            except Exception as e:  # papermill raises PapermillExecutionError with the cell's error
                if tmp.exists():
                    shutil.copyfile(tmp, failed)
                summary = getattr(e, "ename", type(e).__name__) + ": " + str(getattr(e, "evalue", e))
                raise ChapterFailed(
                    f"chapter '{ch.stem}' ({ch.source.relative_to(root)}) failed on profile '{prof.name}': "
                    f"{summary.strip()[:500]}\n  the executed notebook with the traceback: {failed}"
                ) from None
            _tag_injected_cell(tmp)
        if failed.exists():
            failed.unlink()
        dt = time.perf_counter() - t0
        write_json(stamp, {"fingerprint": fp, "seconds": round(dt, 2), "chapter": ch.name})
        _log(f"{tag}: done in {dt:.1f} s -> {out}")
        executed.append(out)
    return executed


def build_book(profile: str, root: Path | None = None, out_root: Path | None = None, strict: bool = True) -> Path:
    """Stage the executed notebooks with the book's pages, build HTML, return its ``index.html``.

    The stage is ``<out_root>/_build/stage`` and the HTML ``<out_root>/_build/html``
    (``out_root`` defaults to the repository root).
    """
    root = Path(root) if root is not None else find_repo_root()
    out_root = Path(out_root) if out_root is not None else root
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
        from .browser import BrowserNotFound, screenshot

        shot = screenshot(index.parent, f"{yaml.safe_load((root / '_toc.yml').read_text())['root']}.html",
                          index.parent / "landing.png")
        _log(f"landing page screenshot -> {shot}")
    except BrowserNotFound:
        _log("no Chromium here: no landing-page screenshot (install Debian's 'chromium' for one)")
    return index


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m entity_tracking.runner", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="default", help="name of a file in params/ (default: default)")
    ap.add_argument("--force", action="store_true", help="run every chapter again even if unchanged")
    ap.add_argument("--only", default=None, help="comma-separated chapter names to run (others are reused)")
    ap.add_argument("--no-book", action="store_true", help="execute the chapters but do not build the HTML")
    ap.add_argument("--no-run", action="store_true", help="build the HTML from already executed chapters")
    ap.add_argument("--out-root", default=None, help="folder that receives _build/ (default: the repository)")
    args = ap.parse_args(argv)
    root = find_repo_root()
    try:
        if not args.no_run:
            only = [s.strip() for s in args.only.split(",")] if args.only else None
            run_chapters(args.profile, root, force=args.force, only=only)
        if not args.no_book:
            build_book(args.profile, root, Path(args.out_root) if args.out_root else None)
    except (ProfileError, ChapterFailed, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
