"""Planting the paper's mechanism in designated heads: the interchange-intervention loss of IIT
(Geiger et al. 2022) that trains a model to implement :mod:`~entity_tracking.methods.causal_model`
(issue 29; work in progress: the losses and the ground-truth file, not yet a planted model).

For a pair of prompts and a variable of the causal model, the designated heads of that variable
are run on the source, their outputs written into the base run at the aligned position (the
group's position key: ``"query_label"`` for the Position Detectors, ``"last"`` for the Position
Transmitters and Value Fetchers), and the base run is trained to give the causal model's
counterfactual answer (:func:`~entity_tracking.methods.causal_model.interchange`): the base's
object at the source's index for ``position``, the source's object for ``value``. The writes go
through the one kernel (:func:`entity_tracking.intervene.patching.run`, ``grad=True``), as DCM's
do; nothing here is a second intervention mechanism. SIIT's *strict* loss (Gupta et al. 2024)
asks the opposite of the heads outside the circuit: resample-ablated (their outputs at every
position taken from another prompt), the base run must still give its own answer
(:func:`strict_loss`). Which heads implement which variable is written beside the planted model
(:class:`GroundTruth`, ``ground_truth.json``): the known answer every method is scored against.

>>> # loss = iit_loss(lm, records, heads=[(1, 0), (1, 3)], position="last", variable="value")
>>> # loss.backward(); optimizer.step()
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from ..intervene.patching import HeadPatch, Session, heads_by_layer, run
from ..io import read_json, write_json
from ..schema import Head
from ..task.encoding import encode_pairs, word_token_ids
from .causal_model import GROUP_VARIABLE, VARIABLES, CausalModelError, interchange
from .dcm import masked_logits, source_head_outputs

__all__ = ["GROUND_TRUTH_FILE", "GroundTruth", "Recovery", "counterfactual_targets", "iit_loss",
           "interchange_logits", "recovery", "resample_ablated_logits", "selection_recovery", "strict_loss"]

#: The file beside a planted model that names its designated heads.
GROUND_TRUTH_FILE = "ground_truth.json"


@dataclass(frozen=True)
class GroundTruth:
    """The heads planted to implement each group of the paper's circuit, and where.

    ``heads[group]``: ``(layer, head)`` pairs; ``positions[group]``: the position key the group
    acts at (:func:`entity_tracking.task.positions_at`); each group implements the causal
    model's variable :data:`~entity_tracking.methods.causal_model.GROUP_VARIABLE` ``[group]``.
    ``n_layers``/``n_heads`` bound the heads. A head planted in two groups is an error.

    >>> t = GroundTruth({"value_fetcher": [(3, 1)]}, {"value_fetcher": "last"}, n_layers=4, n_heads=8)
    >>> t.variable("value_fetcher"), t.outside()[:2]
    ('value', [(0, 0), (0, 1)])
    """

    heads: Mapping[str, Sequence[Head]]
    positions: Mapping[str, str]
    n_layers: int
    n_heads: int
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", {g: [(int(l), int(h)) for l, h in hs] for g, hs in self.heads.items()})
        unknown = sorted(set(self.heads) - set(GROUP_VARIABLE))
        if unknown:
            raise ValueError(f"ground truth: unknown group(s) {unknown}; groups are {sorted(GROUP_VARIABLE)}")
        missing = sorted(g for g in self.heads if g not in self.positions)
        if missing:
            raise ValueError(f"ground truth: no position for group(s) {missing}")
        seen: dict[Head, str] = {}
        for g, hs in self.heads.items():
            for l, h in hs:
                if not (0 <= l < self.n_layers and 0 <= h < self.n_heads):
                    raise ValueError(f"ground truth: head {l}.{h} of {g} is outside {self.n_layers} layers x "
                                     f"{self.n_heads} heads")
                if (l, h) in seen:
                    raise ValueError(f"ground truth: head {l}.{h} is planted in both {seen[(l, h)]} and {g}")
                seen[(l, h)] = g

    def variable(self, group: str) -> str:
        """The causal model's variable the group implements."""
        return GROUP_VARIABLE[group]

    def circuit(self) -> list[Head]:
        """Every planted head, in layer order."""
        return sorted(h for hs in self.heads.values() for h in hs)

    def outside(self) -> list[Head]:
        """Every head of the model that is not planted: what SIIT's strict loss resample-ablates."""
        inside = set(self.circuit())
        return [(l, h) for l in range(self.n_layers) for h in range(self.n_heads) if (l, h) not in inside]

    def to_json(self) -> dict[str, Any]:
        return {"heads": {g: [list(h) for h in hs] for g, hs in self.heads.items()}, "positions": dict(self.positions),
                "variables": {g: self.variable(g) for g in self.heads}, "n_layers": self.n_layers,
                "n_heads": self.n_heads, "meta": dict(self.meta)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "GroundTruth":
        return cls(obj["heads"], obj["positions"], int(obj["n_layers"]), int(obj["n_heads"]), obj.get("meta", {}))

    def save(self, model_dir: str | os.PathLike) -> Path:
        """Write ``ground_truth.json`` into the planted model's directory."""
        path = Path(model_dir) / GROUND_TRUTH_FILE
        write_json(path, self.to_json())
        return path

    @classmethod
    def load(cls, model_dir: str | os.PathLike) -> "GroundTruth":
        path = Path(model_dir) / GROUND_TRUTH_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no ground truth beside this model (only planted models have one)")
        return cls.from_json(read_json(path))


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
    logits = interchange_logits(lm, pairs, heads, position)
    return torch.nn.functional.cross_entropy(logits.float(), target.to(logits.device))


def interchange_logits(lm, pairs: Sequence[Mapping[str, Any]], heads: Sequence[Head], position: str) -> torch.Tensor:
    """Last-token logits ``[batch, vocab]`` of each base run with ``heads``' outputs at ``position``
    taken from its source run (what :func:`iit_loss` trains; under ``torch.no_grad()`` its argmax
    against :func:`counterfactual_targets` is the interchange accuracy)."""
    enc = encode_pairs(lm.tokenizer, pairs, padding_side="right")
    source_z = source_head_outputs(lm, enc["source"], heads, position)
    mask = torch.zeros(len(heads))  # 0: every designated head takes the source's value
    return masked_logits(lm, enc["base"], source_z, heads, position, mask)

def strict_loss(lm, pairs: Sequence[Mapping[str, Any]], outside: Sequence[Head]) -> torch.Tensor:
    """SIIT's strict loss: cross-entropy, at the base's last token, between the base run with every
    head of ``outside`` (the heads not planted, :meth:`GroundTruth.outside`) resample-ablated --
    its output at every position taken from the pair's source prompt -- and the base's own answer.
    A model whose non-circuit heads carry nothing the task needs pays nothing. Base and source of
    a pair must have one token length (the desiderata ``positional`` and ``object_value`` do)."""
    logits, target = resample_ablated_logits(lm, pairs, outside)
    return torch.nn.functional.cross_entropy(logits.float(), target.to(logits.device))


def resample_ablated_logits(lm, pairs: Sequence[Mapping[str, Any]], outside: Sequence[Head]
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [batch, vocab], base answers [batch])``: each base run with every head of
    ``outside`` resample-ablated from its source (what :func:`strict_loss` trains; under
    ``torch.no_grad()`` the argmax against the answers is the accuracy the planting keeps)."""
    if not outside:
        raise ValueError("strict_loss: no heads outside the circuit to resample-ablate")
    enc = encode_pairs(lm.tokenizer, pairs, padding_side="right")
    base, source = enc["base"], enc["source"]
    if base["input_ids"].shape != source["input_ids"].shape or not torch.equal(base["last_position"],
                                                                              source["last_position"]):
        raise ValueError("strict_loss: base and source prompts differ in token length; resample-ablation takes "
                         "the source's head outputs position by position, so pair prompts of one length")
    by_layer = heads_by_layer(outside)
    cache = run(Session(lm, source, batch_size=None), reads=[("z", l) for l in by_layer], logits=None).cache
    writes = [HeadPatch("z", l, hs, cache["z", l][:, :, hs]) for l, hs in by_layer.items()]
    return run(Session(lm, base, batch_size=None, out_device=lm.device), writes, grad=True).logits, base["target"]


@dataclass(frozen=True)
class Recovery:
    """How well a set of heads a method found matches the planted ones: ``found`` heads, of which
    ``hits`` are planted, out of ``planted``. ``precision`` is ``hits/found`` (``nan`` when the
    method found nothing), ``recall`` ``hits/planted`` (``nan`` when nothing is planted)."""

    found: int
    planted: int
    hits: int

    @property
    def precision(self) -> float:
        return self.hits / self.found if self.found else float("nan")

    @property
    def recall(self) -> float:
        return self.hits / self.planted if self.planted else float("nan")

    @classmethod
    def of(cls, found: Sequence[Head], planted: Sequence[Head]) -> "Recovery":
        f = {(int(l), int(h)) for l, h in found}
        p = {(int(l), int(h)) for l, h in planted}
        return cls(len(f), len(p), len(f & p))


def recovery(truth: GroundTruth, groups: Mapping[str, Sequence[Head]]) -> dict[str, Recovery]:
    """Per planted group, the :class:`Recovery` of the heads a circuit discovery put in that group
    (``groups``: a :class:`~entity_tracking.methods.circuit.Circuit`'s ``groups``); ``"circuit"``
    scores the union of every group against every planted head, whatever group each was put in.

    >>> t = GroundTruth({"position_detector": [(1, 0), (1, 1)], "value_fetcher": [(3, 0)]},
    ...                 {"position_detector": "query_label", "value_fetcher": "last"}, n_layers=4, n_heads=4)
    >>> r = recovery(t, {"position_detector": [(1, 0), (2, 3)], "value_fetcher": [(3, 0)]})
    >>> r["position_detector"].precision, r["position_detector"].recall, r["circuit"].recall
    (0.5, 0.5, 0.6666666666666666)
    """
    out = {g: Recovery.of(groups.get(g, []), heads) for g, heads in truth.heads.items()}
    out["circuit"] = Recovery.of([h for hs in groups.values() for h in hs], truth.circuit())
    return out


def selection_recovery(truth: GroundTruth, selected: Sequence[Head], variable: str,
                       among: Optional[Sequence[Head]] = None) -> Recovery:
    """The :class:`Recovery` of the heads a method selected for one variable of the causal model
    (DCM's heads for the ``positional`` desideratum: ``"position"``; for ``object_value``:
    ``"value"``) against the heads planted to implement it. ``among``: the candidate heads the
    method chose from (e.g. one group's); the planted heads outside them cannot be found and are
    not counted.

    >>> t = GroundTruth({"value_fetcher": [(3, 0), (3, 1)]}, {"value_fetcher": "last"}, n_layers=4, n_heads=4)
    >>> r = selection_recovery(t, [(3, 0), (2, 2)], "value")
    >>> r.hits, r.precision, r.recall
    (1, 0.5, 0.5)
    """
    if variable not in VARIABLES:
        raise CausalModelError(f"unknown variable {variable!r}; the variables are {list(VARIABLES)}")
    planted = [h for g, hs in truth.heads.items() if truth.variable(g) == variable for h in hs]
    if among is not None:
        pool = {(int(l), int(h)) for l, h in among}
        planted = [h for h in planted if h in pool]
    return Recovery.of(selected, planted)
