"""The project's shared names: heads, circuit groups, the positions they act at, and sites.

One vocabulary for every layer: a head is ``(layer, head)``; the paper's four groups
(:data:`GROUPS`) and ours (:data:`EXTENSION_GROUPS`) act at positions named by a *position key*
(``"last"``, ``"query_label"``, ``"prev_query_label"``: the prompt records' ``positions``); a
*site* names an activation of a block (:data:`SITES`). Profiles are validated against these names,
and the intervention kernel, the methods and the book all read them from here.

A position is named by its key everywhere: in params, circuits, the methods' arguments and the
chapters. Only a tensor batch (:func:`entity_tracking.task.encode_prompts`) stores it under a
longer column name, :func:`position_column` of the key, beside the other columns
(``input_ids``, ``target``, ...); read it with :func:`entity_tracking.task.encoding.positions_at`.

>>> GROUP_POSITIONS["position_detector"]
'query_label'
>>> position_column("last")
'last_position'
"""

from __future__ import annotations

__all__ = ["ALL_GROUPS", "EXTENSION_GROUPS", "GROUPS", "GROUP_LABELS", "GROUP_POSITIONS", "HEAD_SITES", "Head",
           "POSITION_SUFFIX", "RESID_SITES", "SITES", "position_column"]

Head = tuple[int, int]

#: Groups in the order path patching discovers them (from the logits backwards).
GROUPS: tuple[str, ...] = ("value_fetcher", "position_transmitter", "position_detector", "structure_reader")

#: Groups of ours beyond the paper's four (module docstring); a circuit holds them only when added.
EXTENSION_GROUPS: tuple[str, ...] = ("object_writer",)
#: Every group a circuit may hold, the paper's first.
ALL_GROUPS: tuple[str, ...] = GROUPS + EXTENSION_GROUPS

#: Display names with the paper's letters (ours marked as ours).
GROUP_LABELS: dict[str, str] = {
    "value_fetcher": "Value Fetcher (A)",
    "position_transmitter": "Position Transmitter (B)",
    "position_detector": "Position Detector (C)",
    "structure_reader": "Structure Reader (D)",
    "object_writer": "Object Writer (ours)",
}

#: A batch stores the positions of key ``k`` in its column ``k + POSITION_SUFFIX``.
POSITION_SUFFIX = "_position"


def position_column(key: str) -> str:
    """The batch column holding the positions of position key ``key`` (module docstring)."""
    if not key or key.endswith(POSITION_SUFFIX):
        raise ValueError(f"{key!r} is not a position key: name a position by its key (e.g. 'last'), "
                         f"not by its batch column ('last{POSITION_SUFFIX}')")
    return key + POSITION_SUFFIX


#: Where each group acts: a position key (module docstring).
GROUP_POSITIONS: dict[str, str] = {
    "value_fetcher": "last",
    "position_transmitter": "last",
    "position_detector": "query_label",
    "structure_reader": "prev_query_label",
    "object_writer": "prev_query_label",  # the queried label's occurrence in the context
}

#: Per-head sites, in the order a block computes them.
HEAD_SITES: tuple[str, ...] = ("q", "k", "v", "z")
#: Residual-stream sites of a block: its input, the attention output (o_proj output) and its output.
RESID_SITES: tuple[str, ...] = ("resid_pre", "attn_out", "resid_post")
#: Every site, in forward order within one block.
SITES: tuple[str, ...] = ("resid_pre", "q", "k", "v", "z", "attn_out", "resid_post")
