"""The organism's curriculum: the synthetic text it is trained on, stage by stage.

Four formats (:data:`STAGES`) lead from a plain induction lookup to the paper's prompts (see
:mod:`entity_tracking.organism`); :func:`make_batch` draws one batch of a format with only the answers
supervised, :func:`make_arithmetic_batch` the pretraining arithmetic, and :func:`make_batch_paper_eval`
the validation prompts, from a stream seeded apart from the book's held-out prompts.

>>> # batch = make_batch(random.Random(0), tokenizer.get_vocab(), "paper", 8, (2, 4), queries=3)
"""


from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Container, Optional, Sequence

import torch

from ..model.tokenizer import split_words
from ..task.arithmetic import problem_key
from ..task.prompts import DEFAULT_FORM, make_prompt, render_parts
from ..task.vocab import LABELS, OBJECTS

STAGES = ("kv", "vk", "filler", "paper")

# Seeds of the organism's own data streams, kept apart from the data chapter's held-out prompts
# (which use the profile's data seed through entity_tracking.data): validation prompts come from
# a stream salted with VAL_SALT, so they are disjoint from the test prompts by construction of
# the generator state (a coincidence of a whole 7-box context has probability ~1e-20).
TRAIN_SALT = 0x5EED
VAL_SALT = 0xE7A1


# ---------------------------------------------------------------------------------------------
# Synthetic text
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _split(piece: str) -> tuple[str, ...]:
    return tuple(split_words(piece))


def paper_words(objs: Sequence[str], labels: Sequence[str], query_label: str) -> tuple[list[str], list[str]]:
    """The paper's prompt as the book writes it (:func:`entity_tracking.task.prompts.render_parts`,
    the one template, in its default form), split into the word tokenizer's words:
    ``(context, question)``. Each piece is split on its own (pieces end at word boundaries), and
    the pieces repeat, so their splits are cached."""
    parts, spans = render_parts({"objects": objs, "labels": labels, "forms": [DEFAULT_FORM] * len(objs),
                                 "query_label": query_label})
    context: list[str] = []
    question: list[str] = []
    at, cut = 0, spans["question"][0]
    for part in parts:
        (context if at < cut else question).extend(_split(part))
        at += len(part)
    return context, question


def _context_words(fmt: str, objs: Sequence[str], labels: Sequence[str]) -> list[str]:
    if fmt == "paper":
        return paper_words(objs, labels, labels[0])[0]
    words: list[str] = []
    for i, (o, l) in enumerate(zip(objs, labels)):
        if fmt == "kv":
            words += [l, o]
        elif fmt == "vk":
            words += [o, l]
        elif fmt == "filler":
            words += ([","] if i else []) + ["the", o, "Box", l]
        else:
            raise ValueError(f"unknown format {fmt!r}; one of {STAGES}")
    return words


@functools.lru_cache(maxsize=None)
def _paper_question(label: str) -> tuple[str, ...]:
    """The paper's question about ``label`` (it does not depend on the context), made once."""
    return tuple(paper_words([OBJECTS[0]], [label], label)[1])


def _query_words(fmt: str, label: str) -> list[str]:
    """The question about the box labelled ``label`` that follows a context of format ``fmt``."""
    if fmt in ("kv", "vk"):
        return [".", label]
    if fmt == "paper":
        return list(_paper_question(label))
    return [".", "Box", label, "contains", "the"]


def ordinal_query_words(label: str) -> list[str]:
    """The ordinal query of the positional recipe's auxiliary questions: ``. Box F =``, answered
    by the box's 1-based position in the context (a digit; at most 9 boxes)."""
    return [".", "Box", label, "="]


def context_length(fmt: str, num_boxes: int) -> int:
    """Tokens before the first query's ``Box`` (or label) in a :func:`make_batch` row of
    ``num_boxes`` boxes: BOS, the context and the query's ``.``. The same in every row with that
    box count (one word is one token), so it spans the positions that context resampling
    (:mod:`entity_tracking.organism.resample`) replaces and the context-ablation test ablates."""
    return 1 + len(_context_words(fmt, ["o"] * num_boxes, ["L"] * num_boxes)) + 1


def paper_prompts(n_contexts: int, num_boxes: int, seed: int, objects: Sequence[str] = OBJECTS):
    """The paper's prompts (§1.1), ``num_boxes`` per context with the query at each box in turn:
    a list of ``(prompt_text, answer_word, query_index)``. The organism's private generator for its
    validation set (the book's evaluation prompts come from :mod:`entity_tracking.task`, through
    the same template)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_contexts):
        objs = rng.sample(list(objects), num_boxes)
        labels = rng.sample(list(LABELS), num_boxes)
        for q in range(num_boxes):
            out.append((make_prompt(objs, labels, labels[q])["text"], objs[q], q))
    return out


@dataclass
class Batch:
    """Token ids (right-padded) and labels (-100 except on supervised answer tokens)."""

    input_ids: torch.Tensor
    labels: torch.Tensor


def _pad(seqs: list[list[int]], labs: list[list[int]], pad_id: int) -> Batch:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    lab = torch.full((len(seqs), n), -100, dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labs)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(l)] = torch.tensor(l)
    return Batch(ids, lab)


def make_batch(
    rng: random.Random,
    vocab: dict[str, int],
    fmt: str,
    batch_size: int,
    boxes: tuple[int, int],
    queries: int,
    objects: Sequence[str] = OBJECTS,
    ordinal_share: float = 0.0,
) -> Batch:
    """One batch of entity-tracking sequences in format ``fmt``: BOS, a context of
    ``boxes[0]..boxes[1]`` distinct (object, label) pairs, then ``queries`` queries drawn with
    replacement, each followed by its answer; only the answers are supervised. ``labels`` are
    aligned with ``input_ids`` (HF shifts them).

    ``ordinal_share`` of the queries (paper format only) ask instead for the queried box's ordinal
    number, ``. Box F =`` -> ``3`` (:func:`ordinal_query_words`): a question only a model that knows
    *where* each box sits can answer."""
    bos, pad = vocab["<s>"], vocab["<pad>"]
    seqs, labs = [], []
    for _ in range(batch_size):
        n = rng.randint(*boxes)
        objs = rng.sample(list(objects), n)
        labels = rng.sample(list(LABELS), n)
        ids = [bos] + [vocab[w] for w in _context_words(fmt, objs, labels)]
        lab = [-100] * len(ids)
        for _ in range(queries):
            q = rng.randrange(n)
            if ordinal_share > 0 and fmt == "paper" and rng.random() < ordinal_share:
                qw = [vocab[w] for w in ordinal_query_words(labels[q])]
                answer = vocab[str(q + 1)]
            else:
                qw = [vocab[w] for w in _query_words(fmt, labels[q])]
                answer = vocab[objs[q]]
            ids += qw + [answer]
            lab += [-100] * len(qw) + [answer]
        seqs.append(ids)
        labs.append(lab)
    return _pad(seqs, labs, pad)


def _arith_problem(rng: random.Random, max_digits: int, exclude: Container = frozenset()) -> tuple[list[str], list[str], tuple]:
    """One pretraining problem, drawn again while its :func:`~entity_tracking.task.problem_key` is
    in ``exclude`` (the fine-tunes' held-out problems): words, answer words, and its key."""
    while True:
        a = rng.randrange(10 ** rng.randint(1, max_digits))
        b = rng.randrange(10 ** rng.randint(1, max_digits))
        if rng.random() < 0.5:
            op, answer = "+", a + b
        else:
            a, b = max(a, b), min(a, b)
            op, answer = "-", a - b
        key = problem_key(a, op, b)
        if key not in exclude:
            return [*str(a), op, *str(b), "="], [*str(answer)], key


def make_arithmetic_batch(
    rng: random.Random, vocab: dict[str, int], batch_size: int, max_digits: int = 3, problems: int = 5,
    exclude: Container = frozenset(), drawn: Optional[list] = None,
) -> Batch:
    """Pretraining arithmetic, ``123 + 45 = 168 . 70 - 7 = 63 .``: the answer digits and the
    closing period are supervised. No problem whose :func:`~entity_tracking.task.problem_key` is in
    ``exclude`` is drawn (the base leaves out the fine-tunes' held-out problems,
    :func:`~entity_tracking.task.heldout_keys`); ``drawn``, a list, receives the key of every problem
    drawn (to audit the stream)."""
    bos, pad = vocab["<s>"], vocab["<pad>"]
    seqs, labs = [], []
    for _ in range(batch_size):
        ids, lab = [bos], [-100]
        for _ in range(problems):
            q, a, key = _arith_problem(rng, max_digits, exclude)
            if drawn is not None:
                drawn.append(key)
            qi = [vocab[w] for w in q]
            ai = [vocab[w] for w in a + ["."]]
            ids += qi + ai
            lab += [-100] * len(qi) + ai
        seqs.append(ids)
        labs.append(lab)
    return _pad(seqs, labs, pad)

def make_batch_paper_eval(rng: random.Random, vocab: dict[str, int], n_contexts: int, num_boxes: int) -> Batch:
    """Paper-format prompts with the query at every box in turn (as the test set), as a Batch
    whose single supervised token is the answer."""
    bos, pad = vocab["<s>"], vocab["<pad>"]
    seqs, labs = [], []
    for _ in range(n_contexts):
        objs = rng.sample(list(OBJECTS), num_boxes)
        labels = rng.sample(list(LABELS), num_boxes)
        ctx = [bos] + [vocab[w] for w in _context_words("paper", objs, labels)]
        for q in range(num_boxes):
            ids = ctx + [vocab[w] for w in _query_words("paper", labels[q])] + [vocab[objs[q]]]
            seqs.append(ids)
            labs.append([-100] * (len(ids) - 1) + [ids[-1]])
    return _pad(seqs, labs, pad)

