"""CPU threads shared between chapters that run at once.

The book's runner (:mod:`entity_tracking.book.runner`) executes independent chapters side by side,
one kernel process each. On a small machine the best use of the cores changes while the book
runs: with two chapters running, each does best with one thread per core it has; alone (the
circuit chapter, which every other chapter waits for, or the last chapter still running) a
chapter can use them all. The runner therefore keeps a small file, named by
``$ENTITY_TRACKING_THREAD_SHARE``, holding the torch thread count each running chapter may use
now, and rewrites it whenever a chapter starts or ends. :func:`follow_share` reads it and sets
``torch.set_num_threads`` to it when it changed; without the variable (a notebook opened by hand,
the tests) it does nothing. The chapter's setup (:func:`entity_tracking.book.setup_chapter`) makes
the kernel call it before every cell (:func:`follow_share_in_cells`): the thread count is the
book's business, and the intervention kernel and the methods never touch it.

Changing the thread count changes no number of the book: on the organism the kernel's logits,
mean-ablation accuracies and DCM masks are bitwise equal with one and two threads
(``tests/test_threads.py`` checks the logits and a DCM mask gradient).

>>> import os
>>> os.environ.pop(SHARE_ENV, None) and None
>>> follow_share()  # no runner: nothing changes
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

__all__ = ["SHARE_ENV", "follow_share", "follow_share_in_cells", "write_share"]

#: The file the runner keeps the per-chapter thread count in.
SHARE_ENV = "ENTITY_TRACKING_THREAD_SHARE"

_seen: dict[str, object] = {"key": None}


def write_share(path: str | os.PathLike, threads: int) -> None:
    """Write the thread count each running chapter may use to ``path`` (atomically: a kernel
    never reads half a number)."""
    if threads < 1:
        raise ValueError(f"a thread share must be at least 1, got {threads}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{int(threads)}\n", encoding="utf-8")
    os.replace(tmp, path)


def follow_share() -> Optional[int]:
    """Set torch's thread count to the runner's current share when it changed since the last
    call; return the count set, or None when there is no share to follow (or it did not change).
    Costs one ``stat`` when nothing changed."""
    where = os.environ.get(SHARE_ENV)
    if not where:
        return None
    try:
        st = os.stat(where)
    except OSError:
        return None
    key = (where, st.st_mtime_ns, st.st_size, st.st_ino)
    if key == _seen["key"]:
        return None
    _seen["key"] = key
    try:
        n = int(Path(where).read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None
    if n < 1:
        return None
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def follow_share_in_cells(shell) -> bool:
    """Make the IPython ``shell`` (a chapter's kernel) call :func:`follow_share` before every cell
    it runs, once however often it is asked; False where there is no shell (plain Python)."""
    if shell is None:
        return False
    if not getattr(shell, "_entity_tracking_follows_share", False):
        shell.events.register("pre_run_cell", lambda *_: follow_share())
        shell._entity_tracking_follows_share = True
    return True
