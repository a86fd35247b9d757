"""Groups that are groups (issue 28): a head counts only when it stands out from zero and from the
null; heads picked by tie-breaking are padding; the overlap of two circuits is read against the
overlap expected by chance (hypergeometric over the heads that could score at each step); selection
steps run on prompts disjoint from the evaluation prompts."""

from __future__ import annotations

import itertools

import pytest

from entity_tracking.methods import verdicts as V
from entity_tracking.methods.circuit import MINIMALITY_SPLITS, Circuit, minimality_prompts
from entity_tracking.schema import GROUPS

L, H = 4, 4  # a hand-made model of 16 heads
ABLE = V.Competence("m", {"value": 0.6, "low": 0.5, "high": 0.7}, 100, 1 / 7)


def _map(scores: dict) -> list[list[float]]:
    """A score map [L][H]: zeros except the given ``{(layer, head): score}``."""
    return [[float(scores.get((l, h), 0.0)) for h in range(H)] for l in range(L)]


def _circuit(name: str, groups: dict, scores: dict, receivers: dict | None = None, p_clean: float = 0.5) -> Circuit:
    """Groups as given; each group's score map from ``scores[g]`` (missing: all zeros)."""
    rec = receivers if receivers is not None else {"value_fetcher": [], "position_transmitter": [[3, 0]],
                                                   "position_detector": [[2, 0]], "structure_reader": [[1, 0]]}
    return Circuit(name, groups, scores={g: _map(scores.get(g, {})) for g in GROUPS},
                   meta={"receivers": rec, "n_layers": L, "n_heads": H, "mean_p_clean": p_clean})


def test_scorable_heads_sit_below_the_steps_highest_receiver():
    c = _circuit("m", {}, {}, receivers={"value_fetcher": [], "position_transmitter": [[1, 0], [3, 2]],
                                         "position_detector": [[1, 1]], "structure_reader": [[0, 3]]})
    assert c.scorable("value_fetcher") == [(l, h) for l in range(L) for h in range(H)]  # the logits: every head
    assert c.scorable("position_transmitter") == [(l, h) for l in range(3) for h in range(H)]
    assert c.scorable("position_detector") == [(0, h) for h in range(H)]
    assert c.scorable("structure_reader") == []
    # a hand-made circuit that records no receivers: every head
    assert len(Circuit("m", {}, scores={"value_fetcher": _map({})}).scorable("position_detector")) == L * H


def test_heads_stand_out_from_zero_and_from_the_null():
    groups = {"value_fetcher": [(3, 1), (2, 0), (0, 0)], "position_detector": [(0, 0), (0, 1)]}
    c = _circuit("m", groups, {"value_fetcher": {(3, 1): -0.5, (2, 0): -0.05, (0, 0): -1e-4}})
    assert V.real_heads(c)["value_fetcher"] == [(3, 1), (2, 0)]  # -1e-4 is within the floor
    assert V.padding(c)["value_fetcher"] == [(0, 0)]
    assert V.real_heads(c)["position_detector"] == [] and V.padding(c)["position_detector"] == [(0, 0), (0, 1)]
    # the null's strongest head lowers p(correct) by 0.2 x 0.25 = 0.05; ours by score x 0.5
    null = _circuit("null", {}, {"value_fetcher": {(1, 1): -0.2}}, p_clean=0.25)
    assert V.real_heads(c, null)["value_fetcher"] == [(3, 1)]  # 0.025 does not beat 0.05
    assert V.padding(c, null)["value_fetcher"] == [(2, 0), (0, 0)]
    # a group stands out exactly when it holds a head that does
    stand = V.groups_standing_out(c, null)
    assert all(stand[g]["stands_out"] == bool(V.real_heads(c, null)[g]) for g in GROUPS)


def test_hypergeometric_matches_counting():
    for n, k, d in ((6, 2, 3), (8, 3, 3), (5, 0, 2), (5, 5, 5)):
        pmf = V.hypergeometric(n, k, d)
        assert sum(pmf) == pytest.approx(1.0)
        counts = [0] * (min(k, d) + 1)
        for draw in itertools.combinations(range(n), d):
            counts[sum(1 for i in draw if i < k)] += 1
        assert pmf == pytest.approx([c / sum(counts) for c in counts])
    with pytest.raises(ValueError, match="hypergeometric"):
        V.hypergeometric(3, 4, 1)


def test_hand_made_circuits_give_the_hypergeometric_expectation():
    # Value Fetchers: every head can score (16); 4 real base heads, 4 real fine-tune heads, 2 shared
    vf_b, vf_f = [(3, 0), (3, 1), (2, 2), (1, 3)], [(3, 0), (3, 1), (0, 0), (0, 1)]
    # Position Transmitters: receivers in layer 3, so 12 heads can score; 2 real base heads, 3 drawn
    pt_b, pt_f = [(2, 0), (1, 1)], [(2, 0), (0, 2), (0, 3)]
    base = _circuit("base", {"value_fetcher": vf_b, "position_transmitter": pt_b},
                    {"value_fetcher": {h: -0.1 for h in vf_b}, "position_transmitter": {h: -0.1 for h in pt_b}})
    ft = _circuit("ft", {"value_fetcher": vf_f, "position_transmitter": pt_f},
                  {"value_fetcher": {h: -0.1 for h in vf_f}, "position_transmitter": {h: -0.1 for h in pt_f}})
    res = V.overlap_against_chance(base, ft)
    vf, pt = res["groups"]["value_fetcher"], res["groups"]["position_transmitter"]
    assert (vf["population"], vf["marked"], vf["drawn"], vf["shared"]) == (16, 4, 4, 2)
    assert vf["expected"] == pytest.approx(4 * 4 / 16)
    assert (pt["population"], pt["marked"], pt["drawn"], pt["shared"]) == (12, 2, 3, 1)
    assert pt["expected"] == pytest.approx(3 * 2 / 12)
    assert res["counted"] == ["value_fetcher", "position_transmitter"]
    assert res["share"] == pytest.approx((2 / 4 + 1 / 2) / 2)
    assert res["chance"] == pytest.approx((1 / 4 + 0.5 / 2) / 2)  # the mean of the groups' expected shares
    assert res["chance_low"] <= res["chance"] <= res["chance_high"]
    # the p-value by brute force: every pair of independent draws
    n_as_high = n_all = 0
    for d_vf in itertools.combinations(range(16), 4):
        x_vf = sum(1 for i in d_vf if i < 4)
        for d_pt in itertools.combinations(range(12), 3):
            x_pt = sum(1 for i in d_pt if i < 2)
            n_all += 1
            n_as_high += (x_vf / 4 + x_pt / 2) / 2 >= res["share"] - 1e-12
    assert res["p_value"] == pytest.approx(n_as_high / n_all)


def test_a_padded_group_contributes_nothing_to_the_overlap():
    vf = [(3, 0), (3, 1), (2, 2), (1, 3)]
    rec = {"value_fetcher": [], "position_transmitter": [[3, 0]], "position_detector": [[0, 0]],
           "structure_reader": [[0, 0]]}  # Transmitters in layer 0: the last two steps score all zeros
    first_k = [(0, 0), (0, 1), (0, 2)]  # what the paper's selection returns then: the first k heads by index
    scores = {"value_fetcher": {h: -0.1 for h in vf}, "position_transmitter": {(2, 0): -0.1}}
    groups = {"value_fetcher": vf, "position_transmitter": [(2, 0)], "position_detector": first_k, "structure_reader": first_k}
    base = _circuit("base", groups, scores, rec)
    same = _circuit("ft", groups, scores, rec)
    other_padding = _circuit("ft", {**groups, "position_detector": [(1, 1)], "structure_reader": []}, scores, rec)
    a, b = V.overlap_against_chance(base, same), V.overlap_against_chance(base, other_padding)
    assert a["counted"] == ["value_fetcher", "position_transmitter"]
    assert a["groups"]["position_detector"]["padded"] and a["groups"]["structure_reader"]["padded"]
    assert a["groups"]["position_detector"]["padding"] == 3
    for k in ("share", "chance", "chance_low", "chance_high", "p_value"):
        assert a[k] == pytest.approx(b[k]), k
    assert V.overlap_text(a).endswith("left out (padding only): Position Detector (C), Structure Reader (D)")
    # nothing but padding: nothing to find again, and the verdict does not hold
    pad = _circuit("base", {"value_fetcher": first_k, "position_detector": first_k}, {})
    res = V.overlap_against_chance(pad, pad)
    assert res["counted"] == [] and V.overlap_grade(res) == "does not hold"
    (_, row) = V.circuit_verdicts(ABLE, pad, None, None, {"ft": (ABLE, pad)}, n_path_patching=0)
    assert row.holds == "does not hold" and "nothing to find again" in row.ours


def test_identical_circuits_at_chance_do_not_hold():
    # Position Detectors whose receivers sit in layer 1: only layer 0 (4 heads) can score, and every
    # group fills it: any draw of 4 shares all 4, so a share of 1.00 is what chance gives
    whole = [(0, h) for h in range(H)]
    rec = {"value_fetcher": [], "position_transmitter": [[1, 0]], "position_detector": [[1, 0]],
           "structure_reader": [[1, 0]]}
    scores = {g: {h: -0.3 for h in whole} for g in ("position_transmitter", "position_detector", "structure_reader")}
    groups = {g: whole for g in scores}
    base, ft = _circuit("base", groups, scores, rec), _circuit("ft", groups, scores, rec)
    res = V.overlap_against_chance(base, ft)
    assert res["share"] == 1.0 and res["chance"] == 1.0 and not res["above_chance"] and res["p_value"] == 1.0
    assert V.CIRCUIT_OVERLAP(res["share"]) == "holds"  # the old rule would have said so
    assert V.overlap_grade(res) == "does not hold"
    rows = V.circuit_verdicts(ABLE, base, None, None, {"lora": (ABLE, ft), "full": (ABLE, ft), "ctl": (ABLE, ft)},
                              n_path_patching=0, controls=["ctl"])
    assert [r.statement.split("'s circuit")[0] for r in rows[1:]] == ["lora", "full", "ctl (positive control, ours)"]
    assert all(r.holds == "does not hold" for r in rows[1:])
    assert rows[3].paper == V.CONTROL_PAPER and "Goat" in rows[1].paper


def test_identical_circuits_well_above_chance_hold():
    vf = [(3, 0), (3, 1), (2, 2), (1, 3)]
    c = _circuit("base", {"value_fetcher": vf}, {"value_fetcher": {h: -0.1 for h in vf}})
    res = V.overlap_against_chance(c, c)
    assert res["above_chance"] and res["p_value"] == pytest.approx(1 / 1820)  # 1 / C(16, 4)
    assert V.overlap_grade(res) == "holds"
    different = _circuit("ft", {"value_fetcher": [(0, 0), (0, 1), (0, 2), (0, 3)]},
                         {"value_fetcher": {(0, h): -0.1 for h in range(H)}})
    assert V.overlap_grade(V.overlap_against_chance(c, different)) == "does not hold"


def test_minimality_prompts_come_from_the_pairs_for_the_selection_split():
    pairs = [{"base": {"text": f"b{i}"}, "source": {"text": f"s{i}"}} for i in range(5)]
    evaluation = [{"text": f"e{i}"} for i in range(8)]
    assert MINIMALITY_SPLITS == ("selection", "evaluation")
    assert minimality_prompts("selection", pairs, evaluation, 3) == [{"text": "b0"}, {"text": "b1"}, {"text": "b2"}]
    assert minimality_prompts("selection", pairs, evaluation, 50) == [p["base"] for p in pairs]
    assert minimality_prompts("evaluation", pairs, evaluation, 2) == evaluation[:2]
    with pytest.raises(ValueError, match="unknown minimality split"):
        minimality_prompts("train", pairs, evaluation, 2)
    with pytest.raises(ValueError, match="no prompts"):
        minimality_prompts("selection", [], evaluation, 2)


def test_the_profile_names_the_split_of_every_selection_step():
    from entity_tracking.config import CircuitSpec

    spec = CircuitSpec()
    assert spec.minimality_split == "selection"
    desc = CircuitSpec.model_fields["minimality_split"].description
    for step in ("path patching", "null", "Object Writer", "minimality", "DCM"):
        assert step in desc, step
    with pytest.raises(ValueError):
        CircuitSpec(minimality_split="train")


def test_heads_outside_scorable_score_exactly_zero_in_a_real_sweep(tmp_path, one_thread):
    """The oracle behind the chance population: in a real sweep, every head that
    :meth:`Circuit.scorable` leaves out of a step scores exactly 0 there."""
    from entity_tracking import task as D
    from entity_tracking.config import ModelSpec, TinySpec
    from entity_tracking.load import load_model
    from entity_tracking.methods.path_patching import discover_circuit
    from entity_tracking.model.tiny import build_tiny_model

    d = build_tiny_model(TinySpec(family="llama", n_layers=3, n_heads=4, d_model=32, d_mlp=64, seed=5), tmp_path / "m")
    lm = load_model(ModelSpec(name="m", local_path=str(d)), verbose=False)
    pairs = D.encode_pairs(lm.tokenizer, D.make_path_patching_pairs(lm.tokenizer, 4, 7, seed=3))
    c = discover_circuit(lm, pairs, receivers_k={"value_fetcher": 3, "position_transmitter": 2, "position_detector": 2},
                         circuit_k={g: 3 for g in GROUPS}, progress=False, verbose=False, batch_size=8)
    assert len(c.scorable("value_fetcher")) == 12 and any(len(c.scorable(g)) < 12 for g in GROUPS)
    for g in GROUPS:
        can = set(c.scorable(g))
        outside = [c.scores[g][l][h] for l in range(3) for h in range(4) if (l, h) not in can]
        assert all(x == 0.0 for x in outside), (g, outside)
        assert all(V.head_standing(c)[g][h] is False for h in c.groups[g] if h not in can)
    # minimality runs on the pairs' base prompts, none of which is an evaluation prompt
    from entity_tracking.methods.ablation import compute_means, minimality

    records = D.make_path_patching_pairs(lm.tokenizer, 4, 7, seed=3)
    ev = D.make_eval_prompts(lm.tokenizer, 14, 7, seed=3)
    chosen = minimality_prompts("selection", records, ev, 3)
    assert not {p["text"] for p in chosen} & {p["text"] for p in ev}
    ref = D.make_mean_reference_prompts(lm.tokenizer, 6, 7, seed=3, n_tokens=ev[0]["n_tokens"])
    res = minimality(lm, chosen, compute_means(lm, ref, batch_size=8, progress=False), c, progress=False, batch_size=8)
    assert res.circuit_accuracy.n == 3
