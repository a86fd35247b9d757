"""Atomic file output and the results layout.

Chapters hand results to each other as files under ``results/<profile>/``. A run can be
interrupted at any moment (a killed kernel, a laptop lid), so every writer here goes through a
temporary file in the same directory followed by :func:`os.replace`, which is atomic on POSIX and
Windows: a reader sees either the old complete file or the new complete file, never a torn one.
Directories (saved models) are built under a temporary name and renamed into place the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from .config import find_repo_root

__all__ = [
    "ResultsPaths",
    "atomic_dir",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "cpu_name",
    "read_json",
    "read_jsonl",
    "save_figure",
    "write_json",
    "write_jsonl",
]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces directory ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            old.rmdir()
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False)


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> Path:
    """Write one JSON object per line, keys sorted, so equal data gives identical bytes."""
    return atomic_write_text(path, "".join(_dumps(r) + "\n" for r in records))


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def save_figure(fig, path: str | os.PathLike, **kwargs) -> Path:
    """Save a matplotlib figure atomically (format from the suffix of ``path``)."""
    path = Path(path)
    kwargs.setdefault("bbox_inches", "tight")
    kwargs.setdefault("dpi", 120)
    with atomic_path(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, **kwargs)
    return path


#: Overrides ``<repo>/results`` as the folder that holds every profile's results.
RESULTS_ENV = "ENTITY_TRACKING_RESULTS"


@dataclass(frozen=True)
class ResultsPaths:
    """Where a profile's artifacts live: ``results/<profile>/{data,models,circuits,...}``."""

    root: Path

    @classmethod
    def for_profile(cls, profile: str, repo_root: str | os.PathLike | None = None) -> "ResultsPaths":

        env = os.environ.get(RESULTS_ENV)
        if env:
            return cls(Path(env) / profile)
        base = Path(repo_root) if repo_root is not None else find_repo_root()
        return cls(base / "results" / profile)

    def _sub(self, name: str) -> Path:
        p = self.root / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def data(self) -> Path:
        return self._sub("data")

    @property
    def models(self) -> Path:
        return self._sub("models")

    @property
    def circuits(self) -> Path:
        return self._sub("circuits")

    @property
    def metrics(self) -> Path:
        return self._sub("metrics")

    @property
    def figures(self) -> Path:
        return self._sub("figures")

    @property
    def notebooks(self) -> Path:
        return self._sub("notebooks")


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s ``model name``, else the platform's), to record beside a
    timing or a trained model: trained weights and times differ between CPUs."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
