"""The entity-tracking circuit as data: four groups of heads, each read at one token position.

The paper's circuit (paper-methods §2) is a chain of four groups of attention heads. The
**Structure Reader** heads (group D) act at the query label's occurrence in the context; the
**Position Detector** heads (C) at the query label; the **Position Transmitter** (B) and
**Value Fetcher** (A) heads at the last token, where the Value Fetchers attend to the correct
object and write it to the logits. A :class:`Circuit` records the heads of each group as
``(layer, head)`` pairs, the position each group acts at (a key of the batches built by
:func:`entity_tracking.task.encode_prompts`), the path-patching scores they were selected by,
and the parameters and data they came from. The circuit chapter writes one JSON file per model
(``results/<profile>/circuits/<model>.json``); the faithfulness, DCM and CMAP chapters read them.

**Extension groups (ours).** A circuit may also hold groups the paper's four steps cannot reach
(:data:`EXTENSION_GROUPS`): the **Object Writers**, heads that write the bound object onto the
queried label's occurrence in the context, where a model that binds by content stores it and its
Value Fetchers read it (found by :func:`entity_tracking.methods.path_patching.extend_circuit`).
:meth:`Circuit.with_group` adds one; :attr:`Circuit.group_names` lists the groups a circuit holds
(the paper's four first). A circuit without extension groups is exactly the paper's, in memory and
in its JSON file, and everything written for the paper's four groups (:data:`GROUPS`) reads it
as before.

**Which heads could have scored** (:meth:`Circuit.scorable`). A path-patching step scores a
sender through receivers that read the residual stream entering their own layer, so a sender in
a layer at or above its step's highest receiver layer scores exactly 0: under the paper's
selection such heads still fill a group (ties go by head index) as padding. The verdicts read a
group's overlap against chance over the heads that could have scored
(:func:`entity_tracking.methods.verdicts.overlap_against_chance`).

**Splits (ours).** Every step that *selects* heads runs on prompts disjoint from the evaluation
prompts its result is scored on: path patching, its null and the Object Writer step on the
path-patching pairs, and minimality on the pairs' base prompts (:func:`minimality_prompts`,
``circuit.minimality_split: selection``; ``evaluation`` prunes on the evaluation prompts, as the
book did before).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..io import read_json, write_json
from ..schema import (
    ALL_GROUPS,
    EXTENSION_GROUPS,
    GROUP_LABELS,
    GROUP_POSITIONS,
    GROUPS,
    Head,
)

__all__ = ["ALL_GROUPS", "EXTENSION_GROUPS", "GROUPS", "GROUP_LABELS", "GROUP_POSITIONS", "MINIMALITY_SPLITS", "Circuit",
           "Head", "minimality_prompts"]

SCHEMA_VERSION = 1

#: The prompts minimality may prune on (``circuit.minimality_split``): ``"selection"`` (ours), the
#: base prompts of the path-patching pairs, disjoint from the evaluation prompts; ``"evaluation"``,
#: the evaluation prompts faithfulness is scored on (a leak wherever pruning happens).
MINIMALITY_SPLITS = ("selection", "evaluation")


def minimality_prompts(split: str, pairs: list[dict[str, Any]], evaluation: list[dict[str, Any]],
                       n: int) -> list[dict[str, Any]]:
    """The first ``n`` prompts minimality prunes on: the base prompts of the path-patching
    ``pairs`` (records with a ``"base"`` prompt) for ``split="selection"``, the ``evaluation``
    prompts for ``"evaluation"`` (see :data:`MINIMALITY_SPLITS`)."""
    if split not in MINIMALITY_SPLITS:
        raise ValueError(f"unknown minimality split {split!r}; splits are {list(MINIMALITY_SPLITS)}")
    if n < 1:
        raise ValueError(f"minimality needs at least one prompt, got n={n}")
    prompts = [p["base"] for p in pairs] if split == "selection" else list(evaluation)
    if not prompts:
        raise ValueError(f"no prompts in the '{split}' split to run minimality on")
    return prompts[:n]


def _heads(items: Iterable) -> list[Head]:
    out = []
    for it in items:
        layer, head = (int(x) for x in it)
        out.append((layer, head))
    return out


@dataclass
class Circuit:
    """Heads per group for one model. ``groups[g]`` is a list of ``(layer, head)``.

    ``groups`` always holds the paper's four groups (missing ones are empty) and any of
    :data:`EXTENSION_GROUPS` given; ``positions`` holds a position key per group held."""

    model: str
    groups: dict[str, list[Head]]
    positions: dict[str, str] = field(default_factory=lambda: dict(GROUP_POSITIONS))
    scores: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.groups) - set(ALL_GROUPS)
        if unknown:
            raise ValueError(f"unknown circuit groups {sorted(unknown)}; expected a subset of {ALL_GROUPS}")
        held = GROUPS + tuple(g for g in EXTENSION_GROUPS if g in self.groups)
        self.groups = {g: _heads(self.groups.get(g, [])) for g in held}
        # positions of extension groups this circuit does not hold are dropped (a template's)
        self.positions = {g: p for g, p in self.positions.items() if g in held or g not in EXTENSION_GROUPS}
        for g in held:
            self.positions.setdefault(g, GROUP_POSITIONS[g])

    @property
    def group_names(self) -> tuple[str, ...]:
        """The groups this circuit holds: the paper's four, then any extension groups (ours)."""
        return tuple(self.groups)

    @property
    def n_heads(self) -> int:
        return sum(len(v) for v in self.groups.values())

    def groups_at(self, position: str) -> list[str]:
        """The groups with heads acting at ``position``, in :attr:`group_names` order (e.g.
        ``"last"``: the Value Fetchers and the Position Transmitters when both have heads)."""
        return [g for g in self.group_names if self.positions[g] == position and self.groups[g]]

    def ranked(self, group: str, k: int | None = None) -> list[Head]:
        """The heads of ``group`` from the strongest to the weakest by their path-patching score
        (``scores[group][layer][head]``, most negative first: the largest drop of p(correct)),
        heads with equal scores in the order held; the first ``k`` when given."""
        if group not in self.groups:
            raise ValueError(f"circuit '{self.model}' holds no group '{group}' (groups: {list(self.group_names)})")
        if self.groups[group] and not self.scores.get(group):
            raise ValueError(f"circuit '{self.model}' has no path-patching scores for '{group}' to rank its heads by")
        order = sorted(self.groups[group], key=lambda lh: self.scores[group][lh[0]][lh[1]])
        return order if k is None else order[:k]

    def shape(self) -> tuple[int, int]:
        """``(n_layers, n_heads)`` of the model: from ``meta``, else from a score map."""
        if "n_layers" in self.meta and "n_heads" in self.meta:
            return int(self.meta["n_layers"]), int(self.meta["n_heads"])
        for m in self.scores.values():
            if m:
                return len(m), len(m[0])
        raise ValueError(f"circuit '{self.model}' records neither its model's shape (meta n_layers/n_heads) nor a score map")

    def receivers(self, group: str) -> list[Head] | None:
        """The receivers of the step that found ``group`` (``meta["receivers"]``, or
        ``meta["extension"][group]["receivers"]`` for an extension group): ``[]`` for a step that
        scores through the logits (the Value Fetchers), None when the circuit does not record them."""
        ext = self.meta.get("extension", {}).get(group)
        rec = ext.get("receivers") if ext else self.meta.get("receivers", {}).get(group)
        return None if rec is None else _heads(rec)

    def scorable(self, group: str) -> list[Head]:
        """The heads that could score at the step that found ``group``, by index: every head for
        the logits step, else the heads in layers below the step's highest receiver layer (a
        receiver reads the residual stream entering its layer, so a sender at or above it scores
        exactly 0). Every head when the circuit records no receivers (a hand-made circuit)."""
        n_layers, n_heads = self.shape()
        rec = self.receivers(group)
        top = n_layers if not rec else max(l % n_layers for l, _ in rec)
        return [(l, h) for l in range(top) for h in range(n_heads)]

    def with_group(self, name: str, heads: Iterable, position: str | None = None,
                   scores: Any = None, meta: dict[str, Any] | None = None) -> "Circuit":
        """A copy holding extension group ``name`` (one of :data:`EXTENSION_GROUPS`) with ``heads``
        at ``position`` (a batch position key; default :data:`GROUP_POSITIONS`), replacing that
        group if already held. ``scores`` (its score map) and ``meta`` (merged into the copy's
        meta) record how it was found. The paper's four groups cannot be replaced this way."""
        if name not in EXTENSION_GROUPS:
            raise ValueError(f"'{name}' is not an extension group; extension groups are {EXTENSION_GROUPS} "
                             f"(the paper's groups {GROUPS} come from path patching's four steps)")
        groups = {**{g: list(hs) for g, hs in self.groups.items()}, name: _heads(heads)}
        positions = {**self.positions, name: position or GROUP_POSITIONS[name]}
        new_scores = dict(self.scores) if scores is None else {**self.scores, name: scores}
        return Circuit(self.model, groups, positions, new_scores, {**self.meta, **(meta or {})})

    def without(self, removed: Iterable[tuple[str, Head]]) -> "Circuit":
        """A copy with the given ``(group, head)`` entries removed."""
        drop = {(g, tuple(h)) for g, h in removed}
        groups = {g: [h for h in hs if (g, h) not in drop] for g, hs in self.groups.items()}
        return Circuit(self.model, groups, dict(self.positions), dict(self.scores), dict(self.meta))

    def overlap(self, other: "Circuit") -> dict[str, dict[str, float]]:
        """Per group: sizes, shared heads, ``precision`` = shared / |self| (the share of this
        circuit found in ``other``) and ``recall`` = shared / |other|, as the paper reports them."""
        out = {}
        for g in GROUPS + tuple(g for g in EXTENSION_GROUPS if g in self.groups and g in other.groups):
            a, b = set(self.groups[g]), set(other.groups[g])
            k = len(a & b)
            out[g] = {"self": len(a), "other": len(b), "shared": k,
                      "precision": k / len(a) if a else float("nan"), "recall": k / len(b) if b else float("nan")}
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "groups": {g: [list(h) for h in self.groups[g]] for g in self.group_names},
            "positions": self.positions,
            "scores": self.scores,
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Circuit":
        if obj.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"circuit schema {obj.get('schema_version')} is not {SCHEMA_VERSION}")
        return cls(obj["model"], obj["groups"], dict(obj["positions"]), obj.get("scores", {}), obj.get("meta", {}))

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Circuit":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no circuit at {path}: run the circuit chapter for this profile first")
        return cls.from_json(read_json(path))
