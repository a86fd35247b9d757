"""On the real default organism (slow: trains it, or reuses the default profile's cached build):
the fast path-patching kernel gives the naive oracle's scores there too, and the Value Fetchers
that path patching finds are necessary, far more than as many random heads."""

from __future__ import annotations

from pathlib import Path

import pytest

from entity_tracking import task as D
from entity_tracking.methods import verdicts as V
from entity_tracking.methods.ablation import compute_means, necessity
from entity_tracking.config import find_repo_root, load_profile
from entity_tracking.io import ResultsPaths
from entity_tracking.load import load_model
from entity_tracking.methods.path_patching import METRICS, STEPS, PathPatcher, metric_named, discover_circuit, step_scores, top_heads

REPO = find_repo_root(Path(__file__).parent)


def _organism():
    prof = load_profile("default", REPO)
    paths = ResultsPaths.for_profile("default", REPO)  # the organism is cached there once built
    return prof, load_model(prof.base_model, paths, verbose=False)


@pytest.mark.slow
@pytest.mark.parametrize("metric", METRICS)
def test_fast_equals_naive_on_the_organism(metric):
    """All four steps, each with receivers from the previous step's fast scores (the layer-1
    Value Fetchers and the others), within 1e-4."""
    _, lm = _organism()
    pairs = D.encode_pairs(lm.tokenizer, D.make_path_patching_pairs(lm.tokenizer, 24, num_boxes=7, seed=4))
    pp = PathPatcher(lm, pairs["base"], pairs["source"], pairs["target"], metric=METRICS[metric], progress=False, verbose=False)
    fast = {}
    for g, s in STEPS.items():
        # receivers: the previous step's top heads, or the top Value Fetchers where it has none
        recv = top_heads(fast[s.receivers_from], 4) if s.receivers_from else []
        recv = recv or ([(1, 0), (1, 5)] if s.receiver_site else [])
        fast[g] = step_scores(lm, pp, g, recv, method="fast")
        naive = step_scores(lm, pp, g, recv, method="naive")
        assert (fast[g] - naive).abs().max() < 1e-4, (g, fast[g], naive)
    assert fast["value_fetcher"].abs().max() > 1e-2 and fast["position_transmitter"].abs().max() > 1e-2


@pytest.mark.slow
def test_ablating_found_value_fetchers_costs_far_more_than_random_heads():
    """Discovery as the default profile runs it (pooled metric), on prompts of other seeds than
    the book's. "Far more" is ``drop > 2 x random drop + 0.1`` against random heads outside the
    found circuit; the drop must also exceed that of random heads drawn from the whole model,
    which in a 32-head model often include circuit heads themselves."""
    prof, lm = _organism()
    tok = lm.tokenizer
    pairs = D.encode_pairs(tok, D.make_path_patching_pairs(tok, 100, num_boxes=7, seed=1))
    circuit = discover_circuit(lm, pairs, model_name="organism", receivers_k=prof.circuit.receivers,
                               circuit_k=prof.circuit.candidates, metric=metric_named(prof.circuit.metric),
                               verbose=False, progress=False)
    assert circuit.groups["value_fetcher"], circuit.scores["value_fetcher"]
    evals = D.make_eval_prompts(tok, 300, num_boxes=7, seed=2)
    means = compute_means(lm, D.make_mean_reference_prompts(tok, 200, num_boxes=7, seed=3), progress=False)
    res = necessity(lm, evals, means, circuit, "value_fetcher", n_random=10, seed=0, progress=False)
    row = res.row()
    assert res.full.accuracy > 0.5, row
    assert V.far_more(res, "outside"), row
    assert res.drop > res.random_drop("any"), row
