"""Ratios against their baselines (issue 28): faithfulness is graded on a two-sided band and must
beat random circuits of its size; CMAP recovery must beat random head sets of the same sizes at
the same positions."""

from __future__ import annotations

import pytest

from entity_tracking.methods import verdicts as V

BOXES = 7


def _est(v, lo, hi, n=500, clusters=72):
    return {"value": v, "low": lo, "high": hi, "n": n, "n_clusters": clusters}


def _faith(f, random=None, over=None, full=(0.7, 0.66, 0.74)):
    s = {"full_accuracy": _est(*full), "circuit_accuracy": _est(full[0] * f[0], full[1] * f[1], full[2] * f[2]),
         "faithfulness": _est(*f)}
    if random is not None:
        s["random_faithfulness"] = _est(*random)
    if over is not None:
        s["faithfulness_over_random"] = _est(*over)
    return s


def _able(*names):
    return {n: V.Competence(n, {"value": 0.7, "low": 0.66, "high": 0.74}, 500, 1 / BOXES) for n in names}


def test_a_faithfulness_above_the_model_reads_exceeds_the_model_with_its_number():
    got = V.faithfulness_verdicts(_able("base"), {("base", "base"): _faith((1.2, 1.1, 1.3), over=(1.15, 1.05, 1.25))},
                                  "base", [], n_random=10)
    assert len(got) == 1 and got[0].holds == V.EXCEEDS_MODEL == "exceeds the model"
    assert got[0].ours.startswith("1.20 [1.10, 1.30] (above the model")
    assert V.EXCEEDS_MODEL in V.VERDICTS and "above 1.02" in got[0].rule
    # the same number in the extended circuit's rows (binding chapter)
    ext = {"n_examples": 500, "n_random": 10, "extension_groups": ["object_writer"],
           "group_sizes": {"paper": 21, "extended": 25},
           "summary": {"full_accuracy": _est(0.7, 0.66, 0.74), "paper_faithfulness": _est(0.5, 0.4, 0.6),
                       "extended_faithfulness": _est(1.2, 1.1, 1.3), "gain": _est(0.7, 0.6, 0.8),
                       "extended_over_random": _est(1.1, 1.0, 1.2)}}
    row = V.extended_circuit_verdicts({"m": ext}, BOXES)[0]
    assert row.holds == V.EXCEEDS_MODEL and row.ours.startswith("1.20 [1.10, 1.30] (above the model")
    assert row.sample.startswith("72 contexts x 7 queries")


def test_the_band_is_two_sided_on_the_interval():
    over = _est(0.9, 0.8, 1.0)
    assert V.faithfulness_grade(_est(0.95, 0.85, 1.05), over) == "holds"  # reaches past 1 by noise only
    assert V.faithfulness_grade(_est(1.01, 0.95, 1.07), over) == "holds"  # within the rounding tolerance
    assert V.faithfulness_grade(_est(1.06, 1.0, 1.12), over) == "partly"  # above on its point estimate only
    assert V.faithfulness_grade(_est(1.08, 1.03, 1.13), over) == V.EXCEEDS_MODEL
    assert V.faithfulness_grade(_est(0.7, 0.6, 0.8), over) == "partly"
    assert V.faithfulness_grade(_est(0.3, 0.2, 0.4), over) == "does not hold"
    assert V.faithfulness_grade(_est(float("nan"), float("nan"), float("nan")), over) == "not run"


def test_a_circuit_equal_to_its_random_circuits_does_not_hold():
    """A faked circuit whose accuracy is that of random circuits of its size: in the band, but no
    better than random heads."""
    same = (0.95, 0.9, 1.0)
    paired = V.faithfulness_verdicts(_able("base"), {("base", "base"): _faith(same, random=same,
                                                                              over=(0.0, -0.04, 0.04))},
                                     "base", [], n_random=10)[0]
    assert paired.holds == "does not hold" and "over random +0.00 [-0.04, +0.04]" in paired.ours
    # rows from before the paired estimate: the two intervals, compared unpaired
    unpaired = V.faithfulness_verdicts(_able("base"), {("base", "base"): _faith(same, random=same)},
                                       "base", [], n_random=10)[0]
    assert unpaired.holds == "does not hold"
    assert unpaired.sample == "72 contexts x 7 queries (500 prompts, bootstrap over contexts); 10 random circuits"


def test_faithful_needs_the_margin_over_random_and_a_baseline_to_hold():
    f = (0.95, 0.9, 1.0)
    one = lambda **kw: V.faithfulness_verdicts(_able("base"), {("base", "base"): _faith(f, **kw)}, "base", [],  # noqa: E731
                                               n_random=10)[0].holds
    assert one(random=(0.05, 0.02, 0.08)) == "holds"  # beyond random by 0.82 at least
    assert one(over=(0.9, 0.8, 1.0)) == "holds"
    assert one(over=(0.45, 0.3, 0.6)) == "partly"  # beyond random, by less than the margin
    assert one() == "partly"  # no random circuits: nothing shows the heads matter more than their number
    assert V.over_random(_faith(f, random=(0.1, 0.05, 0.2), over=(0.7, 0.6, 0.8)))["low"] == 0.6  # paired first


def test_the_margin_and_the_ceiling_are_stated_and_set_from_the_papers_numbers():
    assert V.FAITHFUL_CEILING.value == pytest.approx(1.02) and "0.88-1.00" in V.FAITHFUL_CEILING.reason
    assert V.FAITHFUL_OVER_RANDOM.value == V.FAITHFUL.partly and "Table 1" in V.FAITHFUL_OVER_RANDOM.reason
    assert V.CMAP_OVER_RANDOM.value == V.CMAP_RECOVERY.partly and V.CMAP_OVER_RANDOM.reason


def test_beats_base_still_picks_each_finetunes_beats_verdict_with_random_circuits():
    faith = {("base", m): _faith((0.95, 0.9, 1.0), random=(0.05, 0.02, 0.08)) for m in ("base", "a")}
    claims = V.faithfulness_verdicts(_able("base", "a"), faith, "base", ["a"], n_random=10)
    assert [c.holds for c in claims[:2]] == ["holds", "holds"]
    assert "in a beats the full base model" in V.beats_base(claims, ["a"])["a"].statement
