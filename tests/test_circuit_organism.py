"""On the real default organism (slow: trains it, or reuses the default profile's cached build):
the Value Fetchers that path patching finds are necessary, far more than as many random heads."""

from __future__ import annotations

from pathlib import Path

import pytest

from entity_tracking import data as D
from entity_tracking.ablation import Ablation, compute_means, evaluate, random_circuits
from entity_tracking.circuit import Circuit
from entity_tracking.config import find_repo_root, load_profile
from entity_tracking.io import ResultsPaths
from entity_tracking.models import load_model
from entity_tracking.path_patching import discover_circuit

REPO = find_repo_root(Path(__file__).parent)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "measured on the current default organism: accuracy 0.71, Value Fetchers ablated 0.39, four random "
    "heads ablated 0.47 -- more than random, but not 'far more'; in a 32-head model any four heads matter. "
    "Strict: when a better organism makes this pass, the suite says so and the mark must go."))
def test_ablating_found_value_fetchers_costs_far_more_than_random_heads():
    prof = load_profile("default", REPO)
    paths = ResultsPaths.for_profile("default", REPO)  # the organism is cached there once built
    lm = load_model(prof.base_model, paths, verbose=False)
    tok = lm.tokenizer
    pairs = D.encode_pairs(tok, D.make_path_patching_pairs(tok, 100, num_boxes=7, seed=1))
    circuit = discover_circuit(lm, pairs, model_name="organism", receivers_k=prof.circuit.receivers,
                               circuit_k=prof.circuit.candidates, verbose=False, progress=False)
    vf = Circuit("organism", {"value_fetcher": circuit.groups["value_fetcher"]}, positions={"value_fetcher": "all"})
    evals = D.make_eval_prompts(tok, 300, num_boxes=7, seed=2)
    means = compute_means(lm, D.make_mean_reference_prompts(tok, 200, num_boxes=7, seed=3), progress=False)
    rand = random_circuits(lm.arch, vf, n=10, seed=0)
    res = evaluate(lm, evals, means, [Ablation(), Ablation(ablate=vf)] + [Ablation(ablate=r) for r in rand], progress=False)
    full, ablated = res[0].accuracy, res[1].accuracy
    random_mean = sum(r.accuracy for r in res[2:]) / len(rand)
    assert full > 0.5
    assert full - ablated > 2 * (full - random_mean) + 0.1, (full, ablated, random_mean)
