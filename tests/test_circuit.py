"""The Circuit record (entity_tracking.methods.circuit): the paper's four groups, and extension groups of ours.

A circuit without extension groups is exactly the paper's, in memory and in JSON; an extension
group is added by ``with_group``, travels with its position through a JSON round trip, and never
touches the paper's four groups.
"""

from __future__ import annotations

import pytest

from entity_tracking.schema import ALL_GROUPS, EXTENSION_GROUPS, GROUP_POSITIONS, GROUPS
from entity_tracking.methods.circuit import Circuit


def paper_circuit() -> Circuit:
    return Circuit("m", {"value_fetcher": [(2, 1), (3, 0)], "position_transmitter": [(1, 4)],
                         "structure_reader": [(0, 2)]}, scores={"value_fetcher": [[0.0]]}, meta={"kind": "test"})


def test_a_paper_circuit_holds_exactly_the_four_groups():
    c = paper_circuit()
    assert c.group_names == GROUPS
    assert set(c.positions) == set(GROUPS)
    assert list(c.to_json()["groups"]) == list(GROUPS)
    assert c.groups["position_detector"] == []


def test_with_group_adds_an_extension_group_and_leaves_the_original_alone():
    c = paper_circuit()
    e = c.with_group("object_writer", [(0, 7), [0, 2]], scores=[[-0.5]], meta={"extension": "yes"})
    assert EXTENSION_GROUPS == ("object_writer",) and ALL_GROUPS == GROUPS + EXTENSION_GROUPS
    assert e.group_names == GROUPS + ("object_writer",)
    assert e.groups["object_writer"] == [(0, 7), (0, 2)]
    assert e.positions["object_writer"] == GROUP_POSITIONS["object_writer"] == "prev_query_label"
    assert e.scores["object_writer"] == [[-0.5]] and e.meta == {"kind": "test", "extension": "yes"}
    assert {g: e.groups[g] for g in GROUPS} == c.groups and c.group_names == GROUPS  # the paper's part untouched
    assert e.n_heads == c.n_heads + 2
    assert e.groups_at("prev_query_label") == ["structure_reader", "object_writer"]
    assert e.groups_at("last") == ["value_fetcher", "position_transmitter"]
    assert e.groups_at("query_label") == []  # the Position Detectors hold no heads
    # replacing the group, at another position
    again = e.with_group("object_writer", [(1, 1)], position="query_label")
    assert again.groups["object_writer"] == [(1, 1)] and again.positions["object_writer"] == "query_label"


def test_with_group_refuses_the_paper_groups_and_unknown_names():
    c = paper_circuit()
    with pytest.raises(ValueError, match="'value_fetcher' is not an extension group"):
        c.with_group("value_fetcher", [(0, 0)])
    with pytest.raises(ValueError, match="'name_mover' is not an extension group"):
        c.with_group("name_mover", [(0, 0)])
    with pytest.raises(ValueError, match=r"unknown circuit groups \['name_mover'\]"):
        Circuit("m", {"name_mover": [(0, 0)]})


def test_json_round_trip_keeps_extension_groups_and_their_positions(tmp_path):
    e = paper_circuit().with_group("object_writer", [(0, 7)], position="prev_query_label", scores=[[1.0, -2.0]])
    back = Circuit.load(e.save(tmp_path / "m.extended.json"))
    assert back == e
    assert back.group_names == e.group_names and back.positions == e.positions
    plain = Circuit.load(paper_circuit().save(tmp_path / "m.json"))
    assert plain == paper_circuit() and plain.group_names == GROUPS


def test_without_and_overlap_carry_extension_groups():
    e = paper_circuit().with_group("object_writer", [(0, 7), (1, 1)])
    w = e.without([("object_writer", (0, 7)), ("value_fetcher", (2, 1))])
    assert w.groups["object_writer"] == [(1, 1)] and w.groups["value_fetcher"] == [(3, 0)]
    assert w.positions == e.positions
    assert set(e.overlap(w)) == set(ALL_GROUPS)
    assert e.overlap(w)["object_writer"]["shared"] == 1
    assert set(e.overlap(paper_circuit())) == set(GROUPS)  # compared only on groups both hold


def test_a_template_position_of_an_extension_group_is_not_held_without_the_group():
    e = paper_circuit().with_group("object_writer", [(0, 7)], position="query_label")
    c = Circuit("m", {g: [] for g in GROUPS}, dict(e.positions))
    assert c.group_names == GROUPS and "object_writer" not in c.positions


def test_ranked_orders_a_groups_heads_by_score_strongest_first():
    scores = [[0.0, -0.3, 0.1], [-0.9, -0.3, 0.2]]  # [layer][head]
    c = Circuit("m", {"value_fetcher": [(0, 2), (0, 1), (1, 1), (1, 0)]}, scores={"value_fetcher": scores})
    assert c.ranked("value_fetcher") == [(1, 0), (0, 1), (1, 1), (0, 2)]  # equal scores keep their order
    assert c.ranked("value_fetcher", 2) == [(1, 0), (0, 1)]
    assert c.ranked("position_detector") == []  # no heads, nothing to rank
    with pytest.raises(ValueError, match="no path-patching scores for 'value_fetcher'"):
        Circuit("m", {"value_fetcher": [(0, 0)]}).ranked("value_fetcher")
    with pytest.raises(ValueError, match="holds no group 'object_writer'"):
        c.ranked("object_writer")
