"""Held-out means held out: the audit of a training set against an evaluation set.

A held-out number says something only when the held-out items never occur in what the model was
trained on. Every pair of "train" and "evaluate" sets of the project is audited the same way: map
each item to a **key**, its canonical form, and count the evaluation items whose key occurs in the
training set (:func:`overlap`). Two keys cover the project:

* an entity-tracking **context** is the ordered list of its (object, box label) pairs
  (:func:`context_key`): two prompts that ask about the same boxes holding the same objects in
  the same order share a context, whatever the query, the wording or the format;
* an arithmetic **problem** is ``(a, op, b)`` with the operands of ``+`` and ``*`` sorted
  (:func:`entity_tracking.task.arithmetic.problem_key`): ``3 + 4`` and ``4 + 3`` are one problem.

>>> overlap([context_key(["cup", "key"], ["A", "B"])], [context_key(["cup", "key"], ["A", "B"])]).count
1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable, Mapping, Sequence

from .arithmetic import problem_key
from .prompts import DataError
from .vocab import LABELS, OBJECTS

__all__ = ["Overlap", "context_key", "overlap", "problem_key", "record_context_key", "words_context_key"]


def context_key(objects: Sequence[str], labels: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """The key of a context: its (object, box label) pairs in textual order."""
    if len(objects) != len(labels):
        raise DataError(f"context_key: {len(objects)} objects {list(objects)} for {len(labels)} labels {list(labels)}")
    return tuple(zip(map(str, objects), map(str, labels)))


def record_context_key(record: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """The :func:`context_key` of a prompt record (``objects``, ``labels``; the task's schema)."""
    try:
        return context_key(record["objects"], record["labels"])
    except KeyError as e:
        raise DataError(f"record_context_key: the record has no {e.args[0]!r} field (keys: {sorted(record)})") from None


def words_context_key(words: Sequence[str], objects: Iterable[str] = OBJECTS,
                      labels: Iterable[str] = LABELS) -> tuple[tuple[str, str], ...]:
    """The :func:`context_key` of a context written as words in any of the organism's formats
    (``F apple``, ``apple F``, ``the apple Box F``, the paper's sentence): its objects in order,
    paired with its box labels in order. ``words`` must hold the context only (up to its first
    query)."""
    objects, labels = set(objects), set(labels)
    objs = [w for w in words if w in objects]
    labs = [w for w in words if w in labels]
    if len(objs) != len(labs):
        raise DataError(f"words_context_key: {len(objs)} objects and {len(labs)} labels in the context {' '.join(words)!r}")
    return context_key(objs, labs)


@dataclass(frozen=True)
class Overlap:
    """The evaluation items whose key occurs in the training set: ``count`` of the ``n_eval``
    evaluation items (with their multiplicity), against ``n_train`` training items; ``examples``,
    a few of the shared keys."""

    count: int
    n_eval: int
    n_train: int
    examples: list = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"found in training": self.count, "evaluation items": self.n_eval, "training items": self.n_train,
                "examples": [str(e) for e in self.examples]}


def overlap(train_keys: Iterable[Hashable], eval_keys: Iterable[Hashable], *, examples: int = 3) -> Overlap:
    """How many of ``eval_keys`` occur among ``train_keys`` (see the module docstring for the keys)."""
    train: set = set()
    n_train = 0
    for k in train_keys:
        train.add(k)
        n_train += 1
    count, n_eval, shown = 0, 0, []
    for k in eval_keys:
        n_eval += 1
        if k in train:
            count += 1
            if len(shown) < examples and k not in shown:
                shown.append(k)
    return Overlap(count, n_eval, n_train, shown)
