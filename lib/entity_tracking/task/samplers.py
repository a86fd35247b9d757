"""Samplers of the task's prompt sets: evaluation prompts, path-patching pairs, the mean-ablation
reference and the DCM desiderata (see :mod:`entity_tracking.task` for the record schema).

Each generator draws from its own ``random.Random`` seeded with ``f"{seed}:{stream}"``, so the same
seed gives the same prompts and no global random state is touched.

>>> # prompts = make_eval_prompts(tokenizer, 70, num_boxes=7, seed=0)
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

from .prompts import (
    ADDITIONAL_BOXES_TEXT,
    DEFAULT_FORM,
    RANDOM_TEXT_END,
    RANDOM_TEXT_START,
    SPLITS,
    DataError,
    Vocabulary,
    annotate_prompts,
    build_vocabulary,
    make_prompt,
)

__all__ = ["DESIDERATA", "Desideratum", "make_desiderata", "make_eval_prompts", "make_mean_reference_prompts", "make_path_patching_pairs"]

# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def stream_rng(seed: int, stream: str) -> random.Random:
    return random.Random(f"{seed}:{stream}")


def _choose(rng: random.Random, pool: Sequence[str], k: int, avoid: Iterable[str] = (),
            prefer_avoid: Iterable[str] = (), what: str = "words") -> list[str]:
    """``k`` distinct words of ``pool`` not in ``avoid``, also outside ``prefer_avoid`` if enough remain."""
    avoid, prefer_avoid = set(avoid), set(prefer_avoid)
    allowed = [w for w in pool if w not in avoid]
    preferred = [w for w in allowed if w not in prefer_avoid]
    src = preferred if len(preferred) >= k else allowed
    if len(src) < k:
        raise DataError(f"needs {k} {what} outside {sorted(avoid)}, only {len(src)} of {len(pool)} available")
    return rng.sample(src, k)


def _check_boxes(vocab: Vocabulary, num_boxes: int) -> None:
    if num_boxes < 2:
        raise DataError(f"num_boxes must be at least 2, got {num_boxes}")
    if num_boxes > len(vocab.labels):
        raise DataError(f"num_boxes={num_boxes} exceeds the {len(vocab.labels)} single-token box labels "
                        f"of {vocab.tokenizer}")
    if num_boxes > len(vocab.objects):
        raise DataError(f"num_boxes={num_boxes} exceeds the {len(vocab.objects)} single-token objects "
                        f"of {vocab.tokenizer}")


def _check_capacity(vocab: Vocabulary, num_boxes: int, n_contexts: int, what: str) -> None:
    capacity = math.perm(len(vocab.objects), num_boxes) * math.perm(len(vocab.labels), num_boxes)
    if n_contexts > capacity // 2:
        raise DataError(
            f"{what}: {n_contexts} distinct contexts requested, but {len(vocab.objects)} objects and "
            f"{len(vocab.labels)} labels give only {capacity} contexts of {num_boxes} boxes "
            f"(at most half of them are drawn); lower n or num_boxes"
        )


class _ContextSampler:
    """Draws contexts (objects, labels) never drawn before by this sampler."""

    def __init__(self, rng: random.Random, vocab: Vocabulary, num_boxes: int):
        self.rng, self.vocab, self.k = rng, vocab, num_boxes
        self.seen: set[tuple[tuple[str, ...], tuple[str, ...]]] = set()

    def __call__(self) -> tuple[list[str], list[str]]:
        while True:
            objs = self.rng.sample(self.vocab.objects, self.k)
            labs = self.rng.sample(self.vocab.labels, self.k)
            key = (tuple(objs), tuple(labs))
            if key not in self.seen:
                self.seen.add(key)
                return objs, labs


def _vocab_for(tokenizer, vocab: Vocabulary | None, num_boxes: int, min_objects: int | None = None) -> Vocabulary:
    v = vocab if vocab is not None else build_vocabulary(tokenizer, num_boxes=num_boxes, min_objects=min_objects)
    _check_boxes(v, num_boxes)
    if min_objects is not None and len(v.objects) < min_objects:
        raise DataError(f"{v.tokenizer}: needs at least {min_objects} single-token objects for "
                        f"num_boxes={num_boxes}, the vocabulary has {len(v.objects)}")
    return v


# --------------------------------------------------------------------------------------------
# Evaluation prompts, path patching, mean-ablation reference
# --------------------------------------------------------------------------------------------


def make_eval_prompts(tokenizer, n: int, num_boxes: int = 7, seed: int = 0,
                      vocab: Vocabulary | None = None) -> list[dict[str, Any]]:
    """``n`` prompts; each random context is used ``num_boxes`` times in a row, querying box
    0, 1, ..., so query indices are balanced. Records: prompt fields + ``id``, ``context_id``."""
    vocab = _vocab_for(tokenizer, vocab, num_boxes)
    n_ctx = math.ceil(n / num_boxes)
    _check_capacity(vocab, num_boxes, n_ctx, "eval prompts")
    sample = _ContextSampler(stream_rng(seed, "eval"), vocab, num_boxes)
    out: list[dict[str, Any]] = []
    for c in range(n_ctx):
        objs, labs = sample()
        for q in range(num_boxes):
            if len(out) == n:
                break
            rec = make_prompt(objs, labs, labs[q])
            rec["id"], rec["context_id"] = len(out), c
            out.append(rec)
    annotate_prompts(tokenizer, out, vocab)
    return out


def _absent_label(rng: random.Random, vocab: Vocabulary, context_labels: Sequence[str],
                  prefer_avoid: Sequence[str] = ()) -> str:
    return _choose(rng, vocab.labels, 1, avoid=context_labels, prefer_avoid=prefer_avoid,
                   what="labels absent from the context")[0]


def make_path_patching_pairs(tokenizer, n: int, num_boxes: int = 7, seed: int = 0,
                             vocab: Vocabulary | None = None) -> list[dict[str, Any]]:
    """Clean/corrupt pairs for path patching (paper-methods §1.2).

    The source comes from another random context (objects disjoint from the base's where the
    vocabulary allows, labels too) whose query sat at a box index other than the base's; its
    query label is then replaced by a letter absent from its context (and from the base's when
    possible), so the corrupt prompt's query points at no box. ``corrupt_label_index`` picks the
    source box-label position that stands in for the "previous query label" in the Structure
    Reader step.
    """
    vocab = _vocab_for(tokenizer, vocab, num_boxes)
    _check_capacity(vocab, num_boxes, n, "path-patching pairs")
    rng = stream_rng(seed, "path_patching")
    sample = _ContextSampler(rng, vocab, num_boxes)
    out: list[dict[str, Any]] = []
    for i in range(n):
        b_objs, b_labs = sample()
        q_b = rng.randrange(num_boxes)
        base = make_prompt(b_objs, b_labs, b_labs[q_b])
        s_objs = _choose(rng, vocab.objects, num_boxes, prefer_avoid=b_objs, what="objects")
        s_labs = _choose(rng, vocab.labels, num_boxes, prefer_avoid=b_labs, what="labels")
        q_s = rng.choice([j for j in range(num_boxes) if j != q_b])
        corrupt_label = _absent_label(rng, vocab, s_labs, prefer_avoid=b_labs)
        source = make_prompt(s_objs, s_labs, corrupt_label)
        out.append({
            "id": i,
            "base": base,
            "source": source,
            "target_word": base["answer"],
            "target_id": vocab.token_id(base["answer"]),
            "source_original_query_label": s_labs[q_s],
            "source_original_query_index": q_s,
            "corrupt_label_index": rng.randrange(num_boxes),
        })
    annotate_prompts(tokenizer, [r["base"] for r in out] + [r["source"] for r in out], vocab)
    return out


def make_mean_reference_prompts(tokenizer, n: int, num_boxes: int = 7, seed: int = 0,
                                vocab: Vocabulary | None = None,
                                n_tokens: int | None = None) -> list[dict[str, Any]]:
    """Random contexts whose query label is a letter absent from the context (paper-methods §1.3).

    Activations averaged over these per absolute position replace ablated heads. With
    ``n_tokens`` given (the evaluation prompts' length) every prompt is checked to have it.
    """
    vocab = _vocab_for(tokenizer, vocab, num_boxes)
    _check_capacity(vocab, num_boxes, n, "mean-reference prompts")
    rng = stream_rng(seed, "mean_reference")
    sample = _ContextSampler(rng, vocab, num_boxes)
    out = []
    for i in range(n):
        objs, labs = sample()
        rec = make_prompt(objs, labs, _absent_label(rng, vocab, labs))
        rec["id"] = i
        out.append(rec)
    annotate_prompts(tokenizer, out, vocab)
    if n_tokens is not None:
        bad = [p["text"] for p in out if p["n_tokens"] != n_tokens]
        if bad:
            raise DataError(f"{len(bad)} mean-reference prompts are not {n_tokens} tokens long, e.g. {bad[0]!r}")
    return out


# --------------------------------------------------------------------------------------------
# Desiderata
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Desideratum:
    """One DCM desideratum: how its source is built and which answer it predicts.

    ``target`` is ``"positional"`` (base object at p_s), ``"object_value"`` (source object at
    p_s), ``"box_label_value"`` (base object in the box the source asks about) or
    ``"next_segment"`` (base object at (p_s + 1) % num_boxes).
    """

    name: str
    group: Literal["core", "position_transmitter"]
    target: Literal["positional", "object_value", "box_label_value", "next_segment"]
    source_change: str
    definition: str


DESIDERATA: dict[str, Desideratum] = {d.name: d for d in [
    Desideratum("positional", "core", "positional", "none",
                "the source queries box index p_s != q_b; target: the base object at index p_s"),
    Desideratum("object_value", "core", "object_value", "none",
                "sources sampled as for positional; target: the source's own answer (absent from the base)"),
    Desideratum("box_label_value", "core", "box_label_value", "none",
                "the source queries a label L of the base's (not its query label), at an index p_s "
                "that differs from L's base index; target: the base object in box L"),
    Desideratum("random_text_start", "position_transmitter", "positional",
                f"prefix {RANDOM_TEXT_START!r}",
                "unrelated text before the context; target: base object at p_s"),
    Desideratum("random_text_end", "position_transmitter", "positional",
                f"{RANDOM_TEXT_END!r} before the period",
                "unrelated text after the context; target: base object at p_s"),
    Desideratum("add_tokens_btw_box_and_obj", "position_transmitter", "positional",
                "'is in' -> 'is contained in the' in the queried segment",
                "more tokens between object and label; target: base object at p_s"),
    Desideratum("add_seg_start", "position_transmitter", "positional",
                "an extra segment (new object, new label) before the first",
                "every box moves one segment later; target: base object at the original p_s"),
    Desideratum("add_seg_end", "position_transmitter", "positional",
                "an extra segment (new object, new label) after the last",
                "context longer at the end; target: base object at p_s"),
    Desideratum("add_box_before_correct_segment", "position_transmitter", "positional",
                f"{ADDITIONAL_BOXES_TEXT!r} before the queried segment",
                "extra box mentions before the queried segment; target: base object at p_s"),
    Desideratum("incorrect_segment", "position_transmitter", "next_segment", "none",
                "a control: target is the base object one box after p_s, which a positional signal should NOT give"),
    Desideratum("altered_box_obj_order", "position_transmitter", "positional",
                "the queried segment becomes 'Box L contains the obj'",
                "label before object in the queried segment; target: base object at p_s"),
    Desideratum("altered_box_obj_association", "position_transmitter", "positional",
                "'is in' -> 'is not in' in the queried segment",
                "the queried object is said NOT to be in the box; target: base object at p_s"),
    Desideratum("no_comma", "position_transmitter", "positional", "segments separated by ' ' instead of ', '",
                "no comma between segments; target: base object at p_s"),
    Desideratum("add_comma", "position_transmitter", "positional", "' is' -> ', is' in every segment",
                "a comma after every object; target: base object at p_s"),
]}


def _source_for(d: Desideratum, rng: random.Random, vocab: Vocabulary, k: int,
                b_objs: Sequence[str], b_labs: Sequence[str], q_b: int):
    """Source prompt, p_s and (target_from, target_index) of one pair."""
    others = [j for j in range(k) if j != q_b]
    if d.target == "box_label_value":
        j = rng.choice(others)
        p_choices = [p for p in range(k) if p not in (q_b, j)] or [p for p in range(k) if p != j]
        p_s = rng.choice(p_choices)
        q_label = b_labs[j]
        target: tuple[str, int] = ("base", j)
    else:
        if d.target == "next_segment":
            others = [p for p in others if (p + 1) % k != q_b] or others
        p_s = rng.choice(others)
        q_label = _choose(rng, vocab.labels, 1, prefer_avoid=b_labs, what="labels")[0]
        target = {"positional": ("base", p_s), "object_value": ("source", p_s),
                  "next_segment": ("base", (p_s + 1) % k)}[d.target]
    s_objs = _choose(rng, vocab.objects, k, avoid=b_objs, what="objects outside the base context")
    s_labs = _choose(rng, vocab.labels, k - 1, avoid=[q_label], prefer_avoid=b_labs, what="labels")
    s_labs.insert(p_s, q_label)

    forms = [DEFAULT_FORM] * k
    kw: dict[str, Any] = {}
    name = d.name
    if name == "random_text_start":
        kw["prefix"] = RANDOM_TEXT_START
    elif name == "random_text_end":
        kw["suffix"] = RANDOM_TEXT_END
    elif name == "add_tokens_btw_box_and_obj":
        forms[p_s] = "is_contained_in"
    elif name == "altered_box_obj_association":
        forms[p_s] = "is_not_in"
    elif name == "altered_box_obj_order":
        forms[p_s] = "box_contains"
    elif name == "add_comma":
        forms = ["comma_is_in"] * k
    elif name == "no_comma":
        kw["separator"] = " "
    elif name == "add_box_before_correct_segment":
        kw["inserts"] = {p_s: ADDITIONAL_BOXES_TEXT}
    elif name in ("add_seg_start", "add_seg_end"):
        x_obj = _choose(rng, vocab.objects, 1, avoid=list(b_objs) + s_objs, what="objects")[0]
        x_lab = _choose(rng, vocab.labels, 1, avoid=s_labs, prefer_avoid=b_labs, what="labels")[0]
        at = 0 if name == "add_seg_start" else k
        s_objs.insert(at, x_obj)
        s_labs.insert(at, x_lab)
        forms.insert(at, DEFAULT_FORM)
    source = make_prompt(s_objs, s_labs, q_label, forms=forms, **kw)
    return source, p_s, target


def make_desiderata(tokenizer, name: str, n: int, num_boxes: int = 7, seed: int = 0,
                    vocab: Vocabulary | None = None) -> list[dict[str, Any]]:
    """``n`` (base, source, target) pairs of desideratum ``name`` (a key of :data:`DESIDERATA`),
    split 50/25/25 into train/eval/test in file order. See the module docstring for the schema."""
    if name not in DESIDERATA:
        raise DataError(f"unknown desideratum {name!r}; known: {sorted(DESIDERATA)}")
    if n < len(SPLITS) + 1:
        raise DataError(f"n={n} pairs cannot be split 50/25/25 into {SPLITS}; use n >= 4")
    d = DESIDERATA[name]
    k = num_boxes
    vocab = _vocab_for(tokenizer, vocab, k, min_objects=2 * k + 1)
    _check_capacity(vocab, k, n, f"desideratum {name}")
    rng = stream_rng(seed, f"desiderata/{name}")
    sample = _ContextSampler(rng, vocab, k)
    n_train, n_eval = n // 2, n // 4
    out: list[dict[str, Any]] = []
    for i in range(n):
        b_objs, b_labs = sample()
        q_b = rng.randrange(k)
        base = make_prompt(b_objs, b_labs, b_labs[q_b])
        source, p_s, (t_from, t_idx) = _source_for(d, rng, vocab, k, b_objs, b_labs, q_b)
        if t_from == "base":
            t_word = b_objs[t_idx]
        else:
            t_word = source["objects"][t_idx]
        out.append({
            "id": i,
            "desideratum": name,
            "split": "train" if i < n_train else "eval" if i < n_train + n_eval else "test",
            "base": base,
            "source": source,
            "base_query_index": q_b,
            "source_query_index": p_s,
            "target_from": t_from,
            "target_index": t_idx,
            "target_word": t_word,
            "target_id": vocab.token_id(t_word),
            "base_answer": base["answer"],
        })
    annotate_prompts(tokenizer, [r["base"] for r in out] + [r["source"] for r in out], vocab)
    return out


