"""Planting the paper's mechanism in designated heads: the interchange-intervention loss of IIT
(Geiger et al. 2022) that trains a model to implement :mod:`~entity_tracking.methods.causal_model`
(issue 29; work in progress: the loss and one training step, not yet a planted model).

For a pair of prompts and a variable of the causal model, the designated heads of that variable
are run on the source, their outputs written into the base run at the aligned position (the
group's position key: ``"query_label"`` for the Position Detectors, ``"last"`` for the Position
Transmitters and Value Fetchers), and the base run is trained to give the causal model's
counterfactual answer (:func:`~entity_tracking.methods.causal_model.interchange`): the base's
object at the source's index for ``position``, the source's object for ``value``. The writes go
through the one kernel (:func:`entity_tracking.intervene.patching.run`, ``grad=True``), as DCM's
do; nothing here is a second intervention mechanism.

>>> # loss = iit_loss(lm, records, heads=[(1, 0), (1, 3)], position="last", variable="value")
>>> # loss.backward(); optimizer.step()
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..schema import Head
from ..task.encoding import encode_pairs, word_token_ids
from .causal_model import VARIABLES, CausalModelError, interchange
from .dcm import masked_logits, source_head_outputs

__all__ = ["counterfactual_targets", "iit_loss"]


def counterfactual_targets(tokenizer, pairs: Sequence[Mapping[str, Any]], variable: str) -> torch.Tensor:
    """``[batch]`` token ids of the causal model's answer to each (base, source) pair with
    ``variable`` interchanged (:func:`~entity_tracking.methods.causal_model.interchange`)."""
    if variable not in VARIABLES:
        raise CausalModelError(f"unknown variable {variable!r}; the variables are {list(VARIABLES)}")
    return torch.tensor(word_token_ids(tokenizer, [interchange(p, variable) for p in pairs]), dtype=torch.long)


def iit_loss(lm, pairs: Sequence[Mapping[str, Any]], heads: Sequence[Head], position: str, variable: str) -> torch.Tensor:
    """The IIT loss of ``heads`` as the implementation of ``variable``: cross-entropy, at the base's
    last token, between the base run with ``heads``' outputs at ``position`` taken from the source
    run and the causal model's counterfactual answer. Differentiable in the model's weights (the
    source run is recorded without a graph, as in IIT's interchange of a fixed source value).

    Args:
        lm: a :class:`~entity_tracking.load.LoadedModel` whose weights are being trained.
        pairs: (base, source) records (:func:`entity_tracking.task.make_desiderata` lines, or any
            records with ``base`` and ``source`` prompts).
        heads: the designated heads ``(layer, head)`` of ``variable``.
        position: the aligned position key (:func:`entity_tracking.task.positions_at`).
        variable: a variable of the causal model (``"position"``, ``"value"``, ``"query_label"``).
    """
    if not heads:
        raise ValueError(f"iit_loss: no heads designated for {variable!r}")
    target = counterfactual_targets(lm.tokenizer, pairs, variable)
    enc = encode_pairs(lm.tokenizer, pairs, padding_side="right")
    source_z = source_head_outputs(lm, enc["source"], heads, position)
    mask = torch.zeros(len(heads))  # 0: every designated head takes the source's value
    logits = masked_logits(lm, enc["base"], source_z, heads, position, mask)
    return torch.nn.functional.cross_entropy(logits.float(), target.to(logits.device))
