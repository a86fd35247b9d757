"""The landing page's compact answer and its scope note: one line per claim, decided by the rows
about the paper's models, and two sentences made only of numbers the build measured."""

from __future__ import annotations

from entity_tracking.book.chapter import claim_answers, claim_verdict, is_ours, scope_note
from entity_tracking.io import write_json


def _row(claim, holds, statement="The base circuit is faithful in m", ours="0.90 [0.85, 0.95]"):
    return {"claim": claim, "statement": statement, "paper": "p", "ours": ours, "holds": holds,
            "chapter": "faithfulness", "rule": "a rule", "sample": "72 contexts x 7 queries"}


def test_a_claim_holds_only_when_every_tested_row_about_the_papers_models_holds():
    assert claim_verdict([_row(1, "holds"), _row(1, "holds")]) == "holds"
    assert claim_verdict([_row(1, "holds"), _row(1, "does not hold")]) == "partly"
    assert claim_verdict([_row(1, "does not hold"), _row(1, "exceeds the model")]) == "does not hold"
    assert claim_verdict([_row(1, "not testable"), _row(1, "not run")]) == "not testable"
    assert claim_verdict([]) == "not run"
    # a claim does not hold on the rows that could be tested alone: the others leave it partly
    assert claim_verdict([_row(1, "holds"), _row(1, "not testable")]) == "partly"


def test_rows_of_ours_never_decide_a_claim_of_the_paper():
    control = _row(3, "holds", statement="Patching m-control (positive control, ours)'s circuit recovers its gain")
    extension = _row(1, "holds", statement="Ours: the paper's circuit + Object Writers is faithful in m")
    assert is_ours(control) and is_ours(extension) and not is_ours(_row(1, "holds"))
    assert claim_verdict([control, _row(3, "does not hold")]) == "does not hold"
    assert claim_verdict([control]) == "not run"


def test_the_compact_answer_has_one_line_per_claim_and_hides_rule_and_sample_one_click_away(tmp_path):
    folder = tmp_path / "prof" / "metrics" / "verdicts"
    write_json(folder / "faithfulness.json", [_row(1, "holds"), _row(1, "does not hold"),
                                              _row(1, "holds", statement="Ours: extended, in m")])
    table = claim_answers(tmp_path, "prof")
    assert list(table["claim"]) == ["Premise", "Same circuit", "Same functionality", "Better positional handling",
                                    "Methods against ground truth (ours)"]
    same = table.set_index("claim").loc["Same circuit"]
    assert same["verdict"] == "partly"
    assert same["tests that hold"] == "1 of 2 (+1 of ours)"
    assert "<details>" in same["the tests"] and "72 contexts x 7 queries" in same["the tests"]
    assert table.set_index("claim").loc["Premise", "verdict"] == "not run"


def test_the_claim_of_ours_reads_over_its_own_rows(tmp_path):
    """The ground-truth rows (claim 4) are all ours: they decide that claim of ours, never the paper's."""
    folder = tmp_path / "prof" / "metrics" / "verdicts"
    rows = [_row(4, "holds", statement="Ours: path patching recovers the planted circuit"),
            _row(4, "does not hold", statement="Ours: DCM recovers the planted heads of each variable")]
    write_json(folder / "ground_truth.json", rows)
    table = claim_answers(tmp_path, "prof").set_index("claim")
    ours = table.loc["Methods against ground truth (ours)"]
    assert ours["verdict"] == "partly" and ours["tests that hold"] == "1 of 2"
    assert claim_verdict(rows) == "not run"  # read as the paper's claim, no row counts
    assert table.loc["Same circuit", "verdict"] == "not run"


def _est(v, lo, hi):
    return {"value": v, "low": lo, "high": hi}


def test_the_scope_note_is_made_of_the_builds_numbers(tmp_path):
    m = tmp_path / "prof" / "metrics"
    assert "has measured" in scope_note(tmp_path, "prof")  # nothing measured: nothing claimed
    write_json(m / "competence.json", {"base": {"model": "base", "accuracy": _est(0.61, 0.55, 0.67), "n": 500,
                                                "chance": 1 / 7}})
    note = scope_note(tmp_path, "prof")
    assert "0.61 [0.55, 0.67]" in note and "0.14" in note and "by content" not in note
    write_json(m / "binding.json", {"base": {"retention_context_ablated": _est(0.02, 0.0, 0.05)}})
    assert "keeps 0.02 [0.00, 0.05]" in scope_note(tmp_path, "prof")
    assert "by content" in scope_note(tmp_path, "prof")
    write_json(m / "binding.json", {"base": {"retention_context_ablated": _est(0.4, 0.3, 0.6)}})
    assert "neither reading is settled" in scope_note(tmp_path, "prof")  # an interval across the cut
    write_json(m / "binding.json", {"base": {"retention_context_ablated": _est(0.8, 0.7, 0.9)}})
    assert "as a positional binding would" in scope_note(tmp_path, "prof")
    write_json(m / "binding.json", {"base": {"retention_context_ablated": _est(0.02, 0.0, 0.05)}})
    write_json(m / "binding_gain_by_box.json", {"base": "base", "finetuned": {"ctl": {
        "control": True, "gain": _est(0.1, 0.05, 0.15), "seen": _est(0.01, -0.02, 0.04),
        "unseen": _est(0.3, 0.2, 0.4), "unseen_boxes": "5-7"}}})
    note = scope_note(tmp_path, "prof")
    assert "+0.30 [+0.20, +0.40] on the boxes 5-7" in note and "`ctl`" in note


def test_gain_by_box_splits_a_fine_tunes_gain_into_the_boxes_its_base_saw_and_those_it_did_not():
    import torch

    from entity_tracking.methods.ablation import Evaluation
    from entity_tracking.methods.binding import gain_by_box

    # 10 contexts x 4 boxes; the fine-tune gains only where box > 2 (never seen by the base)
    prompts = [{"context_id": c, "query_index": q} for c in range(10) for q in range(4)]
    box = torch.tensor([p["query_index"] + 1 for p in prompts])
    base = Evaluation("base", (box <= 2), torch.zeros(len(prompts), dtype=torch.long), clusters=torch.tensor([p["context_id"] for p in prompts]))
    ft = Evaluation("ft", torch.ones(len(prompts), dtype=torch.bool), base.predicted, clusters=base.clusters)
    g = gain_by_box(base, ft, prompts, seen_boxes=2, n_resamples=200)
    assert g["gain"]["value"] == 0.5 and g["gain"]["n_clusters"] == 10
    assert g["seen"]["value"] == 0.0 and g["unseen"]["value"] == 1.0
    assert (g["seen_boxes"], g["unseen_boxes"]) == ("1-2", "3-4")
    assert [b["value"] for b in g["by_box"]] == [0.0, 0.0, 1.0, 1.0]
    assert gain_by_box(base, ft, prompts)["unseen"] is None


def test_a_models_competence_names_the_contexts_its_interval_resampled(tmp_path):
    import torch

    from entity_tracking.methods import verdicts as V
    from entity_tracking.methods.ablation import Evaluation

    ids = torch.arange(10).repeat_interleave(7)
    ev = Evaluation("F(M)", torch.zeros(70, dtype=torch.bool), torch.zeros(70, dtype=torch.long), clusters=ids)
    comp = V.competence("m", ev, 7, n_resamples=100)
    assert comp.sample == "10 contexts x 7 queries (70 prompts, bootstrap over contexts)"
    V.write_competence(tmp_path / "c.json", {"m": comp})
    assert V.read_competence(tmp_path / "c.json")["m"] == comp
    row = V._not_testable(1, "s", "p", [comp])
    assert row.holds == V.NOT_TESTABLE and row.sample == "m: " + comp.sample
