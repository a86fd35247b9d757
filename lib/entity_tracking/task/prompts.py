"""The entity-tracking dataset, its counterfactuals and the arithmetic fine-tuning data.

**The task.** A prompt lists ``num_boxes`` boxes, each holding one object, and then asks for the
content of one of them (paper-methods §1.1)::

    The apple is in Box F, the cup is in Box A, the key is in Box Q. Box A contains the

The answer is the queried object (`` cup``), read off as the first token the model predicts.
Box labels are distinct uppercase letters and objects are distinct nouns within one context;
both are drawn at random per context. The object comes *before* its box so that the query
``Box A contains the`` cannot be answered by copying the continuation of an identical string.
Every object and label must be exactly one token of the tokenizer *as it appears in context*
(with the leading space or ``▁`` the tokenizer attaches), so that "the object" and "the label"
are single positions. :func:`build_vocabulary` filters the word lists per tokenizer and fails
loudly when too few words survive. Token positions are never hard-coded: rendering a prompt
records the character span of every object and label, and :func:`locate_spans` maps spans to
token indices through the fast tokenizer's offset mapping (or, for slow tokenizers, by encoding
prefixes). Four positions matter to the circuit: the **last token** (Value Fetcher and Position
Transmitter heads), the **query label** (Position Detector), the **previous query label**, i.e.
the query label's occurrence in the context (Structure Reader), and the **objects** (what the
Value Fetcher attends to).

**Counterfactuals.** *Path patching* (§1.2) corrupts a base prompt with a *source* prompt from a
different random context whose query sat at a different box index, and whose query label is then
replaced by a letter that is absent from its context: the source carries no answer at all, only
the shape of the task. *Mean ablation* (§1.3) averages activations per absolute token position
over random contexts whose query label is likewise absent; they have the same token length as the
evaluation prompts, so positions line up. *Desiderata* (§1.4, used by DCM) pair a base prompt with
a source prompt so that the three hypotheses about what a group of heads encodes predict three
different answers when the heads' activations are patched from source into base:

* ``positional``: the source queries box index ``p_s != q_b``; if the heads carry *where* the
  queried box sits, the base answers with **its own object at index p_s**;
* ``object_value``: sources drawn as for ``positional``; if the heads carry *what* the answer
  is, the base answers with the **source's object** at ``p_s`` (source objects never occur in
  the base, so this is unambiguous);
* ``box_label_value``: the source queries a label ``L`` that also labels base box ``j != q_b``;
  if the heads carry *which label* was asked for, the base answers with **its object in box L**.
  The source's ``p_s`` is chosen outside ``{q_b, j}`` so the positional reading differs.

Eleven further variants (§1.4) test what kind of position the Position Transmitter carries: each
perturbs the source (text before/after the context, extra tokens inside the correct segment, an
extra segment, extra box mentions, negation, swapped segment order, removed or added commas)
and keeps the positional target ``base.objects[p_s]``, except ``incorrect_segment`` whose target
is the base object one box further, ``(p_s + 1) % num_boxes``. See :data:`DESIDERATA`.

**Two bugs of the reference code are fixed here.** (1) The reference computed the base's query
index from the query sentence instead of the context, so it was always 0 and ~1/num_boxes of
"positional" pairs queried the base's own box; it also located the query by substring search
(labels ``B`` and ``T`` match ``Box`` and ``The``). Here the query index comes from the structure,
positional sources never share it, and the positional target is never the base answer.
(2) The reference's box-label-value target was ``tokenizer.encode(list_of_words)[1]``, the wrong
id; here every target is the single in-context token id of one word (:meth:`Vocabulary.token_id`).

**Record schema** (``SCHEMA_VERSION``), JSON lines written by :func:`entity_tracking.io.write_jsonl`.

A *prompt* record (``eval.jsonl`` and ``mean_reference.jsonl`` lines; ``base``/``source`` of pairs)::

    text          str     the prompt, ending in "... contains the" (no trailing space)
    objects       [str]   object of each rendered segment, in textual order
    labels        [str]   box label of each rendered segment
    forms         [str]   segment form of each segment (keys of SEGMENT_FORMS)
    prefix, suffix, separator : str   text before the first segment / before the period / between segments
    inserts       {str(i): str}       text inserted just before segment i
    query_label   str     the label asked for
    query_index   int|null  segment index whose label is query_label; null if absent (corrupt prompts)
    answer        str|null  objects[query_index]
    n_tokens      int     length of the tokenization (BOS included if the tokenizer adds one)
    positions     {"objects": [int], "labels": [int], "query_label": int,
                   "prev_query_label": int|null, "last": int}   token indices, unpadded
    target_id     int|null  in-context token id of ``answer``

``eval.jsonl`` lines also hold ``id`` and ``context_id`` (each context appears ``num_boxes`` times
in a row, querying box 0, 1, ...). ``mean_reference.jsonl`` lines hold ``id``. Positions and ids
are those of the tokenizer named in ``manifest.json``; :func:`encode_prompts` recomputes them for
whatever tokenizer it is given, from the structure fields (:func:`render_prompt`).

A *path-patching* record (``path_patching.jsonl``)::

    id, base (prompt), source (prompt; query label absent from its context),
    target_word, target_id          the base answer (what patching should destroy)
    source_original_query_label, source_original_query_index   the source before its label was replaced
    corrupt_label_index int         a random segment index of the source; the Structure Reader
                                    step reads the corrupt activation at source.positions.labels[i]

A *desideratum* record (``desiderata/<name>.jsonl``)::

    id, desideratum, split ("train" | "eval" | "test", 50/25/25 in file order),
    base, source (prompts),
    base_query_index    int   q_b, the base's query segment index
    source_query_index  int   p_s, the source's query index among its *original* segments
                              (an extra segment added by add_seg_start is not counted;
                              source.query_index is the index among rendered segments)
    target_from   "base" | "source";  target_index int;  target_word str;  target_id int
                  target_word == (base if target_from == "base" else source).objects[target_index]
                  (add_seg_start shifts the source's segments by one; its target is a base object)
    base_answer   str   the base's own answer

An *arithmetic* record (``arithmetic.jsonl``): ``id, op, a, b, question, answer, text`` with
``question = "What is 123 + 4567 ?"``, ``answer = "4690"`` (division: ``"q R r"``, or ``"q"`` when
the remainder is 0) and ``text = question + " " + answer``.

Everything is deterministic in ``seed``: each file draws from its own ``random.Random`` seeded
with ``f"{seed}:{file}"``; no global random state is touched, so the same seed gives byte-identical
files.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import math
import os
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import torch

from . import vocab as _vocab
from .io import ResultsPaths, read_json, read_jsonl, write_json, write_jsonl

__all__ = [
    "ADDITIONAL_BOXES_TEXT",
    "ARITHMETIC_OPS",
    "DESIDERATA",
    "DESIDERATA_DIR",
    "FILES",
    "DataError",
    "Desideratum",
    "QUERY_FORM",
    "RANDOM_TEXT_END",
    "RANDOM_TEXT_START",
    "SCHEMA_VERSION",
    "SEGMENT_FORMS",
    "SPLITS",
    "Vocabulary",
    "build_datasets",
    "annotate_prompts",
    "build_vocabulary",
    "data_dir",
    "encode_pairs",
    "encode_prompts",
    "load_arithmetic",
    "load_desiderata",
    "load_eval_prompts",
    "load_manifest",
    "load_mean_reference",
    "load_path_patching",
    "locate_spans",
    "make_arithmetic",
    "make_desiderata",
    "make_eval_prompts",
    "make_mean_reference_prompts",
    "make_path_patching_pairs",
    "make_prompt",
    "render_prompt",
    "token_table",
    "tokenizer_name",
    "word_token_ids",
]

SCHEMA_VERSION = 1

# --------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------

#: How one "segment" (one box and its object) is written. ``{object}`` and ``{label}`` are the
#: slots whose character spans are recorded. The first character of a prompt is capitalised.
SEGMENT_FORMS: dict[str, str] = {
    "is_in": "the {object} is in Box {label}",  # the paper's form
    "is_contained_in": "the {object} is contained in the Box {label}",  # add_tokens_btw_box_and_obj
    "is_not_in": "the {object} is not in Box {label}",  # altered_box_obj_association
    "box_contains": "Box {label} contains the {object}",  # altered_box_obj_order
    "comma_is_in": "the {object}, is in Box {label}",  # add_comma
}
DEFAULT_FORM = "is_in"
#: The question after the context; its ``{label}`` is the query label, its end the last token.
QUERY_FORM = "Box {label} contains the"
CONTEXT_END = ". "
DEFAULT_SEPARATOR = ", "
RANDOM_TEXT_START = "There are a bunch of boxes containing objects, "
RANDOM_TEXT_END = ", these are a bunch of boxes containing objects"
ADDITIONAL_BOXES_TEXT = "there are three additional boxes, Box PP, Box BB and Box AA, "

SPLITS: tuple[str, ...] = ("train", "eval", "test")
ARITHMETIC_OPS: tuple[str, ...] = ("+", "-", "*", "/")

# In-context probes used to decide whether a word is one token: the word must be the same single
# token in every probe. They cover every neighbour a word has in any template above.
_OBJECT_PROBES: tuple[tuple[str, str], ...] = (("the ", " is in"), ("the ", ", is"), ("contains the ", ", the"),
                                               ("contains the ", ". Box"))
_LABEL_PROBES: tuple[tuple[str, str], ...] = (("in Box ", ", the"), ("in Box ", ". Box"), ("Box ", " contains"),
                                              ("in Box ", " the"))


class DataError(ValueError):
    """Bad input to the data generators (vocabulary, sizes, tokenizer incompatibilities)."""


# --------------------------------------------------------------------------------------------
# Tokenizer helpers
# --------------------------------------------------------------------------------------------


def tokenizer_name(tokenizer) -> str:
    """``Class('name_or_path')`` of a HF tokenizer, for error messages and the manifest."""
    name = getattr(tokenizer, "name_or_path", "") or "<unnamed>"
    return f"{type(tokenizer).__name__}('{name}')"


Offsets = list[tuple[int, int]]


def _encode(tokenizer, texts: Sequence[str], offsets: bool) -> tuple[list[list[int]], list[Offsets] | None]:
    enc = tokenizer(list(texts), add_special_tokens=True, return_offsets_mapping=offsets)
    ids = [list(x) for x in enc["input_ids"]]
    return ids, ([list(map(tuple, o)) for o in enc["offset_mapping"]] if offsets else None)


def locate_spans(
    tokenizer,
    texts: Sequence[str],
    spans: Sequence[Sequence[tuple[int, int]]],
    method: Literal["auto", "offsets", "prefix"] = "auto",
) -> tuple[list[list[int]], list[list[int]]]:
    """Token index of each character span, requiring each span to be exactly one token.

    ``texts[b]`` is encoded with the tokenizer's special tokens (BOS if it adds one); span
    ``spans[b][i] = (start, end)`` must cover exactly one token, up to surrounding whitespace
    (a leading-space ``Ġword`` / ``▁word`` token is fine; ``word,`` merged into one token is not).

    ``method="offsets"`` uses the fast tokenizer's offset mapping; ``"prefix"`` (the fallback for
    slow tokenizers) encodes ``text[:end]`` and the prefix before the word's whitespace, and
    requires them to differ by exactly one token. ``"auto"`` picks offsets when available.

    Returns ``(positions, input_ids)``: ``positions[b][i]`` is an int, ``input_ids[b]`` the
    unpadded ids (length ``n_tokens[b]``). Raises :class:`DataError` naming the word, the text
    and the tokenizer when a span is not a single token.
    """
    if method == "auto":
        method = "offsets" if getattr(tokenizer, "is_fast", False) else "prefix"
    ids, offs = _encode(tokenizer, texts, offsets=method == "offsets")
    out: list[list[int]] = []
    for b, text in enumerate(texts):
        row: list[int] = []
        if method == "offsets":
            real = [(t, a, e) for t, (a, e) in enumerate(offs[b]) if e > a]  # drop special tokens
            ends = [e for _, _, e in real]
            for s, e in spans[b]:
                k = bisect.bisect_right(ends, s)  # first token ending after the span starts
                ok = k < len(real) and real[k][1] < e and real[k][2] >= e
                ok = ok and text[real[k][1]:real[k][2]].strip() == text[s:e]
                # a bare-space token before the word (SentencePiece "▁" + "word") means the word's
                # first predicted token would be the space, not the word: not one token in context
                ok = ok and not (k > 0 and real[k - 1][2] > real[k - 1][1]
                                 and text[real[k - 1][1]:real[k - 1][2]].strip() == "")
                if not ok:
                    raise DataError(_not_one_token(tokenizer, text, s, e))
                row.append(real[k][0])
        else:
            for s, e in spans[b]:
                before = text[:s].rstrip()
                n_before = len(_encode(tokenizer, [before], False)[0][0])
                upto = _encode(tokenizer, [text[:e]], False)[0][0]
                if len(upto) - n_before != 1 or upto != ids[b][: len(upto)]:
                    raise DataError(_not_one_token(tokenizer, text, s, e))
                row.append(len(upto) - 1)
        out.append(row)
    return out, ids


def _not_one_token(tokenizer, text: str, s: int, e: int) -> str:
    return (
        f"'{text[s:e]}' is not exactly one token in context for {tokenizer_name(tokenizer)} "
        f"(characters {s}:{e} of {text!r}); filter the word lists with build_vocabulary()"
    )


def _is_one_token(tokenizer, word: str, probes: Sequence[tuple[str, str]]) -> int | None:
    """The single in-context token id of ``word`` in every probe, else None."""
    texts, spans = [], []
    for left, right in probes:
        texts.append(f"{left}{word}{right}")
        spans.append([(len(left), len(left) + len(word))])
    try:
        pos, ids = locate_spans(tokenizer, texts, spans)
    except DataError:
        return None
    got = {ids[b][p[0]] for b, p in enumerate(pos)}
    if len(got) != 1:
        return None
    tid = got.pop()
    if tid == getattr(tokenizer, "unk_token_id", None):
        return None
    return tid


@dataclass(frozen=True)
class Vocabulary:
    """The objects and labels usable with one tokenizer, with their in-context token ids.

    ``token_ids[word]`` is the id of ``word`` as it appears in a prompt (after a space), which
    is also the id the model must predict after ``... contains the``.
    """

    objects: tuple[str, ...]
    labels: tuple[str, ...]
    token_ids: Mapping[str, int]
    tokenizer: str
    rejected_objects: tuple[str, ...] = ()
    rejected_labels: tuple[str, ...] = ()

    def token_id(self, word: str) -> int:
        """The single in-context token id of an object or label of this vocabulary."""
        try:
            return self.token_ids[word]
        except KeyError:
            raise DataError(f"'{word}' is not in the vocabulary built for {self.tokenizer}") from None


def build_vocabulary(
    tokenizer,
    objects: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    *,
    num_boxes: int = 7,
    min_objects: int | None = None,
    min_labels: int | None = None,
) -> Vocabulary:
    """Filter objects and labels to those that are one token in context for ``tokenizer``.

    ``objects=None`` uses :data:`entity_tracking.vocab.OBJECTS` and silently drops words that
    are not single tokens; an explicitly given list must be single tokens throughout, otherwise a
    :class:`DataError` names the offending words. ``labels`` default to the letters A-Z.
    ``min_objects`` defaults to ``num_boxes`` (one context); the desiderata need
    ``2 * num_boxes + 1`` (disjoint base/source objects plus one extra segment). Too few words
    left raises a :class:`DataError` naming the tokenizer, the counts and the words that failed.
    """
    explicit = objects is not None
    objects = list(_vocab.OBJECTS if objects is None else objects)
    labels = list(_vocab.LABELS if labels is None else labels)
    for kind, words in (("object", objects), ("label", labels)):
        dup = sorted({w for w in words if words.count(w) > 1})
        if dup:
            raise DataError(f"repeated {kind} words: {dup}")
        bad = [w for w in words if not w or any(c.isspace() for c in w)]
        if bad:
            raise DataError(f"{kind} words must be single non-empty words without spaces, got {bad}")
    bad_labels = [w for w in labels if not (len(w) == 1 and w in string.ascii_uppercase)]
    if bad_labels:
        raise DataError(f"box labels must be single uppercase letters A-Z, got {bad_labels}")
    name = tokenizer_name(tokenizer)
    if num_boxes > len(labels):
        raise DataError(f"num_boxes={num_boxes} exceeds the {len(labels)} box labels (distinct letters per context)")
    min_objects = num_boxes if min_objects is None else min_objects
    min_labels = num_boxes if min_labels is None else min_labels

    ids: dict[str, int] = {}
    kept_o, rej_o, kept_l, rej_l = [], [], [], []
    for w in objects:
        tid = _is_one_token(tokenizer, w, _OBJECT_PROBES)
        (kept_o if tid is not None else rej_o).append(w)
        if tid is not None:
            ids[w] = tid
    for w in labels:
        tid = _is_one_token(tokenizer, w, _LABEL_PROBES)
        (kept_l if tid is not None else rej_l).append(w)
        if tid is not None:
            ids[w] = tid
    if explicit and rej_o:
        raise DataError(f"objects {rej_o} are not exactly one token in context for {name}; "
                        f"every object of an explicit list must be a single token")
    if len(kept_o) < min_objects:
        raise DataError(
            f"{name}: needs at least {min_objects} single-token objects for num_boxes={num_boxes}, "
            f"but only {len(kept_o)} of {len(objects)} are one token in context "
            f"(failed: {rej_o[:30]}{' ...' if len(rej_o) > 30 else ''})"
        )
    if len(kept_l) < min_labels:
        raise DataError(
            f"{name}: needs at least {min_labels} single-token box labels for num_boxes={num_boxes}, "
            f"but only {len(kept_l)} of {len(labels)} are one token in context (failed: {rej_l})"
        )
    return Vocabulary(tuple(kept_o), tuple(kept_l), ids, name, tuple(rej_o), tuple(rej_l))


# --------------------------------------------------------------------------------------------
# Rendering prompts
# --------------------------------------------------------------------------------------------


def make_prompt(
    objects: Sequence[str],
    labels: Sequence[str],
    query_label: str,
    *,
    forms: Sequence[str] | None = None,
    prefix: str = "",
    suffix: str = "",
    separator: str = DEFAULT_SEPARATOR,
    inserts: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """A prompt record (structure fields, ``text``, ``query_index``, ``answer``; no positions).

    ``objects[i]`` is in box ``labels[i]``; segment ``i`` is written with ``forms[i]`` (a key of
    :data:`SEGMENT_FORMS`, default ``"is_in"``); ``inserts[i]`` is text placed just before
    segment ``i``. Positions are added by :func:`annotate_prompts`.
    """
    if len(objects) != len(labels):
        raise DataError(f"{len(objects)} objects but {len(labels)} labels")
    forms = list(forms) if forms is not None else [DEFAULT_FORM] * len(objects)
    unknown = [f for f in forms if f not in SEGMENT_FORMS]
    if unknown or len(forms) != len(objects):
        raise DataError(f"forms must be {len(objects)} keys of SEGMENT_FORMS, got {forms}")
    if len(set(labels)) != len(labels) or len(set(objects)) != len(objects):
        raise DataError(f"labels and objects must be distinct within a context: {objects} / {labels}")
    query_index = list(labels).index(query_label) if query_label in labels else None
    rec: dict[str, Any] = {
        "objects": list(objects),
        "labels": list(labels),
        "forms": forms,
        "prefix": prefix,
        "suffix": suffix,
        "separator": separator,
        "inserts": {str(k): v for k, v in sorted((inserts or {}).items())},
        "query_label": query_label,
        "query_index": query_index,
        "answer": objects[query_index] if query_index is not None else None,
    }
    rec["text"] = render_prompt(rec)[0]
    return rec


@functools.lru_cache(maxsize=None)
def _parsed(template: str) -> tuple[tuple[str, str | None], ...]:
    return tuple((lit, fld) for lit, fld, _, _ in string.Formatter().parse(template))


def render_prompt(prompt: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Text and character spans of a prompt record's structure fields.

    Returns ``(text, spans)`` with ``spans = {"objects": [(s, e)], "labels": [(s, e)],
    "query_label": (s, e), "prev_query_label": (s, e) | None}``.
    """
    parts: list[str] = []
    cursor = 0
    spans: dict[str, Any] = {"objects": [], "labels": []}

    def emit(s: str) -> tuple[int, int]:
        nonlocal cursor
        parts.append(s)
        cursor += len(s)
        return cursor - len(s), cursor

    def emit_template(template: str, values: Mapping[str, str]) -> dict[str, tuple[int, int]]:
        got = {}
        for literal, field_name in _parsed(template):
            emit(literal)
            if field_name is not None:
                got[field_name] = emit(values[field_name])
        return got

    inserts = prompt.get("inserts") or {}
    emit(prompt.get("prefix", ""))
    for i, (obj, lab, form) in enumerate(zip(prompt["objects"], prompt["labels"], prompt["forms"])):
        if i:
            emit(prompt.get("separator", DEFAULT_SEPARATOR))
        emit(inserts.get(str(i), ""))
        got = emit_template(SEGMENT_FORMS[form], {"object": obj, "label": lab})
        spans["objects"].append(got["object"])
        spans["labels"].append(got["label"])
    emit(prompt.get("suffix", ""))
    emit(CONTEXT_END)
    spans["query_label"] = emit_template(QUERY_FORM, {"label": prompt["query_label"]})["label"]
    labels = list(prompt["labels"])
    q = prompt["query_label"]
    spans["prev_query_label"] = spans["labels"][labels.index(q)] if q in labels else None
    text = "".join(parts)
    return text[:1].upper() + text[1:], spans


def _span_list(spans: Mapping[str, Any]) -> list[tuple[int, int]]:
    flat = list(spans["objects"]) + list(spans["labels"]) + [spans["query_label"]]
    if spans["prev_query_label"] is not None:
        flat.append(spans["prev_query_label"])
    return flat


def _positions_from(spans: Mapping[str, Any], flat_pos: Sequence[int], n_tokens: int) -> dict[str, Any]:
    n = len(spans["objects"])
    return {
        "objects": list(flat_pos[:n]),
        "labels": list(flat_pos[n: 2 * n]),
        "query_label": flat_pos[2 * n],
        "prev_query_label": flat_pos[2 * n + 1] if spans["prev_query_label"] is not None else None,
        "last": n_tokens - 1,
    }


def _locate_prompts(tokenizer, prompts: Sequence[Mapping[str, Any]], method: str = "auto"):
    texts, spans_all, flat = [], [], []
    for p in prompts:
        text, spans = render_prompt(p)
        if "text" in p and p["text"] != text:
            raise DataError(f"prompt text {p['text']!r} does not match its structure ({text!r})")
        texts.append(text)
        spans_all.append(spans)
        flat.append(_span_list(spans))
    pos, ids = locate_spans(tokenizer, texts, flat, method=method)  # type: ignore[arg-type]
    return [_positions_from(s, p, len(i)) for s, p, i in zip(spans_all, pos, ids)], ids


def annotate_prompts(tokenizer, prompts: Sequence[dict[str, Any]], vocab: Vocabulary | None = None) -> None:
    """Add ``positions``, ``n_tokens`` and ``target_id`` to prompt records, in place.

    ``target_id`` is ``vocab.token_id(answer)``; it is checked against the token the answer has
    at its own position in the prompt (they must agree: same word, same left context).
    """
    positions, ids = _locate_prompts(tokenizer, prompts)
    for p, pos, row in zip(prompts, positions, ids):
        p["positions"] = pos
        p["n_tokens"] = len(row)
        p["target_id"] = None
        if p["answer"] is not None:
            in_prompt = row[pos["objects"][p["query_index"]]]
            tid = vocab.token_id(p["answer"]) if vocab is not None else in_prompt
            if tid != in_prompt:
                raise DataError(f"{p['answer']!r}: id {tid} as a target but {in_prompt} in {p['text']!r}")
            p["target_id"] = tid


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def _rng(seed: int, stream: str) -> random.Random:
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
    sample = _ContextSampler(_rng(seed, "eval"), vocab, num_boxes)
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
    rng = _rng(seed, "path_patching")
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
    rng = _rng(seed, "mean_reference")
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
    rng = _rng(seed, f"desiderata/{name}")
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


# --------------------------------------------------------------------------------------------
# Arithmetic (Goat-style fine-tuning data)
# --------------------------------------------------------------------------------------------


def _operand(rng: random.Random, max_digits: int, minimum: int = 0) -> int:
    digits = rng.randint(1, max_digits)
    low = 10 ** (digits - 1) if digits > 1 else minimum
    return rng.randint(max(low, minimum), 10 ** digits - 1)


def make_arithmetic(n: int, max_digits: int = 4, seed: int = 0,
                    ops: Sequence[str] = ARITHMETIC_OPS) -> list[dict[str, Any]]:
    """Goat-style arithmetic question/answer pairs, the four operations in turn.

    Operand digit counts are uniform in ``1..max_digits``; subtraction may go negative;
    division is integer division written ``"q R r"`` (``"q"`` when ``r == 0``), divisor >= 1.
    Every token is in :data:`entity_tracking.vocab.ARITHMETIC_WORDS` plus ``What``/``is``.
    """
    bad = [o for o in ops if o not in ARITHMETIC_OPS]
    if bad or not ops:
        raise DataError(f"ops must be a non-empty subset of {ARITHMETIC_OPS}, got {list(ops)}")
    if max_digits < 1:
        raise DataError(f"max_digits must be >= 1, got {max_digits}")
    rng = _rng(seed, "arithmetic")
    out = []
    for i in range(n):
        op = ops[i % len(ops)]
        a = _operand(rng, max_digits)
        b = _operand(rng, max_digits, minimum=1 if op == "/" else 0)
        if op == "+":
            answer = str(a + b)
        elif op == "-":
            answer = str(a - b)
        elif op == "*":
            answer = str(a * b)
        else:
            q, r = divmod(a, b)
            answer = f"{q} R {r}" if r else str(q)
        question = f"What is {a} {op} {b} ?"
        out.append({"id": i, "op": op, "a": a, "b": b, "question": question, "answer": answer,
                    "text": f"{question} {answer}"})
    return out


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    raise DataError(f"{tokenizer_name(tokenizer)} has neither a pad nor an eos token to pad with")


def encode_prompts(
    tokenizer,
    prompts: Sequence[Mapping[str, Any]],
    targets: Sequence[str] | None = None,
    padding_side: Literal["left", "right"] | None = None,
    method: Literal["auto", "offsets", "prefix"] = "auto",
) -> dict[str, torch.Tensor]:
    """Tokenize and pad prompt records, with every role's position shifted for the padding.

    Positions are recomputed for ``tokenizer`` from the records' structure (not read from the
    file), so the same data can be encoded for any tokenizer whose vocabulary covers the words.
    Pads with ``pad_token_id``, else ``eos_token_id``; ``padding_side`` defaults to the
    tokenizer's. ``targets`` (words, e.g. ``[p["answer"] for p in prompts]``) become
    single in-context token ids; omitted, the prompts' own answers are used where they have one
    (``-1`` otherwise). Returns LongTensors:

    * ``input_ids``, ``attention_mask``: ``[batch, seq]``
    * ``object_positions``, ``label_positions``: ``[batch, n_segments]`` (``-1`` past a
      prompt's own segment count when counts differ)
    * ``query_label_position``, ``prev_query_label_position`` (``-1`` where the query label is
      absent from the context), ``last_position``, ``length``, ``target``: ``[batch]``
    """
    if not prompts:
        raise DataError("encode_prompts needs at least one prompt")
    side = padding_side or getattr(tokenizer, "padding_side", "right")
    if side not in ("left", "right"):
        raise DataError(f"padding_side must be 'left' or 'right', got {side!r}")
    positions, ids = _locate_prompts(tokenizer, prompts, method=method)
    lengths = [len(r) for r in ids]
    seq = max(lengths)
    n_seg = max(len(p["objects"]) for p in positions)
    pad = _pad_id(tokenizer)
    B = len(prompts)
    input_ids = torch.full((B, seq), pad, dtype=torch.long)
    mask = torch.zeros((B, seq), dtype=torch.long)
    obj = torch.full((B, n_seg), -1, dtype=torch.long)
    lab = torch.full((B, n_seg), -1, dtype=torch.long)
    qpos = torch.empty(B, dtype=torch.long)
    prev = torch.full((B,), -1, dtype=torch.long)
    last = torch.empty(B, dtype=torch.long)
    for b, (row, pos) in enumerate(zip(ids, positions)):
        shift = seq - len(row) if side == "left" else 0
        input_ids[b, shift: shift + len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, shift: shift + len(row)] = 1
        m = len(pos["objects"])
        obj[b, :m] = torch.tensor(pos["objects"]) + shift
        lab[b, :m] = torch.tensor(pos["labels"]) + shift
        qpos[b] = pos["query_label"] + shift
        if pos["prev_query_label"] is not None:
            prev[b] = pos["prev_query_label"] + shift
        last[b] = pos["last"] + shift
    words = list(targets) if targets is not None else [p.get("answer") for p in prompts]
    if len(words) != B:
        raise DataError(f"{len(words)} targets for {B} prompts")
    target = torch.tensor(word_token_ids(tokenizer, words), dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "object_positions": obj,
        "label_positions": lab,
        "query_label_position": qpos,
        "prev_query_label_position": prev,
        "last_position": last,
        "length": torch.tensor(lengths, dtype=torch.long),
        "target": target,
    }


def word_token_ids(tokenizer, words: Iterable[str | None]) -> list[int]:
    """In-context token id of each word (``-1`` for None): the id it has after ``"contains the "``,
    i.e. the id a model must predict for it. Raises :class:`DataError` if a word is not one token."""
    cache: dict[str, int] = {}
    out = []
    for w in words:
        if w is None:
            out.append(-1)
            continue
        if w not in cache:
            tid = _is_one_token(tokenizer, w, _OBJECT_PROBES)
            if tid is None:
                raise DataError(f"target '{w}' is not exactly one token in context for {tokenizer_name(tokenizer)}")
            cache[w] = tid
        out.append(cache[w])
    return out


def encode_pairs(tokenizer, pairs: Sequence[Mapping[str, Any]],
                 padding_side: Literal["left", "right"] | None = None) -> dict[str, Any]:
    """Encode (base, source) records: path-patching or desideratum lines.

    Returns ``{"base": encode_prompts(bases), "source": encode_prompts(sources), "target":
    LongTensor[batch]}`` where ``target`` is each record's ``target_word`` as a token id of
    ``tokenizer``. Path-patching records also give ``source["corrupt_label_position"]``
    ``[batch]``, the source label position named by ``corrupt_label_index``.
    """
    base = encode_prompts(tokenizer, [p["base"] for p in pairs], padding_side=padding_side)
    source = encode_prompts(tokenizer, [p["source"] for p in pairs], padding_side=padding_side)
    if all("corrupt_label_index" in p for p in pairs):
        idx = torch.tensor([p["corrupt_label_index"] for p in pairs], dtype=torch.long)
        source["corrupt_label_position"] = source["label_positions"].gather(1, idx[:, None])[:, 0]
    target = torch.tensor(word_token_ids(tokenizer, [p["target_word"] for p in pairs]), dtype=torch.long)
    return {"base": base, "source": source, "target": target}


def token_table(tokenizer, prompt: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per token of ``prompt``: ``position``, ``token`` (decoded), ``role``.

    Roles: ``"box label"``, ``"object"``, ``"query label"``, ``"last token"``, ``"special"``
    (BOS), ``"other"``. The query label's context occurrence is a box label with
    ``prev_query_label=True``; the queried object has ``answer=True``.
    """
    (pos,), (ids,) = _locate_prompts(tokenizer, [prompt])
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    rows = []
    q = prompt.get("query_index")
    for t, tid in enumerate(ids):
        role = "special" if tid in special else "other"
        if t in pos["objects"]:
            role = "object"
        elif t in pos["labels"]:
            role = "box label"
        elif t == pos["query_label"]:
            role = "query label"
        elif t == pos["last"]:
            role = "last token"
        rows.append({
            "position": t,
            "token": tokenizer.decode([tid]),
            "role": role,
            "prev_query_label": t == pos["prev_query_label"],
            "answer": q is not None and t == pos["objects"][q],
        })
    return rows


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

FILES = {
    "eval": "eval.jsonl",
    "path_patching": "path_patching.jsonl",
    "mean_reference": "mean_reference.jsonl",
    "arithmetic": "arithmetic.jsonl",
    "manifest": "manifest.json",
}
DESIDERATA_DIR = "desiderata"


def data_dir(where: ResultsPaths | str | os.PathLike) -> Path:
    """The data folder of a :class:`ResultsPaths` or a folder path."""
    return where.data if isinstance(where, ResultsPaths) else Path(where)


def _need(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; build the data first "
                                f"(entity_tracking.data.build_datasets, or run the data chapter)")
    return path


def load_manifest(where: ResultsPaths | str | os.PathLike) -> dict[str, Any]:
    """The manifest of a data folder; checks the schema version."""
    m = read_json(_need(data_dir(where) / FILES["manifest"]))
    if m.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"data in {data_dir(where)} has schema {m.get('schema_version')}, "
                        f"this code reads {SCHEMA_VERSION}; rebuild it")
    return m


def load_eval_prompts(where: ResultsPaths | str | os.PathLike) -> list[dict[str, Any]]:
    """Evaluation prompts (``eval.jsonl``)."""
    return read_jsonl(_need(data_dir(where) / FILES["eval"]))


def load_path_patching(where: ResultsPaths | str | os.PathLike) -> list[dict[str, Any]]:
    """Path-patching (base, corrupt source) pairs (``path_patching.jsonl``)."""
    return read_jsonl(_need(data_dir(where) / FILES["path_patching"]))


def load_mean_reference(where: ResultsPaths | str | os.PathLike) -> list[dict[str, Any]]:
    """Mean-ablation reference prompts (``mean_reference.jsonl``)."""
    return read_jsonl(_need(data_dir(where) / FILES["mean_reference"]))


def load_desiderata(where: ResultsPaths | str | os.PathLike, name: str,
                    split: str | None = None) -> list[dict[str, Any]]:
    """Pairs of one desideratum, optionally one split (``"train"``, ``"eval"``, ``"test"``)."""
    if name not in DESIDERATA:
        raise DataError(f"unknown desideratum {name!r}; known: {sorted(DESIDERATA)}")
    if split is not None and split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    rows = read_jsonl(_need(data_dir(where) / DESIDERATA_DIR / f"{name}.jsonl"))
    return rows if split is None else [r for r in rows if r["split"] == split]


def load_arithmetic(where: ResultsPaths | str | os.PathLike) -> list[dict[str, Any]]:
    """Arithmetic question/answer records (``arithmetic.jsonl``)."""
    return read_jsonl(_need(data_dir(where) / FILES["arithmetic"]))


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    blob += json.dumps([getattr(tokenizer, "bos_token", None), getattr(tokenizer, "eos_token", None),
                        getattr(tokenizer, "pad_token", None)])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("Box")["input_ids"]
    return bos is not None and len(ids) > 0 and ids[0] == bos


def _display_path(name: str) -> str:
    """A tokenizer's name_or_path without this machine's absolute prefix."""
    p = Path(name)
    if p.is_absolute():
        try:
            from .config import find_repo_root

            return str(p.resolve().relative_to(find_repo_root()))
        except Exception:
            return p.name
    return name


def build_datasets(profile, paths: ResultsPaths | str | os.PathLike, tokenizer,
                   force: bool = False) -> dict[str, Path]:
    """Write every file of a profile's ``data:`` section into ``paths.data``; return their paths.

    ``profile`` is a :class:`entity_tracking.config.Profile` (or its ``DataSpec``). Files: see
    :data:`FILES` plus ``desiderata/<name>.jsonl`` for each of :data:`DESIDERATA`; the returned
    keys are ``"eval"``, ``"path_patching"``, ``"mean_reference"``, ``"arithmetic"``,
    ``"desiderata/<name>"`` and ``"manifest"``. If the manifest says the files were built from
    the same spec, tokenizer and schema, nothing is rebuilt unless ``force``.
    """
    spec = getattr(profile, "data", profile)
    out_dir = data_dir(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    k = spec.num_boxes
    spec_dict = spec.model_dump() if hasattr(spec, "model_dump") else dict(spec)
    fingerprint = hashlib.sha256(json.dumps(
        {"spec": spec_dict, "tokenizer": _tokenizer_fingerprint(tokenizer), "schema": SCHEMA_VERSION},
        sort_keys=True).encode()).hexdigest()[:16]
    result: dict[str, Path] = {key: out_dir / f for key, f in FILES.items()}
    for name in DESIDERATA:
        result[f"{DESIDERATA_DIR}/{name}"] = out_dir / DESIDERATA_DIR / f"{name}.jsonl"
    man_path = result["manifest"]
    if not force and man_path.is_file() and all(p.is_file() for p in result.values()):
        try:
            if read_json(man_path).get("fingerprint") == fingerprint:
                return result
        except (OSError, ValueError):
            pass

    vocab = build_vocabulary(tokenizer, spec.objects, num_boxes=k, min_objects=2 * k + 1)
    seed = spec.seed
    eval_ = make_eval_prompts(tokenizer, spec.n_eval, k, seed, vocab)
    n_tokens = eval_[0]["n_tokens"]
    pp = make_path_patching_pairs(tokenizer, spec.n_path_patching, k, seed, vocab)
    mean = make_mean_reference_prompts(tokenizer, spec.n_mean_reference, k, seed, vocab, n_tokens=n_tokens)
    des = {name: make_desiderata(tokenizer, name, spec.n_desiderata, k, seed, vocab) for name in DESIDERATA}
    arith = make_arithmetic(spec.n_arithmetic, spec.arithmetic_max_digits, seed)

    write_jsonl(result["eval"], eval_)
    write_jsonl(result["path_patching"], pp)
    write_jsonl(result["mean_reference"], mean)
    write_jsonl(result["arithmetic"], arith)
    for name, rows in des.items():
        write_jsonl(result[f"{DESIDERATA_DIR}/{name}"], rows)
    counts = {"eval": len(eval_), "path_patching": len(pp), "mean_reference": len(mean), "arithmetic": len(arith)}
    counts.update({f"{DESIDERATA_DIR}/{n}": len(r) for n, r in des.items()})
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fingerprint,
        "profile": getattr(profile, "name", None),
        "seed": seed,
        "num_boxes": k,
        "spec": spec_dict,
        "prompt_tokens": n_tokens,
        "tokenizer": {
            "name": _display_path(getattr(tokenizer, "name_or_path", "") or ""),
            "class": type(tokenizer).__name__,
            "fingerprint": _tokenizer_fingerprint(tokenizer),
            "bos_token": getattr(tokenizer, "bos_token", None),
            "adds_bos": _adds_bos(tokenizer),
            "padding_side": getattr(tokenizer, "padding_side", None),
        },
        "vocabulary": {
            "objects": list(vocab.objects),
            "labels": list(vocab.labels),
            "rejected_objects": list(vocab.rejected_objects),
            "rejected_labels": list(vocab.rejected_labels),
        },
        "counts": counts,
        "splits": {s: sum(r["split"] == s for r in next(iter(des.values()))) for s in SPLITS},
        "files": {key: str(p.relative_to(out_dir)) for key, p in result.items()},
    }
    write_json(man_path, manifest)
    return result
