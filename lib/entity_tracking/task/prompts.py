"""Prompt templates, token spans and the vocabulary of one-token words (see :mod:`entity_tracking.task`).

A prompt record is rendered from its structure fields (:func:`render_prompt`), and every object and
label is located as a token position through the tokenizer's offsets (:func:`locate_spans`), never
hard-coded. :func:`build_vocabulary` keeps the words that are one token in every context a template
gives them, and fails loudly when too few survive.

>>> # text, spans = render_prompt(make_prompt(["apple", "cup"], ["F", "A"], query_index=1))
"""

from __future__ import annotations

import bisect
import functools
import string
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

from . import vocab as _vocab

__all__ = ["ADDITIONAL_BOXES_TEXT", "ARITHMETIC_OPS", "DataError", "QUERY_FORM", "RANDOM_TEXT_END", "RANDOM_TEXT_START", "SCHEMA_VERSION", "SEGMENT_FORMS", "SPLITS", "Vocabulary", "annotate_prompts", "build_vocabulary", "locate_spans", "make_prompt", "render_parts", "render_prompt", "tokenizer_name"]


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
OBJECT_PROBES: tuple[tuple[str, str], ...] = (("the ", " is in"), ("the ", ", is"), ("contains the ", ", the"),
                                               ("contains the ", ". Box"))
LABEL_PROBES: tuple[tuple[str, str], ...] = (("in Box ", ", the"), ("in Box ", ". Box"), ("Box ", " contains"),
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


def one_token_id(tokenizer, word: str, probes: Sequence[tuple[str, str]]) -> int | None:
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

    ``objects=None`` uses :data:`entity_tracking.task.vocab.OBJECTS` and silently drops words that
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
        tid = one_token_id(tokenizer, w, OBJECT_PROBES)
        (kept_o if tid is not None else rej_o).append(w)
        if tid is not None:
            ids[w] = tid
    for w in labels:
        tid = one_token_id(tokenizer, w, LABEL_PROBES)
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


def render_parts(prompt: Mapping[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """The pieces :func:`render_prompt` joins into a prompt's text, in order, and the character
    spans of its structure fields: the templates' literal text and the words that fill their
    slots, each a piece of its own (``["The ", "comb", " is in Box ", "U", ", ", ...]``; the first
    capitalised). A record needs only ``objects``, ``labels``, ``forms`` and ``query_label``
    (``prefix``, ``suffix``, ``separator`` and ``inserts`` default to the paper's prompt)."""
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
    question_start = cursor
    emit(CONTEXT_END)
    spans["query_label"] = emit_template(QUERY_FORM, {"label": prompt["query_label"]})["label"]
    spans["question"] = (question_start, cursor)
    labels = list(prompt["labels"])
    q = prompt["query_label"]
    spans["prev_query_label"] = spans["labels"][labels.index(q)] if q in labels else None
    first = next((i for i, part in enumerate(parts) if part), None)
    if first is not None:
        parts[first] = parts[first][:1].upper() + parts[first][1:]
    return [part for part in parts if part], spans


def render_prompt(prompt: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Text and character spans of a prompt record's structure fields.

    Returns ``(text, spans)`` with ``spans = {"objects": [(s, e)], "labels": [(s, e)],
    "query_label": (s, e), "prev_query_label": (s, e) | None, "question": (s, e)}``; the
    ``question`` is what follows the context (``". Box F contains the"``): ``text[:question[0]]``
    is the context alone. The text is :func:`render_parts` joined.
    """
    parts, spans = render_parts(prompt)
    return "".join(parts), spans


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


def locate_prompts(tokenizer, prompts: Sequence[Mapping[str, Any]], method: str = "auto"):
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
    positions, ids = locate_prompts(tokenizer, prompts)
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


