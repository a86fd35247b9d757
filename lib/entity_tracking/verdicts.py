"""The rules behind every verdict: each threshold a chapter applies, in one place, with its reason.

A chapter closes by saying whether each of the paper's claims holds in its models
(:class:`~entity_tracking.book.Verdict`). The numbers that decide it -- how faithful is
faithful, how much of a gain is "most" -- are stated here once, each with a one-line reason,
so a reader can check them and no notebook cell hides a cut-off. A :class:`Grade` turns a
number into ``"holds"`` / ``"partly"`` / ``"does not hold"`` and says which rule it applied::

    >>> from entity_tracking.verdicts import FAITHFUL
    >>> FAITHFUL(0.91), FAITHFUL(0.6), FAITHFUL(0.2)
    ('holds', 'partly', 'does not hold')
    >>> FAITHFUL.rule
    'holds at >= 0.8, partly at >= 0.5'

The paper states no thresholds: its text calls 0.88-1.00 "faithful" and reads tables by eye.
These cut-offs are ours, set from the paper's own numbers before ours were seen, and are never
tuned to make a claim hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .circuit import GROUPS, Circuit

__all__ = [
    "BEYOND_RANDOM_MARGIN",
    "CMAP_RECOVERY",
    "CIRCUIT_OVERLAP",
    "DCM_MARGIN",
    "DCM_SHARE_FLOOR",
    "FAITHFUL",
    "GROUP_COUNT",
    "Grade",
    "MIN_GAIN",
    "NECESSITY_FACTOR",
    "NECESSITY_MARGIN",
    "Threshold",
    "chance",
    "circuit_claim",
    "exceeds",
    "groups_found",
    "minimality_measurable",
]

Holds = Literal["holds", "does not hold", "partly", "not run"]


@dataclass(frozen=True)
class Threshold:
    """One number a rule compares against, and why it is that number."""

    value: float
    reason: str

    def __float__(self) -> float:
        return float(self.value)


@dataclass(frozen=True)
class Grade:
    """``"holds"`` at or above ``holds``, ``"partly"`` at or above ``partly``, else ``"does not hold"``."""

    holds: float
    partly: float
    reason: str

    def __call__(self, value: float) -> Holds:
        if value != value:  # NaN: nothing was measured
            return "not run"
        return "holds" if value >= self.holds else "partly" if value >= self.partly else "does not hold"

    @property
    def rule(self) -> str:
        return f"holds at >= {self.holds:g}, partly at >= {self.partly:g}"


#: Faithfulness F(C)/F(M) of a circuit in a model (faithfulness chapter).
FAITHFUL = Grade(0.8, 0.5, "the paper calls 0.88-1.00 faithful (Table 1); a circuit keeping half the "
                           "model's accuracy does part of the work")

#: Mean share, over groups, of the base circuit's heads found again in a fine-tune's circuit.
CIRCUIT_OVERLAP = Grade(0.6, 0.3, "the paper's lowest per-group precision is 0.68 (Value Fetchers, Llama "
                                  "vs Goat); below 0.3 most heads are new")

#: Share of a fine-tune's gain that output CMAP of its circuit recovers in the base model.
CMAP_RECOVERY = Grade(0.8, 0.4, "the paper's full circuit recovers all of the gain (0.82 of 0.82); "
                                "under 0.4 most of the gain lies outside it")

#: Groups of the four-step chain a circuit must have to be "the paper's circuit".
GROUP_COUNT = Grade(4, 1, "the paper's circuit has four groups; fewer is part of the chain")

#: A fine-tune must gain at least this much accuracy for CMAP to have a gain to attribute.
MIN_GAIN = Threshold(0.02, "a gain under 2 points is within a few prompts of the base model on 500 prompts")

#: A group's ablation must cost ``NECESSITY_FACTOR x`` the drop of as many random heads outside
#: the circuit, plus ``NECESSITY_MARGIN``, to be "necessary" (:meth:`ablation.NecessityResult.far_more`).
NECESSITY_FACTOR = Threshold(2.0, "twice the cost of as many random heads is an effect, not a draw")
NECESSITY_MARGIN = Threshold(0.1, "and at least 10 points of accuracy, so a near-zero baseline cannot make a "
                                  "1-point drop 'necessary'")

#: An ablated group that costs more than random heads outside the circuit by this much counts as
#: "beyond random" for a partial verdict (circuit chapter).
BEYOND_RANDOM_MARGIN = Threshold(0.02, "2 points: more than a few prompts on a 500-prompt evaluation")

#: DCM: a group encodes position (value) when its positional (value) share reaches the floor
#: and beats the other share by the margin (:func:`entity_tracking.dcm.functionality`).
DCM_SHARE_FLOOR = Threshold(20.0, "the paper's groups reach 37-66% on what they encode and about 13% on what "
                                  "they do not")
DCM_MARGIN = Threshold(5.0, "5 points: more than the 1-3 point spread of the paper's resamples")


def chance(num_boxes: int) -> float:
    """The accuracy of guessing one of the context's objects: ``1 / num_boxes``."""
    if num_boxes < 1:
        raise ValueError(f"num_boxes must be at least 1, got {num_boxes}")
    return 1.0 / num_boxes


def minimality_measurable(circuit_low: float, num_boxes: int) -> bool:
    """Minimality scores a head by the relative drop F(C\\K)/F(C\\(K∪{v})) - 1. When the circuit
    alone is not above chance -- the lower end of its F(C) interval at or below ``1/num_boxes``
    -- those ratios compare noise with noise, so minimality cannot say which heads matter and
    the circuit keeps its candidates."""
    return circuit_low > chance(num_boxes)


def groups_found(circuit: Circuit) -> list[str]:
    """The groups of a :class:`~entity_tracking.circuit.Circuit` that carry their path: at least
    one of their heads has a path-patching score below zero. (Under the paper's selection every
    group has k heads; a group of heads that cannot lower p(correct) is a group in name only.)"""
    return [g for g in GROUPS
            if any(circuit.scores.get(g) and circuit.scores[g][l][h] < 0 for l, h in circuit.groups[g])]


def circuit_claim(n_groups_found: int, necessary: bool, beyond_random: bool) -> Holds:
    """"The base model has a four-group circuit whose Value Fetchers are necessary": holds with all
    four groups (:data:`GROUP_COUNT`) and necessary Value Fetchers; partly with necessary Value
    Fetchers, or with some group and Value Fetchers that cost more than random heads
    (:data:`BEYOND_RANDOM_MARGIN`); else does not hold."""
    if GROUP_COUNT(n_groups_found) == "holds" and necessary:
        return "holds"
    return "partly" if necessary or (n_groups_found > 0 and beyond_random) else "does not hold"


def exceeds(ours: dict, reference: dict) -> Holds:
    """One accuracy beats another (``{"value", "low", "high"}`` estimates with 95% intervals):
    holds when the intervals do not overlap (``ours.low > reference.high``), partly when only
    the point estimate is higher, else does not hold."""
    if ours["low"] > reference["high"]:
        return "holds"
    return "partly" if ours["value"] > reference["value"] else "does not hold"
