"""The rules behind every verdict: each threshold a chapter applies, in one place, with its reason.

**Competence first.** A claim about how a model does entity tracking can only be tested on a
model that does it. Every verdict therefore starts with :func:`competence`: the model's accuracy
on the chapter's prompts must be above chance (``1 / num_boxes``) with its 95% interval, or the
verdict reads ``"not testable: the model does not do the task (accuracy a [lo, hi], chance c)"``
whatever the rest of the numbers say. A model at chance still yields four "groups" from path
patching and random-looking ablation differences; without this check a verdict would pass on
noise.

A chapter closes by saying whether each of the paper's claims holds in its models
(:class:`Verdict`). The numbers that decide it -- how faithful is
faithful, how much of a gain is "most" -- are stated here once, each with a one-line reason,
so a reader can check them and no notebook cell hides a cut-off. A :class:`Grade` turns a
number into ``"holds"`` / ``"partly"`` / ``"does not hold"`` and says which rule it applied::

    >>> from entity_tracking.methods.verdicts import FAITHFUL
    >>> FAITHFUL(0.91), FAITHFUL(0.6), FAITHFUL(0.2)
    ('holds', 'partly', 'does not hold')
    >>> FAITHFUL.rule
    'holds at >= 0.8, partly at >= 0.5'

The paper states no thresholds: its text calls 0.88-1.00 "faithful" and reads tables by eye.
These cut-offs are ours, set from the paper's own numbers before ours were seen, and are never
tuned to make a claim hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterable, Literal, Mapping, Sequence

import torch

from ..intervene.stats import Estimate, Evaluation, bootstrap, format_estimate
from ..io import read_json, write_json
from ..schema import GROUP_LABELS, GROUPS, Head
from .ablation import MinimalityResult, NecessityResult
from .circuit import Circuit
from .cmap import BASE_ALONE, FINETUNED_ALONE, FULL_CIRCUIT, row_key

__all__ = [
    "GROUND_TRUTH_CLAIM",
    "PLANTED_CHECKS",
    "PLANTED_GAIN",
    "RECOVERS",
    "cmap_recovery_verdicts",
    "query_carries",
    "dcm_recovery_verdict",
    "faithfulness_recovery_verdict",
    "ground_truth_verdicts",
    "path_patching_recovery_verdict",
    "planted_gain_verdict",
    "planted_verdict",
    "ARITHMETIC_LEARNED",
    "BEYOND_RANDOM_MARGIN",
    "CONTROL_PAPER",
    "CMAP_RECOVERY",
    "CMAP_OVER_RANDOM",
    "EXCEEDS_MODEL",
    "FAITHFUL_CEILING",
    "FAITHFUL_OVER_RANDOM",
    "against_random",
    "faithfulness_grade",
    "over_random",
    "CONFIDENTLY_WRONG",
    "CONTENT_BINDING",
    "CIRCUIT_OVERLAP",
    "DCM_MARGIN",
    "DCM_SHARE_FLOOR",
    "FAITHFUL",
    "GROUP_COUNT",
    "Grade",
    "MIN_GAIN",
    "NECESSITY_FACTOR",
    "NECESSITY_MARGIN",
    "SCORE_FLOOR",
    "Threshold",
    "COMPETENCE_RULE",
    "Competence",
    "NOT_TESTABLE",
    "beats_base",
    "chance",
    "circuit_claim",
    "circuit_verdicts",
    "cmap_verdicts",
    "competence",
    "confidently_wrong_share",
    "untestable",
    "exceeds",
    "dcm_verdicts",
    "extended_circuit_verdicts",
    "faithfulness_verdicts",
    "read_competence",
    "write_competence",
    "groups_found",
    "groups_standing_out",
    "CHANCE_QUANTILES",
    "OVERLAP_RULE",
    "head_standing",
    "hypergeometric",
    "overlap_against_chance",
    "overlap_cells",
    "overlap_grade",
    "overlap_text",
    "padding",
    "real_heads",
    "minimality_measurable",
    "necessity_grade",
    "arithmetic_verdicts",
    "finetuning_verdicts",
    "premise_verdicts",
    "prompts_sample",
    "who",
]

Holds = Literal["holds", "does not hold", "partly", "not run", "not testable", "exceeds the model"]
VERDICTS: tuple[str, ...] = ("holds", "partly", "does not hold", "exceeds the model", "not testable", "not run")

#: The verdict of a circuit that alone beats the model it was cut from (faithfulness wholly above
#: :data:`FAITHFUL_CEILING`): not "faithful", a finding of its own.
EXCEEDS_MODEL = "exceeds the model"

#: The verdict of a claim whose model does not do the task.
NOT_TESTABLE = "not testable"


@dataclass(frozen=True)
class Verdict:
    """One claim as tested by one chapter."""

    claim: int  # the paper's claim number on the landing page (1, 2 or 3); 0 for the premise
    statement: str
    paper: str
    ours: str
    holds: Holds
    chapter: str = ""
    rule: str = ""  # the rule applied (entity_tracking.methods.verdicts), in words
    sample: str = ""  # the sample sizes behind it: prompts, random draws, resamples

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


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

    def interval(self, est: Mapping[str, float]) -> Holds:
        """The grade of an estimate with its 95% interval (``{"value", "low", "high"}``): holds
        when the whole interval is at or above ``holds``, does not hold when it is wholly below
        ``partly``, partly otherwise."""
        if any(est[k] != est[k] for k in ("value", "low", "high")):
            return "not run"
        if est["low"] >= self.holds:
            return "holds"
        return "does not hold" if est["high"] < self.partly else "partly"

    @property
    def interval_rule(self) -> str:
        return (f"holds when the 95% interval lies at or above {self.holds:g}, does not hold when it lies "
                f"below {self.partly:g}, partly otherwise")


#: Faithfulness F(C)/F(M) of a circuit in a model (faithfulness chapter).
FAITHFUL = Grade(0.8, 0.5, "the paper calls 0.88-1.00 faithful (Table 1); a circuit keeping half the "
                           "model's accuracy does part of the work")

#: Faithfulness above which a circuit alone beats the model: the top of the band :data:`FAITHFUL` starts.
FAITHFUL_CEILING = Threshold(1.02, "the paper's faithful circuits reach 1.00 at most (0.88-1.00, Table 1): above "
                                   "1 the circuit alone beats the model (ablating the rest helps), a different "
                                   "finding; 0.02 is what the paper's rounding of both accuracies to two decimals "
                                   "can put above 1.00 (0.665 / 0.655 = 1.015)")

#: How much more of the model's accuracy a circuit must keep than random circuits of its group
#: sizes (paired excess F(C)/F(M) - F(random)/F(M), its 95% interval above this) to be faithful.
FAITHFUL_OVER_RANDOM = Threshold(0.5, "the share FAITHFUL calls 'part of the work' (0.5) must come from which heads "
                                      "the circuit holds, not from how many; the paper's circuits keep 0.87-1.00 "
                                      "more than their random circuits (0.00-0.01 of F(M), Table 1)")

#: Mean share, over groups, of the base circuit's heads found again in a fine-tune's circuit.
CIRCUIT_OVERLAP = Grade(0.6, 0.3, "the paper's lowest per-group precision is 0.68 (Value Fetchers, Llama "
                                  "vs Goat); below 0.3 most heads are new")

#: Share of a fine-tune's gain that output CMAP of its circuit recovers in the base model.
CMAP_RECOVERY = Grade(0.8, 0.4, "the paper's full circuit recovers all of the gain (0.82 of 0.82); "
                                "under 0.4 most of the gain lies outside it")

#: How much more of the gain the full circuit must recover than random head sets of the same sizes at
#: the same positions (paired excess of shares, its 95% interval above this; :func:`cmap.random_baseline`).
CMAP_OVER_RANDOM = Threshold(0.4, "the share CMAP_RECOVERY calls part of the gain (0.4) must come from which heads "
                                  "are patched, not from how many at those positions; the paper reports no random "
                                  "sets, so its own cut is the margin")

#: Groups of the four-step chain a circuit must have to be "the paper's circuit".
GROUP_COUNT = Grade(4, 1, "the paper's circuit has four groups; fewer is part of the chain")

#: Retention of accuracy with every context head mean-ablated (binding chapter) below which a model
#: binds by content, at or above which its binding survives as a positional one would (the landing
#: page's scope note reads the whole interval against it; straddling it, neither reading is made).
CONTENT_BINDING = Threshold(0.5, "the paper's numbers imply Llama-7B keeps most of its accuracy (binding.paper_implied); "
                                 "a model that loses over half of it needs the context's content to bind")

#: A fine-tune must gain at least this much accuracy for CMAP to have a gain to attribute.
MIN_GAIN = Threshold(0.02, "a gain under 2 points is within a few prompts of the base model on 500 prompts")

#: Arithmetic exact match at which a fine-tune has learned arithmetic (the premise of the premise).
ARITHMETIC_LEARNED = Threshold(0.5, "issue 14: a fine-tune that answers half of held-out problems exactly has "
                                    "learned the task it was trained on (Goat-7B is near-perfect on 3-digit +/-)")

#: What a positive control's rows print in the paper's column.
CONTROL_PAPER = "none: a positive control of ours, not in the paper"

#: A group's ablation must cost ``NECESSITY_FACTOR x`` the drop of as many random heads outside
#: the circuit, plus ``NECESSITY_MARGIN``, to be "necessary" (:func:`far_more`).
NECESSITY_FACTOR = Threshold(2.0, "twice the cost of as many random heads is an effect, not a draw")
NECESSITY_MARGIN = Threshold(0.1, "and at least 10 points of accuracy, so a near-zero baseline cannot make a "
                                  "1-point drop 'necessary'")

#: A path-patching score closer to zero than this is no effect (scores are relative changes of p(correct)).
SCORE_FLOOR = Threshold(1e-3, "a head that moves p(correct) by under 0.1% of itself carries nothing measurable; "
                              "float32 sums alone reach 1e-6")

#: A prompt on which the model gives the answer less than this probability is "confidently wrong"
#: (the circuit chapter reports their share beside the choice of path-patching metric).
CONFIDENTLY_WRONG = Threshold(0.05, "under 5% on the answer, a prompt's relative change of p(correct) can reach "
                                    "+20x and outweigh the prompts the model gets right")

#: An ablated group that costs more than random heads outside the circuit by this much counts as
#: "beyond random" for a partial verdict (circuit chapter).
BEYOND_RANDOM_MARGIN = Threshold(0.02, "2 points: more than a few prompts on a 500-prompt evaluation")

#: DCM: a group encodes position (value) when its positional (value) share reaches the floor
#: and beats the other share by the margin (:func:`entity_tracking.methods.dcm.functionality`).
DCM_SHARE_FLOOR = Threshold(20.0, "the paper's groups reach 37-66% on what they encode and about 13% on what "
                                  "they do not")
DCM_MARGIN = Threshold(5.0, "5 points: more than the 1-3 point spread of the paper's resamples")


def confidently_wrong_share(p_correct) -> float:
    """The share of prompts the model is confidently wrong on: ``p_correct`` (the probability it
    gives the answer, one per prompt) below :data:`CONFIDENTLY_WRONG`."""
    return float((torch.as_tensor(p_correct) < CONFIDENTLY_WRONG.value).float().mean())


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


def minimality_holds(result: MinimalityResult, num_boxes: int, *, n_resamples: int = 1000, seed: int = 0) -> bool:
    """Whether a minimality run's drops mean anything: its F(C) above chance with its 95% interval
    (:func:`minimality_measurable`)."""
    low = result.circuit_accuracy.estimate(n_resamples=n_resamples, seed=seed).low
    return minimality_measurable(low, num_boxes)


def chosen_circuit(result: MinimalityResult, num_boxes: int, **kw) -> Circuit:
    """The circuit the book keeps: the pruned one when minimality is measurable
    (:func:`minimality_holds`), else the unpruned candidates. Its ``meta["minimality"]`` says
    which, with F(C) and chance. ``kw``: the bootstrap's ``n_resamples`` and ``seed``."""
    ok = minimality_holds(result, num_boxes, **kw)
    est = result.circuit_accuracy.estimate(**kw)
    kept = result.pruned if ok else result.circuit
    meta = {**result.pruned.meta, "pruned": ok}
    meta["minimality"] = {**meta.get("minimality", {}), "measurable": ok, "circuit_accuracy": est.as_dict(),
                          "chance": chance(num_boxes),
                          "decision": "pruned" if ok else "kept the candidates: F(C) is not above chance"}
    return Circuit(kept.model, {g: list(kept.groups[g]) for g in kept.group_names}, dict(kept.positions),
                   dict(kept.scores), meta)


def far_more(result: NecessityResult, baseline: str = "outside", factor: float = float(NECESSITY_FACTOR),
             margin: float = float(NECESSITY_MARGIN)) -> bool:
    """The group costs "far more" than random heads: ``drop > factor * random_drop + margin``
    (false when the baseline could not be drawn)."""
    r = result.random_drop(baseline)
    return bool(r == r and result.drop > factor * r + margin)


def beyond_random(result: NecessityResult, baseline: str = "outside") -> bool:
    """The group costs more than random heads by :data:`BEYOND_RANDOM_MARGIN`."""
    r = result.random_drop(baseline)
    return bool(r == r and result.drop > r + float(BEYOND_RANDOM_MARGIN))


def is_necessary(result: NecessityResult) -> bool:
    """The group is necessary: it costs "far more" than random heads outside the circuit
    (:func:`far_more`) and more than random heads of the whole model."""
    return far_more(result, "outside") and result.drop > result.random_drop("any")


def necessity_json(result: NecessityResult) -> dict[str, Any]:
    """A :class:`~entity_tracking.methods.ablation.NecessityResult`'s measurements with the verdicts
    on them (:func:`far_more` against both baselines, :func:`is_necessary`)."""
    return {**result.to_json(), "far_more_than_outside": far_more(result, "outside"),
            "far_more_than_any": far_more(result, "any"), "necessary": is_necessary(result)}


def groups_found(circuit: Circuit) -> list[str]:
    """The groups of a :class:`~entity_tracking.methods.circuit.Circuit` that carry their path: at least
    one of their heads has a path-patching score below zero (below ``-SCORE_FLOOR``). (Under the paper's selection every
    group has k heads; a group of heads that cannot lower p(correct) is a group in name only.)"""
    return [g for g in GROUPS
            if any(circuit.scores.get(g) and circuit.scores[g][l][h] < -SCORE_FLOOR.value for l, h in circuit.groups[g])]


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
    ``n`` prompts, resampled by context when ``n_contexts``) against chance; ``ok`` when the whole
    interval lies above chance."""

    model: str
    accuracy: Mapping[str, float]
    n: int
    chance: float
    n_contexts: int = 0

    @classmethod
    def of(cls, model: str, accuracy: Mapping[str, float], num_boxes: int, n: int | None = None) -> "Competence":
        """From an accuracy estimate ``{"value", "low", "high"[, "n", "n_clusters"]}``."""
        acc = {k: float(accuracy[k]) for k in ("value", "low", "high")}
        return cls(model, acc, int(n if n is not None else accuracy.get("n", 0)), chance(num_boxes),
                   int(accuracy.get("n_clusters", 0) or 0))

    @property
    def sample(self) -> str:
        """The prompts behind the accuracy, in a verdict row's words (:func:`prompts_sample`)."""
        return prompts_sample({"n": self.n, "n_clusters": self.n_contexts})

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


def competence(model: str, evaluation: Evaluation, num_boxes: int, *, n_resamples: int = 1000, seed: int = 0) -> Competence:
    """:class:`Competence` of ``model`` from an :class:`~entity_tracking.methods.ablation.Evaluation`
    of it on the task's prompts (nothing ablated), e.g. F(M)."""
    est = evaluation.estimate(n_resamples=n_resamples, seed=seed)
    return Competence(model, {"value": est.value, "low": est.low, "high": est.high}, est.n, chance(num_boxes),
                      est.n_clusters)


COMPETENCE_RULE = "first: every model it is about does the task (accuracy above 1/boxes with its 95% interval)"


def untestable(models: Iterable[Competence]) -> str | None:
    """The ``ours`` text when any of ``models`` does not do the task, else None."""
    bad = [c for c in models if not c.ok]
    lead = "not testable: "
    return lead + "; ".join(c.reason[len(lead):] for c in bad) if bad else None


def groups_standing_out(circuit: Circuit, null: Circuit) -> dict[str, dict[str, float | bool]]:
    """Per group: its strongest head's effect, the strongest effect of any head in the same step
    of the null sweep (:func:`entity_tracking.methods.path_patching.null_circuit`), and whether the group
    stands out (its strongest head beats every head of the null, and its score is below
    ``-SCORE_FLOOR``). A group of k heads that only matches the null is what path patching
    returns on noise.

    Effects are compared as changes of p(correct) in absolute terms: score x the sweep's mean
    clean p(correct) (``meta["mean_p_clean"]``), which for the pooled metric is exactly the mean
    change of p(correct) (for the paper's relative metric, an approximation). Relative scores
    themselves cannot be compared: the scrambled model gives the answer almost no probability,
    so tiny absolute changes become large relative ones."""
    scale_c = float(circuit.meta.get("mean_p_clean", 1.0))
    scale_n = float(null.meta.get("mean_p_clean", 1.0))
    out: dict[str, dict[str, float | bool]] = {}
    for g in GROUPS:
        null_scores = [x for row in null.scores.get(g, []) for x in row]
        null_min = min(null_scores) if null_scores else float("nan")
        ours = [circuit.scores[g][l][h] for l, h in circuit.groups[g]] if circuit.scores.get(g) else []
        low = min(ours) if ours else float("nan")
        out[g] = {"lowest": low, "null_lowest": null_min, "effect": low * scale_c, "null_effect": null_min * scale_n,
                  "stands_out": bool(ours) and low < -SCORE_FLOOR.value and low * scale_c < null_min * scale_n}
    return out


def _null_cut(null: Circuit | None, group: str) -> float | None:
    """The strongest change of p(correct) any head makes in ``group``'s step of the null sweep
    (score x its mean clean p(correct)); None without a null map for that step (the null sweep
    runs the paper's four steps only)."""
    if null is None or not null.scores.get(group):
        return None
    return min(x for row in null.scores[group] for x in row) * float(null.meta.get("mean_p_clean", 1.0))


def head_standing(circuit: Circuit, null: Circuit | None = None) -> dict[str, dict[Head, bool]]:
    """Per group, per head: does it stand out? A head stands out when its path-patching score is
    below ``-SCORE_FLOOR`` (it lowers p(correct) measurably) and, given the ``null`` sweep
    (:func:`entity_tracking.methods.path_patching.null_circuit`), when it lowers p(correct) more
    than every head of the null's same step (compared as in :func:`groups_standing_out`: score x
    mean clean p(correct)). A head of a group without a score map never stands out. Heads that do
    not stand out are **padding** (:func:`padding`): under the paper's selection a step returns
    k heads whatever their scores, ties going by head index."""
    scale = float(circuit.meta.get("mean_p_clean", 1.0))
    out: dict[str, dict[Head, bool]] = {}
    for g in circuit.group_names:
        smap, cut = circuit.scores.get(g), _null_cut(null, g)
        out[g] = {(l, h): bool(smap) and smap[l][h] < -SCORE_FLOOR.value
                  and (cut is None or smap[l][h] * scale < cut) for l, h in circuit.groups[g]}
    return out


def real_heads(circuit: Circuit, null: Circuit | None = None) -> dict[str, list[Head]]:
    """Per group, the heads that stand out (:func:`head_standing`), in the order held: the heads
    a group's verdicts count."""
    return {g: [h for h, ok in v.items() if ok] for g, v in head_standing(circuit, null).items()}


def padding(circuit: Circuit, null: Circuit | None = None) -> dict[str, list[Head]]:
    """Per group, the heads that fill it without standing out (:func:`head_standing`): shown as
    padding, never counted."""
    return {g: [h for h, ok in v.items() if not ok] for g, v in head_standing(circuit, null).items()}


def hypergeometric(population: int, marked: int, drawn: int) -> list[float]:
    """P(X = x), x = 0..min(marked, drawn): ``drawn`` heads taken at random, without replacement,
    from ``population`` heads of which ``marked`` are marked; X counts the marked heads drawn.

    >>> [round(p, 3) for p in hypergeometric(4, 2, 2)]
    [0.167, 0.667, 0.167]
    """
    if not 0 <= marked <= population or not 0 <= drawn <= population:
        raise ValueError(f"hypergeometric needs 0 <= marked, drawn <= population; got {population}, {marked}, {drawn}")
    total = math.comb(population, drawn)
    return [math.comb(marked, x) * math.comb(population - marked, drawn - x) / total
            for x in range(min(marked, drawn) + 1)]


def _quantile(dist: Mapping[Any, float], q: float):
    """The smallest value whose cumulative probability reaches ``q`` (``dist``: value -> probability)."""
    acc = 0.0
    for v in sorted(dist):
        acc += dist[v]
        if acc >= q - 1e-12:
            return v
    return max(dist)


#: The chance interval of an overlap: the 2.5% and 97.5% quantiles of its hypergeometric distribution.
CHANCE_QUANTILES = (0.025, 0.975)


def overlap_against_chance(base: Circuit, finetuned: Circuit, null: Circuit | None = None) -> dict[str, Any]:
    """The share of the base circuit's heads found again in a fine-tune's circuit, counting only
    heads that stand out (:func:`real_heads`), against the share expected by chance.

    Per group with at least one standing-out base head (a padded group contributes nothing):
    ``shared`` of the base's ``real`` heads are among the fine-tune's ``drawn`` real heads. Chance
    draws the fine-tune's heads at random from the heads that could score at its step
    (:meth:`~entity_tracking.methods.circuit.Circuit.scorable`, ``population``), of which
    ``marked`` are base heads: ``shared`` is then hypergeometric, with mean ``expected`` and the
    95% interval ``[low, high]`` (:data:`CHANCE_QUANTILES`). Over groups: ``share``, the mean of
    the groups' ``shared / real`` (the paper's precision), and its exact chance distribution
    (groups independent): ``chance`` (its mean), ``chance_low``/``chance_high`` and ``p_value``
    = P(chance share >= share). ``above_chance``: ``share`` exceeds ``chance_high``."""
    real_b, real_f = real_heads(base, null), real_heads(finetuned, null)
    groups: dict[str, dict[str, Any]] = {}
    dist: dict[Fraction, float] = {Fraction(0): 1.0}
    counted = [g for g in GROUPS if real_b.get(g)]
    for g in GROUPS:
        a, b = set(real_b.get(g, [])), set(real_f.get(g, []))
        # the fine-tune's step decides what its heads could be drawn from (the base's, when a fine-tune
        # without score maps has no heads standing out anyway)
        pop = set((finetuned if finetuned.scores else base).scorable(g)) if a else set()
        row: dict[str, Any] = {"real": len(a), "drawn": len(b), "shared": len(a & b), "population": len(pop),
                               "marked": len(a & pop), "padded": not a,
                               "padding": len(base.groups.get(g, [])) - len(a)}
        if a:
            pmf = hypergeometric(len(pop), len(a & pop), len(b))
            row.update({"precision": len(a & b) / len(a), "expected": sum(x * p for x, p in enumerate(pmf)),
                        "low": _quantile(dict(enumerate(pmf)), CHANCE_QUANTILES[0]),
                        "high": _quantile(dict(enumerate(pmf)), CHANCE_QUANTILES[1])})
            step: dict[Fraction, float] = {}
            for v, pv in dist.items():
                for x, px in enumerate(pmf):
                    key = v + Fraction(x, len(a) * len(counted))
                    step[key] = step.get(key, 0.0) + pv * px
            dist = step
        groups[g] = row
    if not counted:
        nan = float("nan")
        return {"groups": groups, "counted": [], "share": nan, "chance": nan, "chance_low": nan, "chance_high": nan,
                "p_value": nan, "above_chance": False}
    share = Fraction(sum(Fraction(groups[g]["shared"], groups[g]["real"]) for g in counted), len(counted))
    high = _quantile(dist, CHANCE_QUANTILES[1])
    return {"groups": groups, "counted": counted, "share": float(share),
            "chance": float(sum(v * p for v, p in dist.items())),
            "chance_low": float(_quantile(dist, CHANCE_QUANTILES[0])), "chance_high": float(high),
            "p_value": float(sum(p for v, p in dist.items() if v >= share)), "above_chance": share > high}


OVERLAP_RULE = ("counting only heads that stand out (a score below "
                f"-{SCORE_FLOOR.value:g} that also beats every head of the null sweep's same step; the rest is padding): "
                f"holds when the mean share per group of the base circuit's heads found again is at least {CIRCUIT_OVERLAP.holds:g} "
                f"(partly at {CIRCUIT_OVERLAP.partly:g}) "
                "and the share is above chance (above the 97.5% quantile of the share when the fine-tune's heads are "
                "drawn at random from the heads that could score at each step: hypergeometric); does not hold at chance; "
                "a group without a head standing out in the base circuit is left out")


def overlap_grade(result: Mapping[str, Any]) -> Holds:
    """The overlap verdict of an :func:`overlap_against_chance` result under :data:`OVERLAP_RULE`:
    :data:`CIRCUIT_OVERLAP` on its share, but "does not hold" whenever the share is not above chance
    (or no base group has a head standing out)."""
    if not result["counted"] or not result["above_chance"]:
        return "does not hold"
    return CIRCUIT_OVERLAP(result["share"])


def overlap_cells(result: Mapping[str, Any]) -> dict[str, str]:
    """An :func:`overlap_against_chance` result as table cells, one per group (by its label):
    ``"shared/real (chance expected [low, high])"``, or the padding a group held instead, and the
    mean share with its chance interval and p-value."""
    cells = {GROUP_LABELS[g]: (f"{o['shared']}/{o['real']} (chance {o['expected']:.1f} [{o['low']}, {o['high']}])"
                               if not o["padded"] else f"padding only ({o['padding']} heads)")
             for g, o in result["groups"].items()}
    cells["mean share (chance [95%], p)"] = (
        f"{result['share']:.2f} ({result['chance']:.2f} [{result['chance_low']:.2f}, {result['chance_high']:.2f}], "
        f"p = {result['p_value']:.2g})" if result["counted"] else "nothing to find again")
    return cells


def overlap_text(result: Mapping[str, Any]) -> str:
    """An :func:`overlap_against_chance` result in a verdict row's words."""
    if not result["counted"]:
        return "no group of the base circuit has a head standing out: nothing to find again"
    cells = overlap_cells(result)
    per = "; ".join(f"{GROUP_LABELS[g]} {cells[GROUP_LABELS[g]]}" for g in result["counted"])
    left = [GROUP_LABELS[g] for g, o in result["groups"].items() if o["padded"]]
    return (f"mean share per group {result['share']:.2f}, chance {result['chance']:.2f} "
            f"[{result['chance_low']:.2f}, {result['chance_high']:.2f}], p = {result['p_value']:.2g}; {per}"
            + (f"; left out (padding only): {', '.join(left)}" if left else ""))


# --------------------------------------------------------------------------------------------
# The chapters' verdicts: measured results in, Verdict rows out (each chapter's last cell)


def who(model: str, controls: Iterable[str] = ()) -> str:
    """A model's name in a claim, marked when it is a positive control (ours)."""
    return f"{model} (positive control, ours)" if model in set(controls) else model


def _fmt(est: Mapping[str, float], spec: str = ".2f") -> str:
    """An estimate ``{"value", "low", "high"}`` as :class:`~entity_tracking.intervene.stats.Estimate` prints it."""
    return format_estimate(est, spec)


def prompts_sample(est: Mapping[str, float] | Estimate, unit: str = "prompts") -> str:
    """The sample behind an estimate, in a verdict row's words: ``"72 contexts x 7 queries"`` when it
    was resampled by context (its ``n_clusters``), else ``"500 prompts"``.

    >>> prompts_sample({"n": 500, "n_clusters": 72})
    '72 contexts x 7 queries (500 prompts, bootstrap over contexts)'
    >>> prompts_sample({"n": 300})
    '300 prompts'
    """
    d = est.as_dict() if isinstance(est, Estimate) else est
    n, c = int(d.get("n", 0) or 0), int(d.get("n_clusters", 0) or 0)
    if c:
        return f"{c} contexts x {round(n / c)} queries ({n} {unit}, bootstrap over contexts)"
    return f"{n} {unit}"


def _not_testable(claim: int, statement: str, paper: str, models: Iterable[Competence], sample: str = ""):
    models = list(models)
    reason = untestable(models)
    if reason is None:
        return None
    return Verdict(claim, statement, paper, reason, NOT_TESTABLE, rule=COMPETENCE_RULE,
                   sample=sample or "; ".join(f"{c.model}: {c.sample}" for c in models))


NECESSITY_RULE = (f"holds when ablating the group costs > {NECESSITY_FACTOR.value:g} x the drop of as many random "
                  f"heads outside the circuit + {NECESSITY_MARGIN.value:g}, the effect (its drop minus theirs) has a "
                  "95% interval above 0 (bootstrap over contexts and draws), and it costs more than random heads of "
                  f"the whole model; partly when the effect exceeds {BEYOND_RANDOM_MARGIN.value:g} with its interval "
                  "above 0")


def necessity_grade(necessity: NecessityResult, *, n_resamples: int = 1000, seed: int = 0) -> tuple[Holds, Estimate]:
    """Is a group necessary? ``(verdict, effect)`` for a
    :class:`~entity_tracking.methods.ablation.NecessityResult` under :data:`NECESSITY_RULE`; the effect
    is its :meth:`~entity_tracking.methods.ablation.NecessityResult.effect` estimate over random heads
    outside the circuit (NaN, and "not run", when none could be drawn)."""
    eff = necessity.effect("outside", n_resamples=n_resamples, seed=seed)
    if eff.value != eff.value:
        return "not run", eff
    if is_necessary(necessity) and eff.low > 0:
        return "holds", eff
    return ("partly" if eff.low > 0 and eff.value > BEYOND_RANDOM_MARGIN.value else "does not hold"), eff


CIRCUIT_RULE = ("holds: all four groups stand out from the null sweep (a head lowering p(correct) more than "
                "every head of the same sweep with attention shuffled, and scoring below "
                f"-{SCORE_FLOOR.value:g}) and the Value Fetchers are necessary (their ablation "
                f"costs > {NECESSITY_FACTOR.value:g} x the drop of as many random heads outside the circuit "
                f"+ {NECESSITY_MARGIN.value:g}, the effect's 95% interval is above 0, and it costs more than "
                "random heads of the whole model); partly: necessary Value Fetchers, or some group standing "
                f"out with Value Fetchers beyond random (effect > {BEYOND_RANDOM_MARGIN.value:g}, interval above 0)")


def circuit_verdicts(base: Competence, circuit: Circuit, necessity: NecessityResult | None, null: Circuit | None,
                     finetuned: Mapping[str, tuple[Competence, Circuit]], *, n_path_patching: int,
                     n_resamples: int = 1000, controls: Iterable[str] = ()) -> list:
    """The circuit chapter's verdicts. ``necessity``: the base circuit's Value Fetchers'
    :class:`~entity_tracking.methods.ablation.NecessityResult` (None when it has none); ``null``: the
    :func:`~entity_tracking.methods.path_patching.null_circuit` of the base model (None: groups count
    when a head scores below zero); ``finetuned``: each fine-tune's competence and circuit.
    Every fine-tune gets an overlap row of its own (:func:`overlap_against_chance` under
    :data:`OVERLAP_RULE`, the base model's null read for every model); those named in ``controls``
    (positive controls, ours) are marked and print no paper number."""
    s1 = "The base model has a four-group circuit whose Value Fetchers are necessary"
    p1 = "72 heads in 4 groups (Llama-7B)"
    out = []
    skip = _not_testable(1, s1, p1, [base])
    if skip is not None:
        out.append(skip)
    else:
        if null is not None:
            stand = groups_standing_out(circuit, null)
            found = [g for g in GROUPS if stand[g]["stands_out"]]
            found_text = "groups standing out from the null: "
        else:
            found, found_text = groups_found(circuit), "groups with a head that lowers p(correct): "
        n_real = sum(len(v) for v in real_heads(circuit, null).values())
        ours = (f"{circuit.n_heads} heads ({n_real} standing out, {circuit.n_heads - n_real} padding); "
                f"{found_text}{', '.join(found) or 'none'}")
        necessary = beyond = False
        sample = f"{n_path_patching} path-patching pairs"
        if necessity is not None:
            graded, eff = necessity_grade(necessity, n_resamples=n_resamples)
            necessary, beyond = graded == "holds", graded in ("holds", "partly")
            row = necessity.row()
            ours += (f"; VF ablated {row['group ablated']:.2f} vs random heads outside the circuit "
                     f"{row['random heads outside the circuit (mean)']:.2f} (effect {_fmt(eff.as_dict())}), "
                     f"of the whole model {row['random heads of the whole model (mean)']:.2f}; full {row['full model']:.2f}")
            full = necessity.full
            n_ctx = 0 if full.clusters is None else int(torch.unique(full.clusters).numel())
            sample = (f"{prompts_sample({'n': full.n, 'n_clusters': n_ctx})}; {len(necessity.random_outside)} random "
                      "draws outside the circuit, "
                      f"{len(necessity.random_any)} of the whole model; " + sample)
        out.append(Verdict(1, s1, p1, ours, circuit_claim(len(found), necessary, beyond),
                           rule=f"{COMPETENCE_RULE}; then {CIRCUIT_RULE}", sample=sample))
    controls = set(controls)
    real_total = sum(len(v) for v in real_heads(circuit, null).values())
    for n, (comp, ft) in finetuned.items():  # one row per fine-tune (LoRA, full, each control)
        s2 = f"{who(n, controls)}'s circuit contains the base circuit's heads"
        p2 = CONTROL_PAPER if n in controls else "0.68-1.00 of Llama's heads per group found in Goat's / FLoat's circuits"
        skip = _not_testable(1, s2, p2, [base, comp])
        if skip is not None:
            out.append(skip)
            continue
        res = overlap_against_chance(circuit, ft, null)
        out.append(Verdict(1, s2, p2, overlap_text(res), overlap_grade(res), rule=f"{COMPETENCE_RULE}; then {OVERLAP_RULE}",
                           sample=f"{len(res['counted'])} group(s) with a head standing out; {real_total} of the base "
                                  f"circuit's {circuit.n_heads} heads stand out"
                                  + ("" if null is not None else " (no null sweep: a score below the floor suffices)")))
    return out


def over_random(summary: Mapping[str, Any], circuit_key: str = "faithfulness",
                random_key: str = "random_faithfulness", paired_key: str = "faithfulness_over_random"
                ) -> dict[str, float] | None:
    """A circuit's excess over random circuits of its size, ``{"value", "low", "high"}``: the
    paired estimate ``summary[paired_key]`` where the summary has it; else (rows from before it)
    ``summary[circuit_key]`` minus ``summary[random_key]`` with the widest interval the two
    intervals allow (circuit low minus random high, circuit high minus random low: unpaired, so
    conservative); None when no random circuit was drawn.

    >>> est = over_random({"faithfulness": {"value": 0.9, "low": 0.8, "high": 1.0},
    ...                    "random_faithfulness": {"value": 0.1, "low": 0.05, "high": 0.2}})
    >>> {k: round(v, 2) for k, v in est.items()}
    {'value': 0.8, 'low': 0.6, 'high': 0.95}
    """
    if summary.get(paired_key):
        return dict(summary[paired_key])
    if not summary.get(random_key):
        return None
    c, r = summary[circuit_key], summary[random_key]
    return {"value": c["value"] - r["value"], "low": c["low"] - r["high"], "high": c["high"] - r["low"]}


def against_random(grade: Holds, excess: Mapping[str, float] | None, margin: Threshold) -> Holds:
    """A circuit's ``grade`` on its own, held against random head sets of its size by its paired
    ``excess`` over them (``{"value", "low", "high"}``): kept when the excess's 95% interval lies
    above ``margin``; at most partly when it lies above 0 only, or when there is no baseline
    (``excess`` None: nothing shows the heads matter more than their number); "does not hold" when
    the interval reaches 0 (the circuit is no better than random heads; "above 0" means beyond
    float32 rounding of a mean over draws, 1e-6, far below one prompt in any evaluation). "not
    run", "not testable" and :data:`EXCEEDS_MODEL` stay as they are."""
    if grade in ("not run", NOT_TESTABLE, EXCEEDS_MODEL):
        return grade
    if excess is None or any(excess[k] != excess[k] for k in ("value", "low", "high")):
        return "partly" if grade == "holds" else grade
    if excess["low"] > margin.value:
        return grade
    if excess["low"] > 1e-6:
        return "partly" if grade == "holds" else grade
    return "does not hold"


def faithfulness_grade(faith: Mapping[str, float], excess: Mapping[str, float] | None) -> Holds:
    """Faithfulness F(C)/F(M) (``{"value", "low", "high"}``) on a two-sided band, then against
    random circuits (:func:`against_random` with its ``excess`` over them, :data:`FAITHFUL_OVER_RANDOM`):
    :data:`EXCEEDS_MODEL` when the whole interval lies above :data:`FAITHFUL_CEILING` (the circuit
    alone beats the model); otherwise :data:`FAITHFUL` on the interval, where a point estimate
    above the ceiling whose interval reaches into the band reads partly at most.

    >>> faithfulness_grade({"value": 1.2, "low": 1.1, "high": 1.3}, None)
    'exceeds the model'
    >>> faithfulness_grade({"value": 0.95, "low": 0.9, "high": 1.0}, {"value": 0.9, "low": 0.8, "high": 1.0})
    'holds'
    >>> faithfulness_grade({"value": 0.95, "low": 0.9, "high": 1.0}, {"value": 0.0, "low": -0.05, "high": 0.05})
    'does not hold'
    """
    if any(faith[k] != faith[k] for k in ("value", "low", "high")):
        return "not run"
    if faith["low"] > FAITHFUL_CEILING.value:
        return EXCEEDS_MODEL
    band = FAITHFUL.interval(faith)
    if band == "holds" and faith["value"] > FAITHFUL_CEILING.value:
        band = "partly"  # above the model on its point estimate; its interval does not settle which
    return against_random(band, excess, FAITHFUL_OVER_RANDOM)


FAITHFUL_BAND_RULE = (f"'{EXCEEDS_MODEL}' when the 95% interval lies above {FAITHFUL_CEILING.value:g} (the circuit "
                      f"alone beats the model); else holds when the interval lies at or above {FAITHFUL.holds:g} "
                      f"with the point estimate at most {FAITHFUL_CEILING.value:g}, and the paired excess over "
                      f"random circuits of its group sizes has its 95% interval above {FAITHFUL_OVER_RANDOM.value:g}; "
                      f"partly when the interval reaches below {FAITHFUL.holds:g} but not below "
                      f"{FAITHFUL.partly:g}, or the excess is above 0 only (or was not measured); does not hold "
                      f"when the interval lies below {FAITHFUL.partly:g} or the excess's interval reaches 0")


def _faith_ours(faith: Mapping[str, float], rand: Mapping[str, float] | None,
                excess: Mapping[str, float] | None, also: str = "") -> str:
    """A faithfulness verdict's ``ours``: the number (then ``also``), whether it beats the model,
    and random circuits."""
    text = _fmt(faith)
    if faith["low"] > FAITHFUL_CEILING.value:
        text += " (above the model: the circuit alone beats it)"
    text += also
    if rand:
        text += f"; random circuits of its size {_fmt(rand)}"
    return text + (f"; over random {_fmt(excess, '+.2f')}" if excess else "; no random circuits")


def faithfulness_verdicts(competences: Mapping[str, Competence], faith: Mapping[tuple[str, str], Mapping[str, Any]],
                          base: str, finetuned: Iterable[str], *, n_random: int, controls: Iterable[str] = ()) -> list:
    """The faithfulness chapter's verdicts from ``faith[(circuit of, evaluated in)]``, the
    :meth:`~entity_tracking.methods.ablation.FaithfulnessResult.summary` dicts (``faithfulness``,
    ``circuit_accuracy``, ``full_accuracy``: ``{"value", "low", "high"}``; with random circuits
    ``random_faithfulness`` and, paired, ``faithfulness_over_random``), graded by
    :func:`faithfulness_grade`; fine-tunes named in
    ``controls`` are marked as positive controls (ours), with no paper number beside them. A
    fine-tune that does not do the task may have ``full_accuracy`` alone (the chapter does not
    analyse it): its rows are not testable."""
    controls = set(controls)
    rule = f"{COMPETENCE_RULE}; then {FAITHFUL_BAND_RULE}"
    beats_rule = (f"{COMPETENCE_RULE}; then holds when the circuit's 95% interval lies above the full base "
                  "model's, partly when only its point estimate is higher")

    def faithful(model: str, paper: str) -> Any:
        statement = f"The base circuit is faithful in {'the base model' if model == base else who(model, controls)}"
        s = faith[(base, model)]
        sample = f"{prompts_sample(s['full_accuracy'])}; {n_random} random circuits"
        skip = _not_testable(1, statement, paper, [competences[base], competences[model]] if model != base
                             else [competences[base]], sample)
        if skip is not None:
            return skip
        excess = over_random(s)
        return Verdict(1, statement, paper, _faith_ours(s["faithfulness"], s.get("random_faithfulness"), excess),
                       faithfulness_grade(s["faithfulness"], excess), rule=rule, sample=sample)

    out = [faithful(base, "1.00 (Llama-7B)")]
    base_full = faith[(base, base)]["full_accuracy"]
    for m in finetuned:
        out.append(faithful(m, CONTROL_PAPER if m in controls else "0.97 / 0.89 / 0.88 (Vicuna / Goat / FLoat)"))
        s = faith[(base, m)]
        statement = f"The base circuit in {who(m, controls)} beats the full base model"
        paper = CONTROL_PAPER if m in controls else "0.73 (Goat) and 0.72 (FLoat) vs 0.66"
        # a model the chapter left out (it does not do the task) has its F(M) alone
        sample = prompts_sample(s.get("circuit_accuracy", s["full_accuracy"]))
        out.append(_not_testable(1, statement, paper, [competences[base], competences[m]], sample)
                   or Verdict(1, statement, paper, f"{_fmt(s['circuit_accuracy'])} vs {_fmt(base_full)}",
                              exceeds(s["circuit_accuracy"], base_full), rule=beats_rule, sample=sample))
    return out


def beats_base(claims: Sequence[Any], finetuned: Iterable[str]) -> dict[str, Any]:
    """Each fine-tune's "beats the full base model" verdict out of :func:`faithfulness_verdicts`'
    list (the base's verdict first, then for each fine-tune, in order, its faithfulness verdict and
    its beats verdict)."""
    finetuned = list(finetuned)
    if len(claims) != 1 + 2 * len(finetuned):
        raise ValueError(f"{len(claims)} verdicts for {len(finetuned)} fine-tunes: expected "
                         f"faithfulness_verdicts' 1 + 2 per fine-tune")
    return dict(zip(finetuned, claims[2::2]))


#: What an extended circuit's rows (ours) print in the paper's column.
EXTENSION_PAPER = ("none: an extension of ours, not in the paper (the paper's four-group circuit: faithfulness "
                   "1.00 in Llama-7B)")
EXTENSION_GAIN_RULE = ("holds when the paired 95% interval (over contexts) of the extended circuit's faithfulness "
                       "minus the paper circuit's lies above 0, partly when only its point estimate does")


def extended_circuit_verdicts(results: Mapping[str, Mapping[str, Any]], num_boxes: int, *,
                              controls: Iterable[str] = ()) -> list:
    """Our rows beside the paper's (binding chapter): for each model, whether the paper's circuit
    extended by groups of ours (:func:`entity_tracking.methods.path_patching.extend_circuit`) is faithful
    (:func:`faithfulness_grade`: the two-sided band, and beyond random circuits of the extended
    sizes by ``extended_over_random`` where the summary has it), and whether the extension makes it
    more faithful than the paper's circuit (:data:`EXTENSION_GAIN_RULE`). ``results[model]`` is
    :meth:`entity_tracking.methods.binding.ExtendedFaithfulness.to_json`; competence is read from its F(M).
    Models named in ``controls`` are marked as positive controls (ours). The paper's own verdicts
    (circuit and faithfulness chapters) are not touched."""
    out = []
    for name, r in results.items():
        s = r["summary"]
        label = who(name, controls)
        added = " + ".join(GROUP_LABELS.get(g, g).replace(" (ours)", "") + "s" for g in r["extension_groups"])
        full = {**s["full_accuracy"], "n": s["full_accuracy"].get("n") or r["n_examples"]}
        sample = (f"{prompts_sample(full)}{'' if full.get('n_clusters') else ' (paired bootstrap)'}; "
                  f"{r['n_random']} random circuits of each size")
        comp = Competence.of(name, s["full_accuracy"], num_boxes, r["n_examples"])
        s1 = f"Ours: the paper's circuit + {added} is faithful in {label}"
        s2 = f"Ours: adding the {added} makes the paper's circuit more faithful in {label}"
        ext, base, gain = s["extended_faithfulness"], s["paper_faithfulness"], s["gain"]
        skip = [_not_testable(1, st, EXTENSION_PAPER, [comp], sample) for st in (s1, s2)]
        if skip[0] is not None:
            out += skip
            continue
        excess = over_random(s, "extended_faithfulness", "random_extended_faithfulness", "extended_over_random")
        sizes = r["group_sizes"]
        out.append(Verdict(1, s1, EXTENSION_PAPER,
                           _faith_ours(ext, s.get("random_extended_faithfulness"), excess,
                                       f" with {sizes['extended']} heads; the paper's circuit {_fmt(base)} with "
                                       f"{sizes['paper']}"),
                           faithfulness_grade(ext, excess), rule=f"{COMPETENCE_RULE}; then {FAITHFUL_BAND_RULE}",
                           sample=sample))
        out.append(Verdict(1, s2, EXTENSION_PAPER,
                           f"faithfulness {gain['value']:+.2f} [{gain['low']:+.2f}, {gain['high']:+.2f}]",
                           "holds" if gain["low"] > 0 else "partly" if gain["value"] > 0 else "does not hold",
                           rule=f"{COMPETENCE_RULE}; then {EXTENSION_GAIN_RULE}", sample=sample))
    return out


CMAP_GAIN_RULE = (f"a gain to attribute: the fine-tune's gain over the base is at least {MIN_GAIN.value:g} and its "
                  "95% interval (paired over contexts) is above 0")


CMAP_RANDOM_RULE = (f"holds when the full circuit's share of the gain has its 95% interval at or above "
                    f"{CMAP_RECOVERY.holds:g} and its paired excess over random head sets of the same sizes at the "
                    f"same positions has its 95% interval above {CMAP_OVER_RANDOM.value:g}; partly when the share's "
                    f"interval reaches below {CMAP_RECOVERY.holds:g} without lying below {CMAP_RECOVERY.partly:g}, or "
                    "the excess is above 0 only (or no random sets were patched); does not hold when the share's "
                    f"interval lies below {CMAP_RECOVERY.partly:g} or the excess's interval reaches 0 (the circuit "
                    "recovers no more than any heads there)")


def cmap_verdicts(rows_by_finetune: Mapping[str, Iterable[Mapping[str, Any]]], num_boxes: int, base: str = "base",
                  controls: Iterable[str] = (), baselines: Mapping[str, Mapping[str, Any]] | None = None) -> list:
    """The CMAP chapter's verdicts from each fine-tune's :func:`entity_tracking.methods.cmap.gain_recovery` rows
    (with their ``share`` intervals); competence comes from the rows of the models alone.
    ``baselines[fine-tune]`` is its :func:`entity_tracking.methods.cmap.random_baseline`: the full
    circuit's recovery is held against random head sets of its sizes and positions
    (:func:`against_random`, :data:`CMAP_OVER_RANDOM`); a fine-tune without one reads partly at most.
    Fine-tunes named in ``controls`` are marked as positive controls (ours). A profile with no
    fine-tune gets one "not run" row for the claim."""
    if not rows_by_finetune:
        return [Verdict(3, "The fine-tuned models' gain is carried by the circuit", "see the paper's CMAP tables",
                        "no fine-tuned model in this profile", "not run")]
    out = []
    controls = set(controls)
    for ft, rows in rows_by_finetune.items():
        rows = list(rows)
        by = {row_key(r): r for r in rows}
        base_row, ft_row = by[BASE_ALONE], by[FINETUNED_ALONE]
        comps = [Competence.of(name, {"value": r["accuracy"], "low": r["low"], "high": r["high"]}, num_boxes,
                               r["n_prompts"]) for name, r in ((base, base_row), (ft, ft_row))]
        gain = {"value": ft_row["share"], "low": ft_row["share_low"], "high": ft_row["share_high"]}
        n = int(base_row["n_prompts"])
        sample = prompts_sample({"n": n, "n_clusters": base_row.get("n_clusters", 0)})
        sample += "" if base_row.get("n_clusters") else " (paired bootstrap)"
        baseline = (baselines or {}).get(ft)
        s1, p1 = f"Patching {who(ft, controls)}'s circuit recovers its gain", "full circuit recovers 100% of the gain (0.66 → 0.82)"
        p1 = CONTROL_PAPER if ft in controls else p1
        skip = _not_testable(3, s1, p1, comps, sample)
        if skip is not None:
            out.append(skip)
            continue
        if not (gain["low"] > 0 and gain["value"] >= MIN_GAIN.value):
            out.append(Verdict(3, s1, p1, f"no gain to attribute: gain {_fmt(gain)} (fine-tuned "
                               f"{ft_row['accuracy']:.2f} vs base {base_row['accuracy']:.2f})",
                               "does not hold", rule=f"{COMPETENCE_RULE}; then {CMAP_GAIN_RULE}", sample=sample))
            continue
        full = by.get(FULL_CIRCUIT)
        share = ({"value": full["share"], "low": full["share_low"], "high": full["share_high"]} if full
                 else {"value": float("nan"), "low": float("nan"), "high": float("nan")})
        excess = baseline["excess"] if baseline else None
        against = (f"; random head sets of its sizes at its positions {_fmt(baseline['random'])}, excess "
                   f"{_fmt(excess, '+.2f')}" if baseline else "; no random head sets patched")
        out.append(Verdict(3, s1, p1, f"full circuit recovers {_fmt(share)} of a {_fmt(gain)} gain" + against,
                           against_random(CMAP_RECOVERY.interval(share), excess, CMAP_OVER_RANDOM),
                           rule=f"{COMPETENCE_RULE}; then {CMAP_GAIN_RULE}; then {CMAP_RANDOM_RULE}",
                           sample=sample + (f"; {baseline['n_random']} random head sets (bootstrap over "
                                            "draws too)" if baseline else "")))
        (q, k, v), holds = query_carries(rows)
        out.append(Verdict(3, f"The Value Fetchers' query carries most of {who(ft, controls)}'s gain",
                           CONTROL_PAPER if ft in controls else "VF query 0.77 vs key 0.63, value 0.69 (Goat → Llama)",
                           f"shares of the gain: Q {_fmt(q)}, K {_fmt(k)}, V {_fmt(v)}", holds,
                           rule=f"{COMPETENCE_RULE}; then {QUERY_RULE}", sample=sample))
    return out


QUERY_RULE = ("holds when the query's 95% interval lies above both the key's and the value's, partly when only its "
              "point estimate is highest")


def query_carries(rows: Iterable[Mapping[str, Any]], group: str = "value_fetcher"
                  ) -> tuple[tuple[dict, dict, dict], Holds]:
    """The shares of the gain that input CMAP of ``group``'s query, key and value recovers (from
    :func:`entity_tracking.methods.cmap.gain_recovery` rows), and whether the query carries most
    of it (:data:`QUERY_RULE`)."""
    rows = list(rows)
    qkv = {}
    for site in "qkv":
        r = next((r for r in rows if r["kind"] == "input" and r["sites"] == site and r["group"] == group), None)
        qkv[site] = ({"value": r["share"], "low": r["share_low"], "high": r["share_high"]} if r
                     else {"value": float("nan"), "low": float("nan"), "high": float("nan")})
    q, k, v = qkv["q"], qkv["k"], qkv["v"]
    if any(x["value"] != x["value"] for x in qkv.values()):
        holds: Holds = "not run"
    elif q["low"] > max(k["high"], v["high"]):
        holds = "holds"
    else:
        holds = "partly" if q["value"] > max(k["value"], v["value"]) else "does not hold"
    return (q, k, v), holds


def write_competence(path, competences: Mapping[str, Competence]) -> None:
    """Write every model's :class:`Competence` (the circuit chapter does, for the later chapters)."""
    write_json(path, {name: {"model": c.model, "accuracy": dict(c.accuracy), "n": c.n, "chance": c.chance,
                             "n_contexts": c.n_contexts} for name, c in competences.items()})


def read_competence(path) -> dict[str, Competence]:
    """The :class:`Competence` of every model, as :func:`write_competence` wrote them."""
    return {name: Competence(d["model"], d["accuracy"], int(d["n"]), float(d["chance"]), int(d.get("n_contexts", 0)))
            for name, d in read_json(path).items()}


DCM_EXPECTED = {"value_fetcher": "value", "position_transmitter": "position", "position_detector": "position"}


def dcm_verdicts(competences: Mapping[str, Competence], pattern: Mapping[str, Mapping[str, str]], base: str,
                 *, sample: str) -> list:
    """The DCM chapter's verdicts from :func:`entity_tracking.methods.dcm.functionality`'s ``pattern``
    (``{model: {group: "position" | "value" | "neither"}}``); ``sample`` states the pairs behind it."""
    rule = (f"{COMPETENCE_RULE}; then a group encodes position (value) when that share's 95% interval lies at or "
            f"above {DCM_SHARE_FLOOR.value:g}% and above the other share's interval, beating it by "
            f"> {DCM_MARGIN.value:g} points")
    s1, p1 = "Every model's groups encode the same kind of information", "VF: value, PT and PD: position, in all four models"
    s2 = "VF carries value; PT and PD carry position (base model)"
    p2 = "VF object value 45.6%, PT positional 36.9%, PD positional 44.0% (Llama)"
    out = []
    # every model the claim is about, including those DCM left out because they do not do the task
    models = list(dict.fromkeys([*pattern, *competences]))
    skip = _not_testable(2, s1, p1, [competences[m] for m in models if m in competences], sample)
    if skip is not None:
        out.append(skip)
    else:
        patterns = list(pattern.values())
        same = all(p == patterns[0] for p in patterns)
        informative = any(v != "neither" for p in patterns for v in p.values())
        ours = (f"{'same' if same else 'different'} pattern across {len(patterns)} model(s)"
                + ("" if informative else "; but no group's share stands above the floor in any model"))
        out.append(Verdict(2, s1, p1, ours, "not run" if len(patterns) < 2 else
                           "holds" if same and informative else "does not hold",
                           rule=f"{rule}; holds when every model shows the same pattern and some group encodes "
                                "something", sample=sample))
    skip = _not_testable(2, s2, p2, [competences[base]], sample)
    if skip is not None:
        out.append(skip)
    else:
        got = pattern.get(base, {})
        matches = [g for g, v in DCM_EXPECTED.items() if got.get(g) == v]
        out.append(Verdict(2, s2, p2, f"{len(matches)} of 3 groups match: " + ", ".join(
            f"{g.replace('_', ' ')}: {got.get(g, 'no heads')}" for g in DCM_EXPECTED),
            "holds" if len(matches) == 3 else "partly" if matches else "does not hold",
            rule=f"{rule}; holds when all three groups match the paper, partly when some do", sample=sample))
    return out


PREMISE_RULE = ("first: the base or the fine-tune does the task (accuracy above 1/boxes with its 95% interval: "
                "between two models at chance there is no tracking to improve); then holds when the paired "
                "95% interval of the fine-tune's gain over the base lies above 0")


def premise_verdicts(base: Competence, finetuned: Mapping[str, tuple[Competence, Mapping[str, float]]], *,
                     controls: Iterable[str] = (), samples: Mapping[str, str] | None = None) -> list:
    """The fine-tuning chapter's premise: each fine-tune's accuracy gain over the base
    (``{"value", "low", "high"}``, a paired interval over prompts, or over seeds and prompts as
    ``samples[name]`` says) is above zero. A positive control (``controls``) is a fine-tune on
    entity tracking itself, marked as ours."""
    out = []
    controls = set(controls)
    for name, (comp, gain) in finetuned.items():
        if name in controls:
            statement = f"Fine-tuning on entity tracking ({who(name, controls)}) improves entity tracking"
            paper = CONTROL_PAPER
        else:
            statement = f"Arithmetic fine-tuning ({name}) improves entity tracking"
            paper = "+0.16 (Goat-7B and FLoat-7B vs Llama-7B: 0.82 vs 0.66)"
        sample = (samples or {}).get(name) or f"{comp.n} prompts (paired bootstrap)"
        if not (base.ok or comp.ok):
            out.append(Verdict(0, statement, paper, untestable([base, comp]), NOT_TESTABLE, rule=PREMISE_RULE,
                               sample=sample))
            continue
        out.append(Verdict(0, statement, paper, f"{gain['value']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}]",
                           "holds" if gain["low"] > 0 else "does not hold", rule=PREMISE_RULE, sample=sample))
    return out


ARITHMETIC_RULE = (f"holds when the 95% interval of exact match on held-out problems lies at or above "
                   f"{ARITHMETIC_LEARNED.value:g}, partly when only its point estimate does")


def arithmetic_verdicts(exact_match: Mapping[str, Mapping[str, float]], *, samples: Mapping[str, str]) -> list:
    """Whether each arithmetic fine-tune learned arithmetic: its final exact match
    (``{"value", "low", "high"}``) against :data:`ARITHMETIC_LEARNED`. The paper's premise is about
    models that did (Goat-7B beats GPT-4 on arithmetic); one that did not cannot test it."""
    out = []
    for name, em in exact_match.items():
        holds: Holds = ("holds" if em["low"] >= ARITHMETIC_LEARNED.value
                        else "partly" if em["value"] >= ARITHMETIC_LEARNED.value else "does not hold")
        out.append(Verdict(0, f"Arithmetic fine-tuning ({name}) teaches arithmetic",
                           "Goat-7B: near-perfect multi-digit addition and subtraction",
                           f"exact match {_fmt(em, '.3f')}", holds,  # 0.495 is not 0.50
                           rule=ARITHMETIC_RULE, sample=samples.get(name, "")))
    return out


def finetuning_verdicts(competences: Mapping[str, Competence], base: str, correct: Mapping[str, Any],
                        seed_curves: Mapping[str, Any], *, controls: Iterable[str] = (),
                        clusters: Sequence[int] | None = None, n_resamples: int = 1000) -> list:
    """The fine-tuning chapter's verdicts: whether each arithmetic fine-tune learned arithmetic,
    and whether each fine-tune improves entity tracking. A fine-tune with replicate seeds
    (``seed_curves[name]``: :func:`entity_tracking.methods.dynamics.replicate_curve` rows) is judged on
    its last checkpoint over all seeds; any other (a hub model, the positive control) on its own
    per-prompt correctness ``correct[name]`` against ``correct[base]`` (paired bootstrap, over
    contexts when ``clusters``, the prompts' ``context_id``, is given). The arithmetic rows' sample
    says whether the held-out problems were checked against the seeds' training streams (the
    rows' ``problems_in_training``). A profile with no fine-tune gets one "not run" row for the premise."""
    if not any(name != base for name in correct):
        return [Verdict(0, "Fine-tuning improves entity tracking", "0.66 → 0.82", "no fine-tuned model in this profile",
                        "not run")]

    def est(row, key):
        return {"value": row[key], "low": row[f"{key}_low"], "high": row[f"{key}_high"]}

    gains, samples, learned, learned_samples = {}, {}, {}, {}
    for name, c in correct.items():
        if name == base:
            continue
        rows = seed_curves.get(name)
        if rows:
            last = rows[-1]
            gains[name] = (competences[name], est(last, "gain"))
            n_ctx = int(last.get("n_contexts") or 0)
            samples[name] = (f"{last['seeds']} seeds x {n_ctx} contexts x {round(last['n_prompts'] / n_ctx)} queries "
                             f"at step {last['step']} (bootstrap over seeds and contexts)" if n_ctx else
                             f"{last['seeds']} seeds x {last['n_prompts']} prompts at step {last['step']} "
                             "(bootstrap over seeds and prompts)")
            learned[name] = est(last, "arithmetic")
            learned_samples[name] = f"{last['seeds']} seeds x {last['n_problems']} held-out problems"
            if "problems_in_training" in last:  # rows of replicate_curve: checked against the training streams
                seen = last["problems_in_training"]
                learned_samples[name] += (" (none in training)" if seen == 0 else " (not checked against training)"
                                          if seen is None else f" ({seen} found in training)")
        else:
            pair = torch.stack([torch.as_tensor(c).float(), torch.as_tensor(correct[base]).float()])
            gain = bootstrap(pair, lambda a: a[0] - a[1], clusters=clusters, n_resamples=n_resamples)
            gains[name] = (competences[name], gain.as_dict())
            if clusters is not None:
                samples[name] = prompts_sample(gain) + ", paired"
    return (arithmetic_verdicts(learned, samples=learned_samples)
            + premise_verdicts(competences[base], gains, controls=controls, samples=samples))


# ---------------------------------------------------------------------------------------------
# Ground truth (ours, issue 29): the methods scored on a model with the mechanism planted
# ---------------------------------------------------------------------------------------------

#: The landing page's claim number of the ground-truth rows (all of them ours).
GROUND_TRUTH_CLAIM = 4

#: What the planted base must show to stand for the paper's mechanism (issue 29's "done when").
PLANTED_CHECKS = {
    "clean": Threshold(0.85, "issue 29: the planted base does the task well (Llama-7B: 0.66)"),
    "every_box": Threshold(0.6, "issue 29: no queried box is left to chance"),
    "context_kept": Threshold(0.7, "issue 29: binding survives every context head mean-ablated, as a positional "
                                   "binding does"),
    "interchange": Threshold(0.8, "issue 29: each planted group implements its variable on held-out pairs"),
    "outside_kept": Threshold(0.9, "issue 29 (SIIT's strict check): the heads outside the circuit carry nothing "
                                   "the task needs"),
}

#: A planted fine-tune must gain this much (its interval above zero) to have a gain to attribute.
PLANTED_GAIN = Threshold(0.10, "issue 29: a gain of ten points, well above the 2-point MIN_GAIN")

#: Recall of the planted heads, per group, by a method that finds heads (path patching, DCM).
RECOVERS = Grade(0.8, 0.5, "a method that finds four of five planted heads has found the group; under half, "
                           "it has not")

RECOVERY_RULE = (f"holds when every planted group's recall is at least {RECOVERS.holds:g} and its precision "
                 "beats the 95th percentile of random circuits of the same group sizes, and so does the precision "
                 "of the whole circuit (heads put in a group nothing was planted in count as false finds); partly "
                 "when the recall "
                 f"of every planted head, whatever group it was put in, is at least {RECOVERS.partly:g} and beats "
                 "the 95th percentile of the random circuits'; "
                 "does not hold otherwise")


def _gt(statement: str, ours: str, holds: Holds, rule: str = "", sample: str = "") -> Verdict:
    return Verdict(GROUND_TRUTH_CLAIM, "Ours: " + statement, "none: ours, not in the paper", ours, holds,
                   rule=rule, sample=sample)


def planted_verdict(checks: Mapping[str, Any]) -> Verdict:
    """Whether the planted base meets the issue's checks: ``checks`` holds ``clean`` and
    ``context_kept`` (estimates), ``by_box`` (values), ``interchange`` (``{group: estimate}``) and
    ``outside_kept`` (an estimate), all measured on the book's own prompts."""
    t = PLANTED_CHECKS
    iia = checks["interchange"]
    ok = (checks["clean"]["value"] >= t["clean"].value and min(checks["by_box"]) >= t["every_box"].value
          and checks["context_kept"]["value"] >= t["context_kept"].value
          and all(e["value"] >= t["interchange"].value for e in iia.values())
          and checks["outside_kept"]["value"] >= t["outside_kept"].value)
    ours = (f"clean {_fmt(checks['clean'])} (lowest box {min(checks['by_box']):.2f}); context mean-ablated keeps "
            f"{_fmt(checks['context_kept'])}; interchange " + ", ".join(f"{GROUP_LABELS[g]} {_fmt(e)}" for g, e in iia.items())
            + f"; outside the circuit resample-ablated keeps {_fmt(checks['outside_kept'])}")
    rule = "holds when every point estimate meets its threshold: " + "; ".join(
        f"{k} >= {v.value:g} ({v.reason})" for k, v in t.items())
    return _gt("the planted base implements the paper's mechanism in its designated heads (issue 29's checks)", ours,
               "holds" if ok else "does not hold", rule, checks.get("sample", ""))


def planted_gain_verdict(name: str, gain: Mapping[str, float], answer: str, sample: str = "") -> Verdict:
    """Whether a planted fine-tune gained what its known answer needs (:data:`PLANTED_GAIN`)."""
    holds: Holds = ("holds" if gain["value"] >= PLANTED_GAIN.value and gain["low"] > 0 else
                    "partly" if gain["low"] > 0 else "does not hold")
    return _gt(f"the planted fine-tune {name} gains accuracy ({answer})", f"gain {_fmt(gain, '+.2f')}", holds,
               f"holds at a gain >= {PLANTED_GAIN.value:g} with its 95% interval above 0; partly when only the "
               f"interval is above 0 ({PLANTED_GAIN.reason})", sample)


def path_patching_recovery_verdict(rows: Sequence[Mapping[str, Any]], which: str = "", sample: str = "") -> Verdict:
    """Path patching against the planted circuit, from :func:`entity_tracking.methods.ground_truth.recovery_table`
    rows (the planted groups and ``"circuit"``) of one reading of its sweep (``which``: e.g. the
    circuit after minimality, or the heads standing out against the null)."""
    groups = [r for r in rows if r["group"] != "circuit"]
    union = next(r for r in rows if r["group"] == "circuit")
    full = all(r["recall"] >= RECOVERS.holds and r["precision"] > r.get("random_precision_q95", float("nan"))
               for r in groups) and union["precision"] > union.get("random_precision_q95", float("nan"))
    beyond = union["recall"] >= RECOVERS.partly and union["recall"] > union.get("random_recall_q95", float("nan"))
    holds: Holds = "holds" if full else "partly" if beyond else "does not hold"
    ours = "; ".join(f"{GROUP_LABELS.get(r['group'], r['group'])} recall {r['recall']:.2f}, precision "
                     f"{r['precision']:.2f} (random {r['random_precision_mean']:.2f})" for r in groups)
    ours += (f"; every planted head found in some group: {union['hits']} of {union['planted']}, among "
             f"{union['found']} heads (precision {union['precision']:.2f}, random {union['random_precision_mean']:.2f})")
    return _gt("path patching recovers the planted circuit" + (f" ({which})" if which else ""), ours, holds,
               RECOVERY_RULE, sample)


def faithfulness_recovery_verdict(summary: Mapping[str, Mapping[str, float]], sample: str = "") -> Verdict:
    """Faithfulness of the planted circuit (its ``summary`` from
    :meth:`~entity_tracking.methods.ablation.FaithfulnessResult.to_json`), graded as the
    faithfulness chapter grades any circuit (:func:`faithfulness_grade`)."""
    faith, excess = summary["faithfulness"], summary.get("faithfulness_over_random")
    ours = f"F(C)/F(M) {_fmt(faith)}" + (f"; random circuits of its sizes {_fmt(summary['random_faithfulness'])}, "
                                         f"excess {_fmt(excess, '+.2f')}" if excess else "")
    return _gt("faithfulness recovers the planted circuit as faithful, beyond random circuits of its sizes", ours,
               faithfulness_grade(faith, excess), FAITHFUL_BAND_RULE, sample)


def dcm_recovery_verdict(rows: Sequence[Mapping[str, Any]], sample: str = "") -> Verdict:
    """DCM against the planted heads, from :func:`entity_tracking.methods.ground_truth.dcm_recovery`
    rows: graded on the (position, desideratum) pairs where heads were planted."""
    graded = [r for r in rows if r["planted"]]
    if not graded:
        return _gt("DCM recovers the planted heads of each variable", "no desideratum with planted heads", "not run")
    ok = all(r["recall"] >= RECOVERS.holds and r["precision"] >= RECOVERS.holds for r in graded)
    some = all(r["recall"] >= RECOVERS.partly for r in graded)
    ours = "; ".join(f"{r['desideratum']} at {r['position']}: selected "
                     f"{' '.join(f'{l}.{h}' for l, h in r['selected']) or 'none'} "
                     f"(planted {' '.join(f'{l}.{h}' for l, h in r['planted'])}; recall {r['recall']:.2f}, "
                     f"precision {r['precision']:.2f})" for r in graded)
    return _gt("DCM recovers the planted heads of each variable", ours,
               "holds" if ok else "partly" if some else "does not hold",
               f"holds when, for every desideratum with planted heads at the position, recall and precision are at "
               f"least {RECOVERS.holds:g}; partly when every recall is at least {RECOVERS.partly:g}", sample)


def cmap_recovery_verdicts(enhance: Mapping[str, Mapping[str, float]], route: Mapping[str, Mapping[str, float]],
                           sample: str = "", enhance_rows: Sequence[Mapping[str, Any]] = ()) -> dict[str, list[Verdict]]:
    """CMAP on the planted fine-tunes. ``enhance``: the shares (estimates) of fine-tune (a)'s gain
    recovered by the degraded group (``"group"``) and the full planted circuit (``"circuit"``);
    the truth is that the group carries it. ``route``: the shares of fine-tune (b)'s gain
    recovered by the full planted circuit (``"circuit"``) and by the new heads (``"new"``); the
    truth is that the circuit carries none of it. Returns each fine-tune's rows (``"(a)"``, ``"(b)"``). ``enhance_rows``: fine-tune (a)'s
    ``gain_recovery`` rows with input CMAP of the Value Fetchers; the degraded Position
    Transmitters write only at the last token, so the truth is that the fetchers' query carries the
    gain, and their keys and values (read at the context) none of it."""
    a = enhance["group"]
    v1 = _gt("CMAP recovers the planted carrier of fine-tune (a)'s gain (the group it retrained)", f"that group recovers "
             f"{_fmt(a)} of the gain (full planted circuit {_fmt(enhance['circuit'])})", CMAP_RECOVERY.interval(a),
             CMAP_RECOVERY.interval_rule, sample)
    c, new = route["circuit"], route["new"]
    if c["high"] < CMAP_RECOVERY.partly:
        # a patch that moved nothing would also recover none: the same patching must find the gain
        # in the heads that carry it (the positive control) for "none from the circuit" to count
        holds: Holds = "holds" if CMAP_RECOVERY.interval(new) == "holds" else "partly"
    else:
        holds = "partly" if c["value"] < CMAP_RECOVERY.partly else "does not hold"
    v2 = _gt("CMAP recovers fine-tune (b)'s planted answer: the base circuit does not carry its gain (a new route does)",
             f"the full planted circuit recovers {_fmt(c)}; the new heads {_fmt(new)}", holds,
             f"holds when the circuit's 95% interval lies below {CMAP_RECOVERY.partly:g} (CMAP_RECOVERY's 'most of "
             f"the gain lies outside it') and the new heads' interval lies at or above {CMAP_RECOVERY.holds:g} (the "
             "same patching finds the gain where it is); partly when only one of the two holds, or only the "
             "circuit's point estimate is below", sample)
    out = {"(a)": [v1], "(b)": [v2]}
    if enhance_rows:
        (q, k, vv), holds = query_carries(enhance_rows)
        out["(a)"].append(_gt("input CMAP recovers where fine-tune (a)'s gain enters the Value Fetchers (their query)",
                              f"shares of the gain: Q {_fmt(q)}, K {_fmt(k)}, V {_fmt(vv)}", holds, QUERY_RULE, sample))
    return out


def ground_truth_verdicts(planted: Verdict, gains: Mapping[str, Verdict], methods: Sequence[Verdict],
                          cmap_rows: Mapping[str, Sequence[Verdict]]) -> list[Verdict]:
    """The ground-truth chapter's rows in order, each method's made "not testable" where what it
    is scored against is missing: every method row when the planted base does not implement the
    mechanism (``planted`` does not hold), and a fine-tune's CMAP rows (``cmap_rows[name]``) when
    that fine-tune has no gain (``gains[name]`` does not hold)."""
    def skip(v: Verdict, why: str) -> Verdict:
        return Verdict(v.claim, v.statement, v.paper, f"{why}; measured: {v.ours}", NOT_TESTABLE, rule=v.rule,
                       sample=v.sample)

    base_ok = planted.holds == "holds"
    out = [planted, *gains.values()]
    out += [v if base_ok else skip(v, "the planted base does not implement the mechanism") for v in methods]
    for name, rows in cmap_rows.items():
        for v in rows:
            if not base_ok:
                v = skip(v, "the planted base does not implement the mechanism")
            elif gains[name].holds not in ("holds", "partly"):
                v = skip(v, "its fine-tune has no gain")
            out.append(v)
    return out
