"""Threads shared between chapters (entity_tracking.book.threads) and the runner's order of chapters.

The runner gives a chapter running alone every core; that is only sound if the thread count
changes no number: the kernel's logits and a DCM mask's gradient are bitwise equal with one and
two threads. The share file is followed when it changes and ignored without the runner.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from entity_tracking import task as D
from entity_tracking.book import threads
from entity_tracking.book.runner import _schedule, critical_paths
from entity_tracking.config import ModelSpec, TinySpec
from entity_tracking.intervene.patching import Mean, run
from entity_tracking.load import load_model
from entity_tracking.methods.dcm import masked_logits, source_head_outputs
from entity_tracking.model.tiny import build_tiny_model


@pytest.fixture
def restore_threads(monkeypatch):
    n = torch.get_num_threads()
    threads._seen["key"] = None
    yield monkeypatch
    torch.set_num_threads(n)
    threads._seen["key"] = None


def test_without_the_runner_nothing_changes(restore_threads):
    restore_threads.delenv(threads.SHARE_ENV, raising=False)
    n = torch.get_num_threads()
    assert threads.follow_share() is None
    assert torch.get_num_threads() == n


def test_the_share_is_followed_when_it_changes(restore_threads, tmp_path):
    share = tmp_path / "share"
    restore_threads.setenv(threads.SHARE_ENV, str(share))
    assert threads.follow_share() is None  # the runner has not written it yet
    threads.write_share(share, 2)
    assert threads.follow_share() == 2 and torch.get_num_threads() == 2
    assert threads.follow_share() is None  # unchanged: one stat, nothing set
    threads.write_share(share, 1)
    assert threads.follow_share() == 1 and torch.get_num_threads() == 1


def test_the_kernel_leaves_the_thread_count_to_the_book(restore_threads, tmp_path, tiny):
    share = tmp_path / "share"
    n = torch.get_num_threads()
    threads.write_share(share, n + 1)
    restore_threads.setenv(threads.SHARE_ENV, str(share))
    run(tiny, batch=torch.tensor([[1, 2, 3, 4]]))
    assert torch.get_num_threads() == n


def test_a_chapter_kernel_follows_the_share_before_every_cell(restore_threads, tmp_path):
    class Events:
        def __init__(self):
            self.hooks = []

        def register(self, event, fn):
            self.hooks.append((event, fn))

    class Shell:
        events = Events()

    shell = Shell()
    assert threads.follow_share_in_cells(shell) and threads.follow_share_in_cells(shell)
    assert [e for e, _ in shell.events.hooks] == ["pre_run_cell"]  # registered once
    assert not threads.follow_share_in_cells(None)
    share = tmp_path / "share"
    restore_threads.setenv(threads.SHARE_ENV, str(share))
    threads.write_share(share, 2)
    shell.events.hooks[0][1]()
    assert torch.get_num_threads() == 2


def test_a_share_below_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 1"):
        threads.write_share(tmp_path / "share", 0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    spec = TinySpec(family="llama", n_layers=2, n_heads=4, d_model=128, d_mlp=512, seed=5)
    path = build_tiny_model(spec, tmp_path_factory.mktemp("threads") / "tiny")
    return load_model(ModelSpec(name="tiny", local_path=str(path)), verbose=False)


def _with_threads(n: int, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def test_logits_and_mask_gradients_do_not_depend_on_the_thread_count(tiny):
    pairs = D.encode_pairs(tiny.tokenizer, D.make_path_patching_pairs(tiny.tokenizer, 64, 7, seed=3),
                           padding_side="right")
    base = pairs["base"]
    means = run(tiny, reads=[("z", 0)], batch=base, logits="all").cache["z", 0].mean(0)
    keep = torch.zeros(*base["input_ids"].shape, tiny.arch.n_heads, dtype=torch.bool)
    heads = [(0, 1), (1, 2)]

    def compute():
        logits = run(tiny, [Mean(0, keep, means)], batch=base, logits="all").logits
        src = source_head_outputs(tiny, pairs["source"], heads, "last")
        mask = torch.full((2,), 0.5, requires_grad=True)
        out = masked_logits(tiny, base, src, heads, "last", mask)
        out.gather(1, pairs["target"][:, None]).mean().backward()
        return logits, mask.grad

    one, two = _with_threads(1, compute), _with_threads(2, compute)
    assert torch.equal(one[0], two[0])
    assert torch.equal(one[1], two[1])


def test_the_longest_chain_starts_first_and_the_share_follows_the_running_count():
    class Ch:
        def __init__(self, stem):
            self.stem = stem

    todo = [(Ch(s), "", s) for s in ("circuit", "binding", "dcm", "cmap")]
    needs = {"binding": {"circuit"}, "dcm": {"circuit"}, "cmap": {"dcm"}}
    priority = critical_paths([s for _, _, s in todo], needs, {"circuit": 5, "binding": 4, "dcm": 9, "cmap": 2})
    assert priority == {"circuit": 16.0, "binding": 4.0, "dcm": 11.0, "cmap": 2.0}
    started, counts = [], []

    class Board:
        def say(self, msg):
            pass

    runs = _schedule(todo, needs, 2, lambda ch, fp, tag: started.append(tag), lambda ch, fp, tag: tag, Board(),
                     priority=priority, on_change=counts.append)
    assert sorted(runs) == ["binding", "circuit", "cmap", "dcm"]
    assert started[:3] == ["circuit", "dcm", "binding"]  # dcm leads the longer chain
    assert counts[0] == 1 and max(counts) == 2


def test_on_a_fresh_checkout_the_chain_with_most_chapters_starts_first():
    """No chapter has run yet: each counts UNKNOWN_CHAPTER_SECONDS, so dcm (which cmap needs)
    leads the chapters nothing needs, whatever their order in the book."""
    from entity_tracking.book.runner import UNKNOWN_CHAPTER_SECONDS as u

    stems = ["circuit", "binding", "faithfulness", "dcm", "cmap", "finetuning"]
    needs = {s: {"circuit"} for s in ("binding", "faithfulness", "dcm", "finetuning")} | {"cmap": {"dcm", "circuit"}}
    priority = critical_paths(stems, needs, {s: u for s in stems})
    assert u > 0
    assert max(("binding", "faithfulness", "dcm", "finetuning"), key=priority.get) == "dcm"
    assert priority["circuit"] == 3 * u
