"""The verdict rules (entity_tracking.verdicts): one test per rule, at and around its cut-offs."""

from __future__ import annotations

import doctest

import pytest

from entity_tracking import verdicts as V
from entity_tracking.circuit import GROUPS, Circuit


def test_the_module_example_runs():
    assert doctest.testmod(V).failed == 0


@pytest.mark.parametrize("grade", [V.FAITHFUL, V.CIRCUIT_OVERLAP, V.CMAP_RECOVERY, V.GROUP_COUNT])
def test_grades_cut_at_their_thresholds(grade):
    assert grade.reason and grade.partly < grade.holds
    assert grade(grade.holds) == "holds"
    assert grade(grade.holds - 1e-9) == "partly"
    assert grade(grade.partly) == "partly"
    assert grade(grade.partly - 1e-9) == "does not hold"
    assert grade(float("nan")) == "not run"
    assert f"{grade.holds:g}" in grade.rule


def test_every_threshold_has_a_reason():
    for name in V.__all__:
        obj = getattr(V, name)
        if isinstance(obj, (V.Threshold, V.Grade)):
            assert len(obj.reason) > 20, name


def test_chance_and_minimality_measurable():
    assert V.chance(7) == pytest.approx(1 / 7)
    with pytest.raises(ValueError, match="num_boxes must be at least 1"):
        V.chance(0)
    assert V.minimality_measurable(0.15, 7) and not V.minimality_measurable(1 / 7, 7)
    assert not V.minimality_measurable(0.4, 2)


def _circuit(scores_by_group):
    groups, scores = {}, {}
    for g in GROUPS:
        s = scores_by_group.get(g, [[0.0, 0.0], [0.0, 0.0]])
        scores[g] = s
        groups[g] = [(0, 0), (1, 1)]
    return Circuit("m", groups, scores=scores)


def test_groups_found_needs_a_head_that_lowers_p():
    c = _circuit({"value_fetcher": [[-0.2, 0.0], [0.0, 0.3]], "position_detector": [[0.1, -5.0], [0.0, 0.0]]})
    # the Detectors' negative score belongs to (0, 1), a head outside the group
    assert V.groups_found(c) == ["value_fetcher"]
    assert V.groups_found(_circuit({g: [[-1.0, 0.0], [0.0, 0.0]] for g in GROUPS})) == list(GROUPS)


@pytest.mark.parametrize("found,necessary,beyond,want", [
    (4, True, True, "holds"), (4, False, True, "partly"), (2, True, False, "partly"), (1, False, True, "partly"),
    (0, False, True, "does not hold"), (3, False, False, "does not hold"), (4, False, False, "does not hold"),
])
def test_circuit_claim(found, necessary, beyond, want):
    assert V.circuit_claim(found, necessary, beyond) == want


def test_exceeds_needs_disjoint_intervals_to_hold():
    ref = {"value": 0.66, "low": 0.62, "high": 0.70}
    assert V.exceeds({"value": 0.76, "low": 0.71, "high": 0.80}, ref) == "holds"
    assert V.exceeds({"value": 0.72, "low": 0.68, "high": 0.76}, ref) == "partly"
    assert V.exceeds({"value": 0.60, "low": 0.55, "high": 0.65}, ref) == "does not hold"
