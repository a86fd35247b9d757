"""The entity-tracking circuit as data: four groups of heads, each read at one token position.

The paper's circuit (paper-methods §2) is a chain of four groups of attention heads. The
**Structure Reader** heads (group D) act at the query label's occurrence in the context; the
**Position Detector** heads (C) at the query label; the **Position Transmitter** (B) and
**Value Fetcher** (A) heads at the last token, where the Value Fetchers attend to the correct
object and write it to the logits. A :class:`Circuit` records the heads of each group as
``(layer, head)`` pairs, the position each group acts at (a key of the batches built by
:func:`entity_tracking.data.encode_prompts`), the path-patching scores they were selected by,
and the parameters and data they came from. The circuit chapter writes one JSON file per model
(``results/<profile>/circuits/<model>.json``); the faithfulness, DCM and CMAP chapters read them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .io import read_json, write_json

__all__ = ["GROUPS", "GROUP_LABELS", "GROUP_POSITIONS", "Circuit", "Head"]

Head = tuple[int, int]

#: Groups in the order path patching discovers them (from the logits backwards).
GROUPS: tuple[str, ...] = ("value_fetcher", "position_transmitter", "position_detector", "structure_reader")

#: Display names with the paper's letters.
GROUP_LABELS: dict[str, str] = {
    "value_fetcher": "Value Fetcher (A)",
    "position_transmitter": "Position Transmitter (B)",
    "position_detector": "Position Detector (C)",
    "structure_reader": "Structure Reader (D)",
}

#: Where each group acts: a position key of ``data.encode_prompts`` (without ``_position``).
GROUP_POSITIONS: dict[str, str] = {
    "value_fetcher": "last",
    "position_transmitter": "last",
    "position_detector": "query_label",
    "structure_reader": "prev_query_label",
}

SCHEMA_VERSION = 1


def _heads(items: Iterable) -> list[Head]:
    out = []
    for it in items:
        layer, head = (int(x) for x in it)
        out.append((layer, head))
    return out


@dataclass
class Circuit:
    """Heads per group for one model. ``groups[g]`` is a list of ``(layer, head)``."""

    model: str
    groups: dict[str, list[Head]]
    positions: dict[str, str] = field(default_factory=lambda: dict(GROUP_POSITIONS))
    scores: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.groups) - set(GROUPS)
        if unknown:
            raise ValueError(f"unknown circuit groups {sorted(unknown)}; expected a subset of {GROUPS}")
        self.groups = {g: _heads(self.groups.get(g, [])) for g in GROUPS}
        for g in GROUPS:
            self.positions.setdefault(g, GROUP_POSITIONS[g])

    @property
    def n_heads(self) -> int:
        return sum(len(v) for v in self.groups.values())

    def heads_at(self, position: str) -> set[Head]:
        """All circuit heads acting at ``position`` (e.g. ``"last"``: Value Fetchers and Transmitters)."""
        return {h for g in GROUPS if self.positions[g] == position for h in self.groups[g]}

    def without(self, removed: Iterable[tuple[str, Head]]) -> "Circuit":
        """A copy with the given ``(group, head)`` entries removed."""
        drop = {(g, tuple(h)) for g, h in removed}
        groups = {g: [h for h in hs if (g, h) not in drop] for g, hs in self.groups.items()}
        return Circuit(self.model, groups, dict(self.positions), dict(self.scores), dict(self.meta))

    def overlap(self, other: "Circuit") -> dict[str, dict[str, float]]:
        """Per group: sizes, shared heads, ``precision`` = shared / |self| (the share of this
        circuit found in ``other``) and ``recall`` = shared / |other|, as the paper reports them."""
        out = {}
        for g in GROUPS:
            a, b = set(self.groups[g]), set(other.groups[g])
            k = len(a & b)
            out[g] = {"self": len(a), "other": len(b), "shared": k,
                      "precision": k / len(a) if a else float("nan"), "recall": k / len(b) if b else float("nan")}
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "groups": {g: [list(h) for h in self.groups[g]] for g in GROUPS},
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
