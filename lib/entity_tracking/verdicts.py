"""The rules behind every verdict: each threshold a chapter applies, in one place, with its reason.

**Competence first.** A claim about how a model does entity tracking can only be tested on a
model that does it. Every verdict therefore starts with :func:`competence`: the model's accuracy
on the chapter's prompts must be above chance (``1 / num_boxes``) with its 95% interval, or the
verdict reads ``"not testable: the model does not do the task (accuracy a [lo, hi], chance c)"``
whatever the rest of the numbers say. A model at chance still yields four "groups" from path
patching and random-looking ablation differences; without this check a verdict would pass on
noise.

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
from typing import Any, Iterable, Literal, Mapping

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
    "COMPETENCE_RULE",
    "Competence",
    "NOT_TESTABLE",
    "chance",
    "circuit_claim",
    "competence",
    "untestable",
    "exceeds",
    "groups_found",
    "groups_standing_out",
    "minimality_measurable",
]

Holds = Literal["holds", "does not hold", "partly", "not run", "not testable"]

#: The verdict of a claim whose model does not do the task.
NOT_TESTABLE = "not testable"


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


@dataclass(frozen=True)
class Competence:
    """A model's accuracy on the task (``{"value", "low", "high"}``, a 95% interval over
    ``n`` prompts) against chance; ``ok`` when the whole interval lies above chance."""

    model: str
    accuracy: Mapping[str, float]
    n: int
    chance: float

    @property
    def ok(self) -> bool:
        return self.accuracy["low"] > self.chance

    def __str__(self) -> str:
        a = self.accuracy
        return (f"{self.model}: accuracy {a['value']:.2f} [{a['low']:.2f}, {a['high']:.2f}] on {self.n} prompts, "
                f"chance {self.chance:.2f}")

    @property
    def reason(self) -> str:
        """The ``ours`` text of a verdict this model cannot be tested on."""
        a = self.accuracy
        return (f"not testable: {self.model} does not do the task (accuracy {a['value']:.2f} "
                f"[{a['low']:.2f}, {a['high']:.2f}], chance {self.chance:.2f})")


def competence(model: str, evaluation: Any, num_boxes: int, *, n_resamples: int = 1000, seed: int = 0) -> Competence:
    """:class:`Competence` of ``model`` from an :class:`~entity_tracking.ablation.Evaluation`
    of it on the task's prompts (nothing ablated), e.g. F(M)."""
    est = evaluation.estimate(n_resamples=n_resamples, seed=seed)
    return Competence(model, {"value": est.value, "low": est.low, "high": est.high}, est.n, chance(num_boxes))


COMPETENCE_RULE = "first: every model it is about does the task (accuracy above 1/boxes with its 95% interval)"


def untestable(models: Iterable[Competence]) -> str | None:
    """The ``ours`` text when any of ``models`` does not do the task, else None."""
    bad = [c for c in models if not c.ok]
    return "; ".join(c.reason for c in bad) if bad else None


def groups_standing_out(circuit: Circuit, null: Circuit) -> dict[str, dict[str, float | bool]]:
    """Per group: its lowest head score, the lowest score of the same step in the null sweep
    (:func:`entity_tracking.path_patching.null_circuit`), and whether the group stands out
    (some head of the group scores below every head of the null). A group of k heads that only
    matches the null is what path patching returns on noise."""
    out: dict[str, dict[str, float | bool]] = {}
    for g in GROUPS:
        null_scores = [x for row in null.scores.get(g, []) for x in row]
        null_min = min(null_scores) if null_scores else float("nan")
        ours = [circuit.scores[g][l][h] for l, h in circuit.groups[g]] if circuit.scores.get(g) else []
        low = min(ours) if ours else float("nan")
        out[g] = {"lowest": low, "null_lowest": null_min, "stands_out": bool(ours) and low < 0 and low < null_min}
    return out
