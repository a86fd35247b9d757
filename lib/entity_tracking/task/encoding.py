"""Prompt records to tensors: token ids, attention masks, target ids and the positions the
circuit acts at (one column per position key, :func:`entity_tracking.schema.position_column`),
for any tokenizer.

>>> # batch = encode_prompts(tokenizer, prompts)   # {'input_ids': [batch, pos], 'last_position': [batch], ...}
>>> # positions_at(batch, "last")                  # [batch]: the last token of each row
"""

from __future__ import annotations

from typing import Any, Iterable, Literal, Mapping, Sequence

import torch

from ..schema import POSITION_SUFFIX, position_column
from .prompts import (
    OBJECT_PROBES,
    DataError,
    locate_prompts,
    one_token_id,
    tokenizer_name,
)

__all__ = ["encode_pairs", "encode_prompts", "position_keys", "positions_at", "token_table", "word_token_ids"]


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    raise DataError(f"{tokenizer_name(tokenizer)} has neither a pad nor an eos token to pad with")


def position_keys(batch: Mapping[str, Any]) -> list[str]:
    """The position keys a batch holds (``["query_label", "prev_query_label", "last", ...]``)."""
    return [k[: -len(POSITION_SUFFIX)] for k in batch if k.endswith(POSITION_SUFFIX)]


def positions_at(batch: Mapping[str, Any], key: str):
    """The positions of position key ``key`` in ``batch`` (``[batch]``, or ``[batch, n]`` for a key
    naming several positions per row), e.g. ``positions_at(batch, "last")``. Raises
    :class:`DataError` naming the key and the keys the batch has."""
    column = position_column(key)
    if column not in batch:
        raise DataError(f"the batch has no positions for '{key}' (its position keys: {position_keys(batch)})")
    return batch[column]


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
    positions, ids = locate_prompts(tokenizer, prompts, method=method)
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
            tid = one_token_id(tokenizer, w, OBJECT_PROBES)
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
    (pos,), (ids,) = locate_prompts(tokenizer, [prompt])
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


