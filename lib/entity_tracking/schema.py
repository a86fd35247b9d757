"""The project's shared names: heads, circuit groups, the positions they act at, and sites.

One vocabulary for every layer: a head is ``(layer, head)``; the paper's four groups
(:data:`GROUPS`) and ours (:data:`EXTENSION_GROUPS`) act at positions named by the keys of
:func:`entity_tracking.task.encode_prompts` (``last`` is the batch column ``last_position``); a
*site* names an activation of a block (:data:`SITES`). Profiles are validated against these names,
and the intervention kernel, the methods and the book all read them from here.

>>> GROUP_POSITIONS["position_detector"]
'query_label'
"""

from __future__ import annotations

__all__ = ["ALL_GROUPS", "EXTENSION_GROUPS", "GROUPS", "GROUP_LABELS", "GROUP_POSITIONS", "HEAD_SITES", "Head",
           "RESID_SITES", "SITES"]

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

#: Where each group acts: a position key of ``data.encode_prompts`` (without ``_position``).
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
