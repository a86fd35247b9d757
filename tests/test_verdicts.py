"""The verdict rules (entity_tracking.methods.verdicts): one test per rule, at and around its cut-offs."""

from __future__ import annotations

import doctest

import pytest
import torch

from entity_tracking.methods import verdicts as V
from entity_tracking.schema import GROUPS
from entity_tracking.methods.circuit import Circuit


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


# --------------------------------------------------------------------------------------------
# The chapters' verdicts on real (tiny) models: a model at chance is never tested; a planted
# necessary head is found necessary with an interval


from entity_tracking.methods import cmap, dcm
from entity_tracking import task as D
from entity_tracking.methods.ablation import compute_means, encode_for, faithfulness, mean_ablated_logits, model_accuracy, necessity
from entity_tracking.config import ModelSpec, TinySpec
from entity_tracking.model.tiny import build_tiny_model
from entity_tracking.load import load_model
from entity_tracking.methods.path_patching import discover_circuit, null_circuit

BOXES = 7
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("verdicts")
    out = {}
    for name, seed in (("base", 31), ("ft", 32)):
        d = build_tiny_model(TinySpec(family="llama", n_layers=2, n_heads=4, d_model=32, d_mlp=64, seed=seed), root / name)
        out[name] = load_model(ModelSpec(name=name, local_path=str(d)), verbose=False)
    tok = out["base"].tokenizer
    ev = D.make_eval_prompts(tok, 30, BOXES, seed=1)
    ref = D.make_mean_reference_prompts(tok, 12, BOXES, seed=1, n_tokens=ev[0]["n_tokens"])
    pp = D.make_path_patching_pairs(tok, 6, BOXES, seed=1)
    return out, ev, ref, pp


K = dict(receivers_k={"value_fetcher": 2, "position_transmitter": 2, "position_detector": 2},
         circuit_k={**{g: 2 for g in GROUPS}, "value_fetcher": 5}, progress=False, verbose=False, batch_size=8)


def test_a_model_at_chance_is_not_testable_in_every_chapter(tiny):
    models, ev, ref, pp = tiny
    comp, circuits, faith, means = {}, {}, {}, {}
    for name, lm in models.items():
        comp[name] = V.competence(name, model_accuracy(lm, ev, progress=False), BOXES, n_resamples=200)
        assert not comp[name].ok, f"an untrained model should be at chance: {comp[name]}"
        circuits[name] = discover_circuit(lm, D.encode_pairs(lm.tokenizer, pp), model_name=name, **K)
        means[name] = compute_means(lm, ref, batch_size=8, progress=False)
    base = models["base"]
    null = null_circuit(base, D.encode_pairs(base.tokenizer, pp), **K)
    nec = necessity(base, ev, means["base"], circuits["base"], n_random=3, progress=False)
    got = V.circuit_verdicts(comp["base"], circuits["base"], nec, null, {"ft": (comp["ft"], circuits["ft"])},
                             n_path_patching=len(pp), n_resamples=200)
    for name, lm in models.items():
        faith[("base", name)] = faithfulness(lm, ev, means[name], circuits["base"], n_random=2,
                                             progress=False).to_json(n_resamples=200)["summary"]
    got += V.faithfulness_verdicts(comp, faith, "base", ["ft"], n_random=2)
    sets = cmap.head_sets(circuits["ft"])
    rows = cmap.gain_recovery(base, models["ft"], D.encode_prompts(base.tokenizer, ev), sets, cmap.input_sets(sets),
                              n_bootstrap=100)
    got += V.cmap_verdicts({"ft": rows}, BOXES)
    sem = []
    for d in ("positional", "object_value"):
        pairs = D.encode_pairs(base.tokenizer, D.make_desiderata(base.tokenizer, d, 8, BOXES, seed=2), padding_side="right")
        for name, lm in models.items():
            for g in ("value_fetcher", "position_transmitter", "position_detector"):
                r = dcm.desideratum_accuracy(lm, circuits["base"].groups[g], circuits["base"].positions[g], pairs,
                                             n_resamples=3, batch_size=8)
                sem.append({"group": g, "desideratum": d, "selected_for": d, "model": name, "mean": 100 * r["mean"],
                            "std": 100 * r["std"], "n_runs": 3, "pairs": "bootstrap"})
    got += V.dcm_verdicts(comp, dcm.functionality(sem), "base", sample="3 bootstrap resamples of 8 pairs")
    assert len(got) == 2 + 3 + 1 + 2
    for v in got:
        assert v.holds == V.NOT_TESTABLE, v
        assert v.ours.startswith("not testable:") and "chance 0.14" in v.ours
        assert v.rule == V.COMPETENCE_RULE and ("prompts" in v.sample or "pairs" in v.sample)


def test_dcm_claim_about_every_model_is_not_testable_when_dcm_left_one_out():
    """The DCM chapter studies only the models that do the task: a model it left out (no pattern)
    still makes 'every model encodes the same' not testable, and the base's own claim is judged."""
    ok = V.Competence.of("base", {"value": 0.7, "low": 0.66, "high": 0.74}, BOXES, 500)
    ft_ok = V.Competence.of("ctl", {"value": 0.9, "low": 0.87, "high": 0.92}, BOXES, 500)
    gone = V.Competence.of("full", {"value": 0.0, "low": 0.0, "high": 0.0}, BOXES, 500)
    pattern = {m: {"value_fetcher": "value", "position_transmitter": "neither", "position_detector": "neither"}
               for m in ("base", "ctl")}
    every, base = V.dcm_verdicts({"base": ok, "ctl": ft_ok, "full": gone}, pattern, "base", sample="s")
    assert every.holds == V.NOT_TESTABLE and "full does not do the task" in every.ours
    assert base.holds == "partly" and base.ours.startswith("1 of 3 groups match")
    every, _ = V.dcm_verdicts({"base": ok, "ctl": ft_ok}, pattern, "base", sample="s")
    assert every.holds == "holds" and "2 model(s)" in every.ours


def test_models_to_study_leaves_out_the_models_at_chance(tmp_path):
    from entity_tracking.book.chapter import ChapterContext, left_out_note, models_to_study
    from entity_tracking.config import load_profile
    from entity_tracking.io import ResultsPaths

    profile = load_profile("ci")
    names = [m.name for m in profile.models]
    paths = ResultsPaths(tmp_path)
    ctx = ChapterContext("dcm", profile, paths, tmp_path, "cpu")
    at = {"value": 0.9, "low": 0.85, "high": 0.95}
    comps = {n: V.Competence.of(n, at if i % 2 == 0 else {"value": 0.1, "low": 0.05, "high": 0.15}, BOXES, 100)
             for i, n in enumerate(names)}
    V.write_competence(paths.metrics / "competence.json", comps)
    studied, left_out = models_to_study(ctx, "competent")
    assert studied == names[0::2] and [c.model for c in left_out] == names[1::2]
    assert all(not c.ok for c in left_out)
    assert names[1] in left_out_note(left_out) and left_out_note([]) == ""
    assert profile.study == "all" and models_to_study(ctx) == (names, [])  # the CI profile studies every model
    competent = ChapterContext("dcm", profile.model_copy(update={"study": "competent"}), paths, tmp_path, "cpu")
    assert models_to_study(competent) == (studied, left_out)
    V.write_competence(paths.metrics / "competence.json", {n: comps[n] for n in names[:-1]})
    with pytest.raises(ValueError, match=names[-1]):
        models_to_study(competent)
    with pytest.raises(ValueError, match="'competent' or 'all'"):
        models_to_study(ctx, "some")


def test_faithfulness_rows_of_a_fine_tune_measured_alone_are_not_testable():
    """The faithfulness chapter measures a model at chance alone (F(M)): its two rows say why."""
    est = lambda v, lo, hi: {"value": v, "low": lo, "high": hi, "n": 500}
    base = {"full_accuracy": est(0.7, 0.66, 0.74), "circuit_accuracy": est(0.01, 0.0, 0.02),
            "faithfulness": est(0.01, 0.0, 0.03)}
    alone = {"full_accuracy": est(0.0, 0.0, 0.0)}
    comp = {n: V.Competence.of(n, s["full_accuracy"], BOXES) for n, s in (("base", base), ("full", alone))}
    got = V.faithfulness_verdicts(comp, {("base", "base"): base, ("base", "full"): alone}, "base", ["full"], n_random=3)
    assert [v.holds for v in got] == ["does not hold", V.NOT_TESTABLE, V.NOT_TESTABLE]
    assert all("full does not do the task" in v.ours and v.sample.startswith("500 prompts") for v in got[1:])


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny model whose answer is written by head 1.2: its o_proj columns are scaled up 30x and
    every other head's down 10x."""
    d = build_tiny_model(TinySpec(family="llama", n_layers=2, n_heads=4, d_model=32, d_mlp=64, seed=33),
                         tmp_path_factory.mktemp("planted") / "m")
    lm = load_model(ModelSpec(name="planted", local_path=str(d)), verbose=False)
    dh = lm.arch.d_head
    with torch.no_grad():
        for layer in range(lm.arch.n_layers):
            o = lm.arch.attention_projections(lm, layer)[3]
            for h in range(lm.arch.n_heads):
                o.weight[:, h * dh:(h + 1) * dh] *= 30.0 if (layer, h) == (1, 2) else 0.1
    return lm


@pytest.mark.parametrize("n_prompts,n_random", [(30, 10), (20, 3)])
def test_a_planted_necessary_head_holds_with_an_interval(tiny, planted, n_prompts, n_random):
    _, ev, ref, _ = tiny
    lm = planted
    batch = encode_for(lm, ev[:n_prompts])
    batch["target"] = mean_ablated_logits(lm, batch, None).argmax(-1)  # what the planted model answers
    means = compute_means(lm, ref, batch_size=8, progress=False)
    circuit = Circuit("planted", {"value_fetcher": [(1, 2)]})
    res = necessity(lm, batch, means, circuit, n_random=n_random, progress=False)
    grade, eff = V.necessity_grade(res, n_resamples=500)
    assert eff.n == n_prompts and eff.low == eff.low and eff.high == eff.high and eff.low <= eff.value <= eff.high
    if n_random == 10:
        assert grade == "holds" and eff.low > 0, (grade, eff, res.row())
        # the control: a head whose output was scaled down is not necessary
        other = necessity(lm, batch, means, Circuit("planted", {"value_fetcher": [(0, 1)]}), n_random=n_random,
                          progress=False)
        assert V.necessity_grade(other, n_resamples=500)[0] == "does not hold", other.row()
    comp = V.competence("planted", model_accuracy(lm, batch, progress=False), BOXES)
    assert comp.ok  # self-labelled: it does "the task" by construction
    (v,) = V.circuit_verdicts(comp, circuit, res, None, {}, n_path_patching=0, n_resamples=500)
    assert "effect" in v.ours and f"{n_random} random draws" in v.sample and f"{n_prompts} prompts" in v.sample


def test_premise_needs_one_model_that_does_the_task():
    at_chance = V.Competence("base", {"value": 0.1, "low": 0.05, "high": 0.15}, 100, 1 / 7)
    able = V.Competence("ft", {"value": 0.6, "low": 0.5, "high": 0.7}, 100, 1 / 7)
    gain = {"value": 0.5, "low": 0.4, "high": 0.6}
    (v,) = V.premise_verdicts(at_chance, {"ft": (at_chance, {"value": 0.0, "low": -0.05, "high": 0.05})})
    assert v.holds == V.NOT_TESTABLE and "base does not do the task" in v.ours
    (v,) = V.premise_verdicts(at_chance, {"ft": (able, gain)})
    assert v.holds == "holds" and v.sample == "100 prompts (paired bootstrap)"
    (v,) = V.premise_verdicts(able, {"ft": (able, {"value": 0.01, "low": -0.02, "high": 0.04})})
    assert v.holds == "does not hold"


def test_controls_are_marked_and_kept_out_of_the_paper_claims():
    able = V.Competence("m", {"value": 0.6, "low": 0.5, "high": 0.7}, 100, 1 / 7)
    scores = {g: [[-0.1] * 4, [-0.1] * 4] for g in GROUPS}  # every head lowers p(correct): all of them count
    base = Circuit("base", {"value_fetcher": [(1, 0), (1, 1)], "position_transmitter": [(0, 1)]}, scores=scores)
    same = Circuit("ft", dict(base.groups), scores=scores)
    new = Circuit("ctl", {"value_fetcher": [(1, 3)], "position_transmitter": [(0, 2)]}, scores=scores)
    rows = V.circuit_verdicts(able, base, None, None, {"ft": (able, same), "ctl": (able, new)}, n_path_patching=0,
                              controls=["ctl"])
    paper_row, control_row = rows[1], rows[2]
    assert paper_row.statement.startswith("ft's circuit") and paper_row.holds == "holds"  # a row of its own
    assert "mean share per group 1.00" in paper_row.ours
    assert "ctl (positive control, ours)" in control_row.statement and control_row.paper == V.CONTROL_PAPER
    assert control_row.holds == "does not hold"
    (p,) = V.premise_verdicts(able, {"ctl": (able, {"value": 0.2, "low": 0.1, "high": 0.3})}, controls=["ctl"])
    assert "entity tracking (ctl (positive control, ours))" in p.statement and p.paper == V.CONTROL_PAPER
    (a,) = V.premise_verdicts(able, {"ft": (able, {"value": 0.2, "low": 0.1, "high": 0.3})}, controls=["ctl"])
    assert a.statement.startswith("Arithmetic fine-tuning (ft)")


@pytest.mark.parametrize("em,want", [((0.6, 0.52, 0.68), "holds"), ((0.55, 0.45, 0.65), "partly"),
                                     ((0.03, 0.01, 0.05), "does not hold")])
def test_arithmetic_is_learned_at_its_threshold(em, want):
    (v,) = V.arithmetic_verdicts({"ft": dict(zip(("value", "low", "high"), em))}, samples={"ft": "3 seeds"})
    assert v.holds == want and v.sample == "3 seeds"


def test_an_exact_match_just_under_the_threshold_does_not_print_as_reaching_it():
    """Three seeds averaging 0.495 do not hold, and the row must not read "exact match 0.50"."""
    (v,) = V.arithmetic_verdicts({"ft": {"value": 0.495, "low": 0.398, "high": 0.597}}, samples={})
    assert v.holds == "does not hold" and "0.495" in v.ours and "0.50 " not in v.ours


def test_finetuning_verdicts_judge_seeded_finetunes_on_their_last_checkpoint():
    able = V.Competence("m", {"value": 0.6, "low": 0.5, "high": 0.7}, 4, 1 / 7)
    last = {"step": 800, "seeds": 3, "n_prompts": 4, "n_problems": 200, "gain": -0.3, "gain_low": -0.4,
            "gain_high": -0.2, "arithmetic": 0.6, "arithmetic_low": 0.55, "arithmetic_high": 0.65}
    correct = {"base": torch.tensor([1., 1., 0., 0.]), "ft": torch.tensor([0., 0., 0., 0.]),
               "ctl": torch.tensor([1., 1., 1., 1.])}
    got = V.finetuning_verdicts({n: able for n in correct}, "base", correct, {"ft": [{"step": 0}, last]},
                                controls=["ctl"], n_resamples=200)
    learned, ft, ctl = got
    assert learned.holds == "holds" and "3 seeds x 200 held-out problems" == learned.sample
    assert ft.holds == "does not hold" and "3 seeds x 4 prompts at step 800" in ft.sample
    assert "positive control" in ctl.statement and ctl.ours.startswith("+0.500")


def _extended(full, paper, extended, gain, n=100):
    est = lambda v: dict(zip(("value", "low", "high"), v))  # noqa: E731
    return {"n_examples": n, "n_random": 10, "extension_groups": ["object_writer"],
            "group_sizes": {"paper": 21, "extended": 25, "label_kept": 53, "random_paper": 21, "random_extended": 25},
            "summary": {"full_accuracy": est(full), "paper_faithfulness": est(paper),
                        "extended_faithfulness": est(extended), "gain": est(gain),
                        "random_extended_faithfulness": est((0.04, 0.02, 0.06))}}


def test_extended_circuit_rows_are_ours_and_graded_on_intervals():
    got = V.extended_circuit_verdicts({
        "base": _extended((0.66, 0.62, 0.70), (0.45, 0.39, 0.51), (1.15, 1.10, 1.21), (0.70, 0.62, 0.78)),
        "ctl": _extended((0.8, 0.75, 0.85), (0.5, 0.4, 0.6), (0.7, 0.6, 0.85), (0.02, -0.03, 0.07)),
        "chance": _extended((0.15, 0.10, 0.20), (1.0, 0.5, 1.5), (1.0, 0.5, 1.5), (0.0, -0.1, 0.1)),
    }, 7, controls=["ctl"])
    assert len(got) == 6
    assert all(v.statement.startswith("Ours: ") and v.paper == V.EXTENSION_PAPER and v.claim == 1 for v in got)
    faithful, gain, ctl_faithful, ctl_gain, untestable, _ = got
    assert "paper's circuit + Object Writers is faithful in base" in faithful.statement
    # 1.15 [1.10, 1.21] lies above the model: a finding of its own, not "holds" (issue 28)
    assert faithful.holds == V.EXCEEDS_MODEL and faithful.ours.startswith("1.15 [1.10, 1.21] (above the model")
    assert "with 25 heads" in faithful.ours
    assert "the paper's circuit 0.45 [0.39, 0.51] with 21" in faithful.ours and "0.04 [0.02, 0.06]" in faithful.ours
    assert gain.holds == "holds" and gain.ours == "faithfulness +0.70 [+0.62, +0.78]"
    assert "ctl (positive control, ours)" in ctl_faithful.statement
    assert ctl_faithful.holds == "partly" and ctl_gain.holds == "partly"
    assert untestable.holds == V.NOT_TESTABLE and "chance 0.14" in untestable.ours
    assert faithful.sample == "100 prompts (paired bootstrap); 10 random circuits of each size"
    assert V.extended_circuit_verdicts({"m": _extended((0.6, 0.5, 0.7), (0.5, 0.4, 0.6), (0.3, 0.2, 0.45),
                                                       (-0.2, -0.3, -0.1))}, 7)[1].holds == "does not hold"


def test_a_profile_without_finetunes_gets_a_not_run_row_for_cmap_and_the_premise():
    able = V.Competence("base", {"value": 0.9, "low": 0.85, "high": 0.95}, 100, 0.25)
    for got, claim in ((V.cmap_verdicts({}, 4), 3),
                       (V.finetuning_verdicts({"base": able}, "base", {"base": torch.ones(4)}, {}), 0)):
        assert [(v.claim, v.holds, v.ours) for v in got] == [(claim, "not run", "no fine-tuned model in this profile")]


def test_confidently_wrong_share_counts_prompts_below_the_threshold():
    cut = V.CONFIDENTLY_WRONG.value
    assert V.confidently_wrong_share(torch.tensor([cut / 2, cut, 0.9, 0.0])) == 0.5  # at the threshold is not below
    assert V.confidently_wrong_share([0.5, 0.6]) == 0.0


def test_beats_base_picks_each_finetunes_beats_verdict():
    able = {m: V.Competence(m, {"value": 0.6, "low": 0.5, "high": 0.7}, 100, 1 / 7) for m in ("base", "a", "b")}
    est = {"value": 0.7, "low": 0.65, "high": 0.75, "n": 100}
    faith = {("base", m): {"faithfulness": est, "circuit_accuracy": est, "full_accuracy": est} for m in able}
    claims = V.faithfulness_verdicts(able, faith, "base", ["a", "b"], n_random=2)
    beats = V.beats_base(claims, ["a", "b"])
    assert list(beats) == ["a", "b"]
    assert all(f"in {m} beats the full base model" in v.statement for m, v in beats.items())
    with pytest.raises(ValueError, match="3 verdicts for 2 fine-tunes"):
        V.beats_base(claims[:3], ["a", "b"])
