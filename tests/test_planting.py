"""The IIT loss that plants the causal model in designated heads (issue 29, first pieces): its targets
are the causal model's counterfactuals, and a training step on it lowers it on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from entity_tracking import task as D
from entity_tracking.config import ModelSpec, TinySpec
from entity_tracking.load import load_model
from entity_tracking.methods import causal_model as CM
from entity_tracking.methods.planting import GroundTruth, counterfactual_targets, iit_loss, recovery, selection_recovery
from entity_tracking.model.tiny import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

HEADS = [(1, 0), (1, 3)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = build_tiny_model(TinySpec(n_layers=2, n_heads=4, d_model=64, d_mlp=96, seed=7),
                         tmp_path_factory.mktemp("plant") / "tiny")
    return load_model(ModelSpec(name="tiny", local_path=str(d)), verbose=False)


@pytest.fixture(scope="module")
def records(tiny):
    return D.make_desiderata(tiny.tokenizer, "positional", 16, num_boxes=3, seed=4)


def test_the_targets_are_the_causal_models_counterfactuals(tiny, records):
    for variable in ("position", "value"):  # a positional source's query label is absent from its base
        ids = counterfactual_targets(tiny.tokenizer, records, variable)
        words = [CM.interchange(r, variable) for r in records]
        assert ids.tolist() == D.word_token_ids(tiny.tokenizer, words)
    # on the positional desideratum the position variable predicts exactly the data's targets
    assert counterfactual_targets(tiny.tokenizer, records, "position").tolist() == [r["target_id"] for r in records]


def test_an_iit_step_lowers_the_iit_loss(tiny, records):
    params = list(tiny.nn.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-2)
    before = iit_loss(tiny, records, HEADS, "last", "value")
    assert before.requires_grad and torch.isfinite(before)
    for _ in range(5):
        opt.zero_grad()
        iit_loss(tiny, records, HEADS, "last", "value").backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        opt.step()
    with torch.no_grad():
        after = iit_loss(tiny, records, HEADS, "last", "value")
    assert after < before


def test_iit_loss_names_what_is_missing(tiny, records):
    with pytest.raises(ValueError, match="no heads designated"):
        iit_loss(tiny, records, [], "last", "value")
    with pytest.raises(CM.CausalModelError, match="unknown variable"):
        iit_loss(tiny, records, HEADS, "last", "position_transmitter")
    with pytest.raises(CM.CausalModelError, match="not among the context's labels"):
        counterfactual_targets(tiny.tokenizer, records, "query_label")


def test_the_ground_truth_file_round_trips_and_refuses_a_bad_one(tmp_path):
    from entity_tracking.methods.planting import GroundTruth

    truth = GroundTruth({"position_detector": [(0, 1)], "position_transmitter": [(0, 2), (1, 1)],
                         "value_fetcher": [(1, 0), (1, 3)]},
                        {"position_detector": "query_label", "position_transmitter": "last", "value_fetcher": "last"},
                        n_layers=2, n_heads=4, meta={"recipe": "test"})
    path = truth.save(tmp_path)
    assert path.name == "ground_truth.json"
    assert GroundTruth.load(tmp_path) == truth
    assert truth.variable("position_transmitter") == "position" and truth.variable("value_fetcher") == "value"
    assert len(truth.circuit()) + len(truth.outside()) == 8 and not set(truth.circuit()) & set(truth.outside())
    with pytest.raises(ValueError, match="planted in both"):
        GroundTruth({"value_fetcher": [(1, 0)], "position_transmitter": [(1, 0)]},
                    {"value_fetcher": "last", "position_transmitter": "last"}, n_layers=2, n_heads=4)
    with pytest.raises(ValueError, match="outside 2 layers"):
        GroundTruth({"value_fetcher": [(2, 0)]}, {"value_fetcher": "last"}, n_layers=2, n_heads=4)
    with pytest.raises(ValueError, match="no position"):
        GroundTruth({"value_fetcher": [(1, 0)]}, {}, n_layers=2, n_heads=4)
    with pytest.raises(FileNotFoundError, match="no ground truth"):
        GroundTruth.load(tmp_path / "elsewhere")


def test_the_strict_loss_is_the_plain_loss_when_nothing_outside_matters(tiny, records):
    """Resample-ablating heads whose output is the same on both prompts changes nothing: with the
    source equal to the base, the strict loss is the model's own cross-entropy on its answers; with
    real sources it differs, and it trains like the IIT loss."""
    from entity_tracking.intervene.patching import last_logits
    from entity_tracking.methods.planting import strict_loss

    outside = [(0, h) for h in range(4)] + [(1, 1), (1, 2)]
    same = [{**r, "source": r["base"]} for r in records]
    enc = D.encode_pairs(tiny.tokenizer, same, padding_side="right")
    with torch.no_grad():
        plain = torch.nn.functional.cross_entropy(last_logits(tiny, enc["base"]).float(), enc["base"]["target"])
        assert torch.allclose(strict_loss(tiny, same, outside), plain, atol=1e-5)
        assert not torch.allclose(strict_loss(tiny, records, outside), plain, atol=1e-5)
    for p in tiny.nn.parameters():
        p.requires_grad_(True)
        p.grad = None
    loss = strict_loss(tiny, records, outside)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny.nn.parameters())
    with pytest.raises(ValueError, match="no heads outside"):
        strict_loss(tiny, records, [])


def test_recovery_scores_a_hand_made_circuit_against_the_truth():
    truth = GroundTruth({"position_detector": [(1, 0), (1, 1)], "position_transmitter": [(2, 0), (2, 1)],
                         "value_fetcher": [(3, 0), (3, 1)]},
                        {"position_detector": "query_label", "position_transmitter": "last", "value_fetcher": "last"},
                        n_layers=4, n_heads=4)
    found = {"position_detector": [(1, 0)], "position_transmitter": [(2, 0), (2, 1), (0, 3)],
             "value_fetcher": [(3, 1), (2, 2)], "structure_reader": [(1, 1)]}
    r = recovery(truth, found)
    assert (r["position_detector"].precision, r["position_detector"].recall) == (1.0, 0.5)
    assert (r["position_transmitter"].precision, r["position_transmitter"].recall) == (2 / 3, 1.0)
    assert (r["value_fetcher"].hits, r["value_fetcher"].found) == (1, 2)
    # the union: 7 heads found, 5 of them planted (1.1 counts although it was put in another group)
    assert (r["circuit"].found, r["circuit"].hits, r["circuit"].planted) == (7, 5, 6)
    empty = recovery(truth, {})
    assert math.isnan(empty["value_fetcher"].precision) and empty["value_fetcher"].recall == 0.0


def test_selection_recovery_counts_the_heads_of_one_variable():
    truth = GroundTruth({"position_detector": [(1, 0)], "position_transmitter": [(2, 0)], "value_fetcher": [(3, 0)]},
                        {"position_detector": "query_label", "position_transmitter": "last", "value_fetcher": "last"},
                        n_layers=4, n_heads=4)
    r = selection_recovery(truth, [(2, 0), (3, 0)], "position")
    assert (r.hits, r.found, r.planted) == (1, 2, 2)
    # among the last-token heads only, the detector at the query label cannot be found
    r = selection_recovery(truth, [(2, 0)], "position", among=[(2, h) for h in range(4)] + [(3, h) for h in range(4)])
    assert (r.precision, r.recall) == (1.0, 1.0)
    with pytest.raises(ValueError, match="unknown variable"):
        selection_recovery(truth, [], "colour")
