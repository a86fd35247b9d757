"""Where heads look: attention patterns of chosen heads from chosen query positions.

Path patching says *that* a head matters; its attention pattern says *what it reads*. A Value
Fetcher should attend from the last token to the correct object, a Position Detector from the
query label to the label's occurrence in the context. The fused attention kernels (SDPA, flash)
never materialise the weights, so this module reads the queries and keys of the layers it needs
through the intervention kernel and recomputes the weights from them with the architecture
table's :meth:`~entity_tracking.model.arch.Arch.attention_pattern` (the layer's scaling, masks and
window). It reads only; no activation is changed.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from ..intervene.patching import Session, as_batch, check_positions, run
from ..schema import GROUP_LABELS, GROUPS, Head

__all__ = ["BATCH_ENV", "ROLES", "attention_patterns", "describe_head", "explorer", "mass_by_role"]


def attention_patterns(lm, batch, heads: Sequence[Head], query_positions: torch.Tensor,
                       *, batch_size: int = 32) -> torch.Tensor:
    """Attention weights ``[len(heads), batch, seq]`` of each ``(layer, head)`` from each
    example's query position (``query_positions [batch]``) to every key position.

    One run through the kernel reads the queries and keys of the layers asked for; the weights
    are recomputed from them by the layer's own rules (:meth:`~entity_tracking.model.arch.Arch.rope`,
    :meth:`~entity_tracking.model.arch.Arch.attention_pattern`), whatever attention implementation
    the model runs with.

    >>> pattern = attention_patterns(lm, batch, [(3, 5)], batch["last_position"])[0]  # [batch, seq]
    >>> torch.allclose(pattern.sum(-1), torch.ones(len(pattern)))
    True
    """
    b = as_batch(batch)
    ids, mask = b["input_ids"], b["attention_mask"]
    B, S = ids.shape
    qpos = check_positions(query_positions, S, "query position", mask)  # [batch, 1]
    arch = lm.arch
    for layer, head in heads:
        arch.layer_index(layer)
        arch.check_head(head, arch.n_heads, "query")
    layers = sorted({arch.layer_index(layer) for layer, _ in heads})
    cache = run(Session(lm, b, batch_size=batch_size, desc="queries and keys"),
                reads=[(site, layer) for layer in layers for site in ("q", "k")], logits=None).cache
    rows = torch.arange(B)[:, None]
    out = torch.zeros(len(heads), B, S)
    with torch.no_grad():
        for layer in layers:
            q = arch.rope(lm, "q", layer, cache["q", layer][rows, qpos], position_ids=qpos)  # [batch, 1, n_heads, d_head]
            k = arch.rope(lm, "k", layer, cache["k", layer])
            pattern = arch.attention_pattern(lm, layer, q, k, query_positions=qpos, attention_mask=mask)
            for i, (l, head) in enumerate(heads):
                if arch.layer_index(l) == layer:
                    out[i] = pattern[:, head, 0].float().cpu()
    return out


#: Token roles of an entity-tracking prompt, as :func:`mass_by_role` names them.
ROLES = ("correct object", "other objects", "queried box label", "other box labels", "query label", "first token", "other tokens")


def mass_by_role(patterns: torch.Tensor, batch, query_index: torch.Tensor) -> dict[str, float]:
    """Mean attention mass on each role of :data:`ROLES`, from ``patterns [batch, seq]``.

    ``query_index [batch]`` is each example's queried segment (``prompt["query_index"]``); the
    correct object and the queried box label are the object and label of that segment."""
    b = as_batch(batch)
    B, S = patterns.shape
    rows = torch.arange(B)
    qi = torch.as_tensor(query_index, dtype=torch.long)
    obj, lab = b["object_positions"], b["label_positions"]
    role = torch.full((B, S), ROLES.index("other tokens"), dtype=torch.long)
    first = (b["attention_mask"].cumsum(1) == 1) & (b["attention_mask"] == 1)
    role[first] = ROLES.index("first token")
    for positions, other, correct in ((obj, "other objects", "correct object"), (lab, "other box labels", "queried box label")):
        valid = positions >= 0
        role[rows[:, None].expand_as(positions)[valid], positions[valid]] = ROLES.index(other)
        role[rows, positions[rows, qi]] = ROLES.index(correct)
    role[rows, b["query_label_position"]] = ROLES.index("query label")
    return {r: float((patterns * (role == i)).sum(1).mean()) for i, r in enumerate(ROLES)}


#: Set by the book's runner in every kernel it executes: there is no reader to move a slider.
BATCH_ENV = "ENTITY_TRACKING_BATCH"


def describe_head(lm, circuit, batch, query_index: torch.Tensor, step: str, layer: int, head: int) -> str:
    """One head in words: its score in ``step``, whether it is in ``circuit``'s group, and where it
    attends (mass by token role, :func:`mass_by_role`) from the group's position."""
    import pandas as pd


    s = circuit.scores[step][layer][head]
    pos = as_batch(batch)[f"{circuit.positions[step]}_position"]
    pat = attention_patterns(lm, batch, [(layer, head)], pos)[0]
    inside = (layer, head) in circuit.groups[step]
    return (f"{GROUP_LABELS[step]} step, head {layer}.{head}: score {s:+.4f} "
            f"({'in' if inside else 'not in'} the circuit)\n"
            + pd.Series(mass_by_role(pat, batch, query_index)).round(3).to_string())


def explorer(lm, circuit, batch, query_index: torch.Tensor):
    """In JupyterLab or Colab, a step dropdown and layer/head sliders that print
    :func:`describe_head`. Returns None (and shows nothing) when ``$ENTITY_TRACKING_BATCH`` is
    set, as the runner sets it: a batch run has no reader, and a widget cell once left papermill
    waiting for ever for a kernel reply."""
    if os.environ.get(BATCH_ENV):
        return None
    import ipywidgets as widgets


    return widgets.interact(lambda step, layer, head: print(describe_head(lm, circuit, batch, query_index, step, layer, head)),
                            step=widgets.Dropdown(options=list(GROUPS)),
                            layer=widgets.IntSlider(min=0, max=lm.arch.n_layers - 1),
                            head=widgets.IntSlider(min=0, max=lm.arch.n_heads - 1))
