"""The ground-truth chapter's pieces (issue 29): the planted build (cached by its hash, its ground-truth
file read back by the scoring side, the trainer's stream recorded for the overlap audit, the circuit
frozen in the new-route fine-tune), the audit itself, the scoring tables on hand-made circuits, and
verdicts that refuse to score a method on a planted model that does not have the mechanism."""

from __future__ import annotations

import math

import pytest
import torch

from entity_tracking import task as D
from entity_tracking.config import GroundTruthSpec, PlantedFinetuneSpec
from entity_tracking.io import ResultsPaths
from entity_tracking.methods import ground_truth as G
from entity_tracking.methods import verdicts as V
from entity_tracking.methods.planting import GroundTruth
from entity_tracking.model.tokenizer import build_word_tokenizer
from entity_tracking.organism import plant as P
from entity_tracking.organism.planted import ensure_planted, planted_hash, read_stream
from entity_tracking.task.vocab import LABELS, OBJECTS

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = GroundTruthSpec(steps_scale=0.001, enhance=PlantedFinetuneSpec(group="position_transmitter", scale=0.5, steps=2),
                       route=PlantedFinetuneSpec(group="value_fetcher", scale=0.3, heads=[(3, 2), (3, 3)], steps=2))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    paths = ResultsPaths(tmp_path_factory.mktemp("results"))
    return paths, ensure_planted(TINY, paths, progress=False)


def test_the_build_writes_a_ground_truth_the_scoring_side_reads(built):
    _, models = built
    truth = GroundTruth.load(models.base)
    assert truth.heads == {"position_detector": [(1, 0), (1, 1)], "position_transmitter": [(2, 0), (2, 1)],
                           "value_fetcher": [(3, 0), (3, 1)]}
    assert truth.positions == {"position_detector": "query_label", "position_transmitter": "last",
                               "value_fetcher": "last"}
    assert truth.meta["num_boxes"] == 7 and truth.meta["scaffold"]["position_code"] == [[0, 0]]
    route = GroundTruth.load(models.route).meta["finetune"]
    assert route["kind"] == "route" and route["trained_heads"] == [[3, 2], [3, 3]]
    assert GroundTruth.load(models.enhance).meta["finetune"]["trained_heads"] == [[2, 0], [2, 1]]


def test_a_build_is_reused_while_its_hash_matches_and_a_new_recipe_builds_anew(built, tmp_path):
    paths, models = built
    stamp = (models.base / "model.safetensors").stat().st_mtime_ns
    assert ensure_planted(TINY, paths, progress=False) == models
    assert (models.base / "model.safetensors").stat().st_mtime_ns == stamp
    other = TINY.model_copy(update={"seed": 1})
    assert planted_hash(other) != planted_hash(TINY)
    assert planted_hash(TINY, "enhance") != planted_hash(TINY.model_copy(update={"enhance": TINY.enhance.model_copy(update={"scale": 0.4})}), "enhance")
    assert planted_hash(TINY, "route") == planted_hash(TINY.model_copy(update={"enhance": TINY.enhance.model_copy(update={"scale": 0.4})}), "route")


def test_the_new_route_changes_no_circuit_head_and_the_degraded_base_only_its_value_rows(built):
    from transformers import AutoModelForCausalLM

    _, models = built
    planted, degraded, tuned = (AutoModelForCausalLM.from_pretrained(d) for d in (models.base, models.route_base, models.route))
    dh = 64 // 4
    sd_p, sd_d, sd_t = planted.state_dict(), degraded.state_dict(), tuned.state_dict()
    changed_by_degrading = {k for k in sd_p if not torch.equal(sd_p[k], sd_d[k])}
    assert changed_by_degrading == {"model.layers.3.self_attn.v_proj.weight"}
    v = sd_d["model.layers.3.self_attn.v_proj.weight"]
    assert torch.allclose(v[: 2 * dh], 0.3 * sd_p["model.layers.3.self_attn.v_proj.weight"][: 2 * dh])
    changed = {k for k in sd_d if not torch.equal(sd_d[k], sd_t[k])}
    assert changed and all(k.startswith("model.layers.3.self_attn.") for k in changed)
    for k in changed:  # only the rows of heads 3.2 and 3.3 (query, key, value): the circuit's 3.0 and 3.1 frozen
        assert torch.equal(sd_d[k][: 2 * dh], sd_t[k][: 2 * dh]), k


def test_a_new_route_inside_the_circuit_is_refused(tmp_path):
    bad = TINY.model_copy(update={"route": TINY.route.model_copy(update={"heads": [(3, 1), (3, 2)]})})
    paths = ResultsPaths(tmp_path)
    with pytest.raises(ValueError, match=r"route.heads \[\(3, 1\)\] are circuit heads"):
        ensure_planted(bad, paths, progress=False)


def test_the_stream_holds_every_context_the_trainer_drew_and_the_audit_finds_them(built):
    _, models = built
    stream, tuned = read_stream(models.base), read_stream(models.route)
    assert stream and stream < tuned  # the fine-tune's stream is the base's and its own
    tok = build_word_tokenizer()
    lay, template = P.layout(7, tok)
    obj = torch.tensor(tok.convert_tokens_to_ids(list(OBJECTS)))
    lab = torch.tensor(tok.convert_tokens_to_ids(list(LABELS)))
    # the 7-box stage's first batch (each stage restarts the trainer's seeded generator): every context in it
    g = torch.Generator().manual_seed(TINY.seed)
    pairs = P.sample_pairs(g, lay, template, obj, lab, P.PLANTED.batch_size)
    keys = P.context_keys(pairs.base_ids, lay)
    assert set(keys) <= stream
    book = D.make_eval_prompts(tok, 14, num_boxes=7, seed=0)
    audit = G.overlap_audit(stream | set(G.book_context_keys(tok, book[:7])), {"book": G.book_context_keys(tok, book)})
    assert audit == [{"prompts": "book", "n": 14, "contexts": 2, "in_stream": 1}]


def test_book_prompts_and_trainer_prompts_have_the_same_keys():
    tok = build_word_tokenizer()
    lay, _ = P.layout(7, tok)
    recs = D.make_desiderata(tok, "positional", 4, num_boxes=7, seed=1)
    ids = P.pairs_from_records(tok, recs, lay).base_ids
    assert G.book_context_keys(tok, [r["base"] for r in recs]) == P.context_keys(ids, lay)


TRUTH = GroundTruth({"position_detector": [(1, 0), (1, 1)], "position_transmitter": [(2, 0), (2, 1)],
                     "value_fetcher": [(3, 0), (3, 1)]},
                    {"position_detector": "query_label", "position_transmitter": "last", "value_fetcher": "last"},
                    n_layers=4, n_heads=4)


def test_recovery_table_scores_a_hand_made_circuit_beside_random_circuits():
    found = {"position_detector": [(1, 0), (1, 1)], "position_transmitter": [(2, 0), (0, 1)],
             "value_fetcher": [(3, 0), (3, 1), (3, 2), (2, 0)], "structure_reader": [(0, 2)]}
    rows = {r["group"]: r for r in G.recovery_table(TRUTH, found, n_random=2000, seed=0)}
    assert (rows["position_detector"]["precision"], rows["position_detector"]["recall"]) == (1.0, 1.0)
    assert (rows["position_transmitter"]["precision"], rows["position_transmitter"]["recall"]) == (0.5, 0.5)
    assert (rows["value_fetcher"]["precision"], rows["value_fetcher"]["recall"]) == (0.5, 1.0)
    assert (rows["circuit"]["hits"], rows["circuit"]["found"]) == (5, 8)  # 2.1 missed; 2.0 counted once
    # two random heads of 16 hit a given pair of planted heads 2/16 of the time on average
    assert rows["position_detector"]["random_precision_mean"] == pytest.approx(2 / 16, abs=0.02)
    assert rows["value_fetcher"]["random_recall_mean"] == pytest.approx(4 / 16, abs=0.02)


def test_dcm_recovery_scores_each_desideratum_against_the_heads_planted_at_its_position():
    positions = {"position_detector": "query_label", "value_fetcher": "last"}
    selected = {("position_detector", "positional"): [(1, 0), (1, 1)], ("position_detector", "object_value"): [(0, 3)],
                ("value_fetcher", "positional"): [(2, 0)], ("value_fetcher", "object_value"): [(3, 0), (2, 1)]}
    rows = {(r["position"], r["desideratum"]): r for r in G.dcm_recovery(TRUTH, selected, positions, n_random=200)}
    assert rows[("query_label", "positional")]["recall"] == 1.0 and rows[("query_label", "positional")]["precision"] == 1.0
    assert rows[("query_label", "object_value")]["planted"] == [] and rows[("query_label", "object_value")]["hits"] == 0
    assert (rows[("last", "positional")]["precision"], rows[("last", "positional")]["recall"]) == (1.0, 0.5)
    assert (rows[("last", "object_value")]["precision"], rows[("last", "object_value")]["recall"]) == (0.5, 0.5)
    v = V.dcm_recovery_verdict(list(rows.values()))
    assert v.holds == "partly" and v.claim == V.GROUND_TRUTH_CLAIM and v.statement.startswith("Ours:")


def _est(v, lo, hi):
    return {"value": v, "low": lo, "high": hi}


def _checks(clean=0.95, iia=0.9):
    return {"clean": _est(clean, clean - 0.02, clean + 0.02), "by_box": [0.9] * 7, "context_kept": _est(1.0, 0.98, 1.02),
            "interchange": {g: _est(iia, iia - 0.05, iia + 0.03) for g in TRUTH.heads},
            "outside_kept": _est(0.99, 0.97, 1.0)}


def test_the_planted_verdict_applies_each_threshold_of_the_issue():
    assert V.planted_verdict(_checks()).holds == "holds"
    assert V.planted_verdict(_checks(clean=0.8)).holds == "does not hold"
    assert V.planted_verdict(_checks(iia=0.7)).holds == "does not hold"
    low_box = dict(_checks(), by_box=[0.9] * 6 + [0.5])
    assert V.planted_verdict(low_box).holds == "does not hold"


def test_no_method_is_scored_on_a_planted_model_without_the_mechanism():
    pp = V.path_patching_recovery_verdict([
        {"group": g, "recall": 1.0, "precision": 1.0, "random_precision_q95": 0.5, "random_precision_mean": 0.1}
        for g in TRUTH.heads] + [{"group": "circuit", "recall": 1.0, "hits": 6, "planted": 6, "found": 6, "precision": 1.0,
                                  "random_precision_mean": 0.4, "random_precision_q95": 0.6, "random_recall_q95": 0.5}])
    assert pp.holds == "holds"
    gains = {"(a)": V.planted_gain_verdict("(a)", _est(0.4, 0.3, 0.5), "a"),
             "(b)": V.planted_gain_verdict("(b)", _est(0.0, -0.01, 0.01), "b")}
    cm = V.cmap_recovery_verdicts({"group": _est(0.95, 0.9, 1.0), "circuit": _est(1.0, 0.95, 1.0)},
                                  {"circuit": _est(0.0, 0.0, 0.0), "new": _est(1.0, 1.0, 1.0)})
    assert [v.holds for rows in cm.values() for v in rows] == ["holds", "holds"]
    good = V.ground_truth_verdicts(V.planted_verdict(_checks()), gains, [pp], cm)
    assert [v.holds for v in good] == ["holds", "holds", "does not hold", "holds", "holds", "not testable"]
    assert "no gain" in good[-1].ours
    bad = V.ground_truth_verdicts(V.planted_verdict(_checks(clean=0.1)), gains, [pp], cm)
    assert [v.holds for v in bad[3:]] == ["not testable"] * 3
    assert all("does not implement" in v.ours for v in bad[3:])


def test_false_finds_in_a_group_nothing_was_planted_in_cost_the_holds():
    rows = [{"group": g, "recall": 1.0, "precision": 1.0, "random_precision_q95": 0.5, "random_precision_mean": 0.1}
            for g in TRUTH.heads]
    padded = {"group": "circuit", "recall": 1.0, "hits": 6, "planted": 6, "found": 14, "precision": 6 / 14,
              "random_precision_mean": 0.4, "random_precision_q95": 0.6, "random_recall_q95": 0.9}
    assert V.path_patching_recovery_verdict(rows + [padded]).holds == "partly"
    chance = dict(padded, recall=0.8, random_recall_q95=0.9)
    assert V.path_patching_recovery_verdict([dict(r, recall=0.5) for r in rows] + [chance]).holds == "does not hold"


def test_cmap_verdict_b_reads_the_truth_both_ways():
    yes = V.cmap_recovery_verdicts({"group": _est(0.9, 0.85, 0.95), "circuit": _est(0.9, 0.8, 1.0)},
                                   {"circuit": _est(0.7, 0.6, 0.8), "new": _est(0.2, 0.1, 0.3)})["(b)"][0]
    assert yes.holds == "does not hold"  # CMAP claims the base circuit carries a gain it does not
    blind = V.cmap_recovery_verdicts({"group": _est(0.9, 0.85, 0.95), "circuit": _est(0.9, 0.8, 1.0)},
                                     {"circuit": _est(0.0, 0.0, 0.0), "new": _est(0.0, 0.0, 0.0)})["(b)"][0]
    assert blind.holds == "partly"  # a patch that moves nothing recovers none from the circuit either
    assert math.isnan(G.share_of([{"patched": "x", "share": float("nan"), "share_low": 0, "share_high": 0}], "x")["value"])
    with pytest.raises(KeyError, match="no CMAP row patched 'y'"):
        G.share_of([{"patched": "x", "share": 0, "share_low": 0, "share_high": 0}], "y")


def test_build_all_builds_the_planted_models_beside_the_organisms_and_reuses_them(built):
    from entity_tracking.organism.build import PLANTED, build_all
    from entity_tracking.organism.planted import is_planted

    paths, _ = built
    assert is_planted(TINY, paths)
    assert build_all([], paths, progress=False, planted=TINY) == {PLANTED: {"seconds": 0.0, "cached": True}}
    other = TINY.model_copy(update={"route": TINY.route.model_copy(update={"steps": 1})})
    assert not is_planted(other, paths)
    out = build_all([], paths, progress=False, planted=other)
    assert out[PLANTED]["cached"] is False and is_planted(other, paths)


def test_input_cmap_of_fine_tune_a_is_read_on_the_fetchers_query():
    def row(site, v):
        return {"kind": "input", "sites": site, "group": "value_fetcher", "share": v, "share_low": v - 0.05,
                "share_high": v + 0.05}
    a, b = {"group": _est(1.0, 1.0, 1.0), "circuit": _est(1.0, 1.0, 1.0)}, {"circuit": _est(0, 0, 0), "new": _est(1, 1, 1)}
    rows = V.cmap_recovery_verdicts(a, b, enhance_rows=[row("q", 1.0), row("k", 0.0), row("v", 0.0)])["(a)"]
    assert len(rows) == 2 and "query" in rows[1].statement and rows[1].holds == "holds"
    late = V.cmap_recovery_verdicts(a, b, enhance_rows=[row("q", 0.1), row("k", 0.9), row("v", 0.0)])
    assert late["(a)"][1].holds == "does not hold" and len(late["(b)"]) == 1
    assert [len(r) for r in V.cmap_recovery_verdicts(a, b).values()] == [1, 1]
    sets = G.input_sets(TRUTH)
    assert {k: dict(v) for k, v in sets.items()} == {"position_transmitter (whole group)": {"last": [(2, 0), (2, 1)]},
                                                     "value_fetcher (whole group)": {"last": [(3, 0), (3, 1)]}}


def test_the_findings_are_sentences_made_of_the_numbers():
    def out(group, share):
        return {"kind": "output", "group": group, "share": share}
    rows = {"(a)": [out("position_transmitter", 1.0), out("value_fetcher", 0.95), out("position_detector", 0.0)],
            "(b)": [out("value_fetcher", 0.0), {"kind": "model", "group": "", "share": 1.0}]}
    text = G.cmap_finding(TRUTH, rows, {"(a)": {"trained_heads": [[2, 0], [2, 1]]}, "(b)": {"trained_heads": [[3, 2]]}})
    assert "retrained the position transmitters), output CMAP recovers at least 0.8 of the gain from the " \
           "position transmitters, value fetchers" in text
    assert "(b) (its fine-tuning retrained no planted head), output CMAP recovers at least 0.8 of the gain from no planted group" in text
    found = {"position_detector": [(1, 0), (1, 1)], "position_transmitter": [(2, 0), (2, 1), (0, 3)], "value_fetcher": [(3, 0), (3, 1)]}
    assert "finds every planted head in its own group, and 1 head(s) that were not planted" in \
        G.recovery_finding({"r": G.recovery_table(TRUTH, found, n_random=10)})
    exact = {g: hs for g, hs in TRUTH.heads.items()}
    assert G.recovery_finding({"r": G.recovery_table(TRUTH, exact, n_random=10)}).endswith("and nothing else.")
    dcm = G.dcm_recovery(TRUTH, {("value_fetcher", "object_value"): [(3, 0), (2, 0)]}, {"value_fetcher": "last"}, n_random=10)
    assert G.dcm_finding(dcm) == "DCM, given every head: for `object_value` at the last it selects 3.0 2.0 (planted 3.0 3.1; " \
                                 "also 2.0; missed 3.1)."
