"""Intervals over contexts: every bootstrap over evaluation prompts resamples contexts.

The evaluation prompts are contexts asked ``num_boxes`` times each, so their queries are not
independent. Here: the cluster bootstrap on its own (wider than the per-prompt one when a
context's queries agree; the same when each context is asked once; a clear error on mismatched
lengths), the context ids travelling from records into :class:`Evaluation` and every result
built on it, and the paired baselines ``faithfulness_over_random`` / ``extended_over_random``
(a circuit no better than its random circuits reads ~0, with 0 inside its interval).
"""

from __future__ import annotations

import pytest
import torch

from entity_tracking.config import ModelSpec, TinySpec
from entity_tracking.intervene.stats import bootstrap
from entity_tracking.load import load_model
from entity_tracking.methods import binding
from entity_tracking.methods.ablation import (
    AblationError,
    CompletenessDraw,
    CompletenessResult,
    Evaluation,
    FaithfulnessResult,
    HeadMinimality,
    NecessityResult,
    compute_means,
    context_ids,
    encode_for,
    faithfulness,
    mean_ablated_logits,
    model_accuracy,
    shared_clusters,
)
from entity_tracking.methods.circuit import Circuit
from entity_tracking.model.tiny import build_tiny_model
from entity_tracking.task.samplers import make_eval_prompts, make_mean_reference_prompts

CONTEXTS, QUERIES = 72, 7
N = CONTEXTS * QUERIES
KW = dict(n_resamples=1000, seed=0)


def _width(est) -> float:
    return est.high - est.low


def _copies(seed: int = 0, p: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    """A dataset of 7 identical copies per context: one Bernoulli(p) outcome per context, repeated."""
    gen = torch.Generator().manual_seed(seed)
    per_context = torch.rand(CONTEXTS, generator=gen) < p
    return per_context.repeat_interleave(QUERIES), torch.arange(CONTEXTS).repeat_interleave(QUERIES)


def _ev(label: str, correct: torch.Tensor, clusters=None) -> Evaluation:
    return Evaluation(label, correct.bool(), torch.zeros(len(correct), dtype=torch.long), clusters)


def _draws(k: int, p: float, seed: int) -> list[torch.Tensor]:
    """``k`` correctness vectors over the 7-copies dataset, each context's outcome drawn per vector."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(CONTEXTS, generator=gen) < p).repeat_interleave(QUERIES) for _ in range(k)]


def _faith(circuit: torch.Tensor, randoms: list[torch.Tensor], clusters=None) -> FaithfulnessResult:
    full = torch.ones(N, dtype=torch.bool)
    return FaithfulnessResult("m", Circuit("m", {}), _ev("F(M)", full, clusters), _ev("F(C)", circuit, clusters),
                              _ev("F(empty)", torch.zeros(N, dtype=torch.bool), clusters),
                              [_ev(f"r{i}", r, clusters) for i, r in enumerate(randoms)], [])


class TestClusterBootstrap:
    def test_seven_identical_copies_per_context_widen_the_interval(self):
        correct, ctx = _copies()
        flat = bootstrap(correct[None], **KW)
        clustered = bootstrap(correct[None], clusters=ctx, **KW)
        assert clustered.value == flat.value
        assert (clustered.n, clustered.n_clusters, flat.n_clusters) == (N, CONTEXTS, 0)
        # 7 perfectly agreeing queries carry one context's information: about sqrt(7) ~ 2.6x wider
        assert _width(clustered) > 2 * _width(flat)

    def test_one_prompt_per_context_is_the_per_prompt_bootstrap(self):
        gen = torch.Generator().manual_seed(1)
        correct = torch.rand(N, generator=gen) < 0.6
        flat = bootstrap(correct[None], **KW)
        clustered = bootstrap(correct[None], clusters=torch.randperm(N, generator=gen), **KW)
        assert clustered.value == flat.value
        assert clustered.n_clusters == N
        assert abs(clustered.low - flat.low) < 0.01 and abs(clustered.high - flat.high) < 0.01

    def test_mismatched_lengths_raise(self):
        correct, ctx = _copies()
        with pytest.raises(ValueError, match="clusters"):
            bootstrap(correct[None], clusters=ctx[:-1])
        with pytest.raises(ValueError, match="context ids"):
            _ev("F(C)", correct, ctx[:-1])
        with pytest.raises(ValueError, match="different prompts"):
            shared_clusters([_ev("a", correct, ctx), _ev("b", correct, ctx.flip(0))])


class TestResultsCarryContexts:
    def test_evaluation_interval_over_contexts(self):
        correct, ctx = _copies()
        with_ctx, without = _ev("F(M)", correct, ctx).estimate(**KW), _ev("F(M)", correct).estimate(**KW)
        assert with_ctx.n_clusters == CONTEXTS and without.n_clusters == 0
        assert with_ctx.value == without.value
        assert _width(with_ctx) > 2 * _width(without)

    def test_faithfulness_summary_over_contexts(self):
        correct, ctx = _copies()
        randoms = _draws(3, 0.3, seed=5)
        with_ctx, without = _faith(correct, randoms, ctx).summary(**KW), _faith(correct, randoms).summary(**KW)
        for key in ("circuit_accuracy", "faithfulness", "random_accuracy", "faithfulness_over_random"):
            assert with_ctx[key].n_clusters == CONTEXTS and without[key].n_clusters == 0
            assert with_ctx[key].value == pytest.approx(without[key].value)
        assert _width(with_ctx["faithfulness"]) > 2 * _width(without["faithfulness"])
        assert "n_clusters" in _faith(correct, randoms, ctx).to_json(**KW)["summary"]["faithfulness"]

    def test_necessity_completeness_minimality_over_contexts(self):
        correct, ctx = _copies()
        other = _draws(1, 0.5, seed=2)[0]
        nec = NecessityResult("m", "value_fetcher", [(0, 0)], _ev("F(M)", torch.ones(N), ctx), _ev("a", correct, ctx),
                              [_ev("r", other, ctx)], [_ev("r", other, ctx)])
        assert nec.effect(**KW).n_clusters == CONTEXTS
        draw = CompletenessDraw(Circuit("K", {}), _ev("c", correct, ctx), _ev("m", other, ctx))
        comp = CompletenessResult("m", Circuit("m", {}), [draw], {"value_fetcher": draw})
        assert {e.n_clusters for e in comp.summary(**KW).values()} == {CONTEXTS}
        head = HeadMinimality("value_fetcher", (0, 0), [], _ev("b", other, ctx), _ev("a", correct, ctx), 0.01)
        assert head.estimate(**KW).n_clusters == CONTEXTS

    def test_records_without_context_ids_fall_back_to_prompts(self):
        correct, ctx = _copies()
        assert context_ids([{"context_id": 3}, {"context_id": 3}, {"context_id": 5}]).tolist() == [3, 3, 5]
        assert context_ids([{"context_id": "x"}, {"context_id": "y"}, {"context_id": "x"}]).tolist() == [0, 1, 0]
        assert context_ids([{"context_id": 3}, {"text": "mine"}]) is None
        assert context_ids({"input_ids": torch.zeros(2, 3)}) is None
        # an evaluation without context ids makes the whole paired comparison per prompt
        res = _faith(correct, _draws(2, 0.3, seed=5), ctx)
        res.ablated = _ev("F(empty)", torch.zeros(N), None)
        assert res.clusters is None and res.summary(**KW)["faithfulness"].n_clusters == 0


class TestBaselinesArePaired:
    def test_a_circuit_equal_to_its_random_circuits_is_zero_over_random(self):
        circuit, ctx = _copies()
        # random circuits as accurate as the circuit, right on other contexts (its outcomes moved by whole contexts)
        randoms = [circuit.roll(QUERIES * (i + 1)) for i in range(10)]
        est = _faith(circuit, randoms, ctx).summary(**KW)["faithfulness_over_random"]
        assert est.value == pytest.approx(0, abs=1e-6)
        assert est.low < 0 < est.high

    def test_a_circuit_drawn_like_its_random_circuits_is_near_zero_over_random(self):
        _, ctx = _copies()
        circuit, *randoms = _draws(11, 0.5, seed=3)
        est = _faith(circuit, randoms, ctx).summary(**KW)["faithfulness_over_random"]
        assert abs(est.value) < 0.2  # one draw's accuracy over 72 contexts has a standard deviation ~0.06
        assert est.low < 0 < est.high

    def test_a_better_circuit_beats_its_random_circuits(self):
        _, ctx = _copies()
        randoms = _draws(10, 0.3, seed=3)
        circuit = _draws(1, 0.9, seed=4)[0]
        s = _faith(circuit, randoms, ctx).summary(**KW)
        est = s["faithfulness_over_random"]
        assert est.value == pytest.approx(s["faithfulness"].value - s["random_faithfulness"].value)
        assert est.low > 0.3

    def test_the_random_draws_are_resampled_too(self):
        _, ctx = _copies()
        # draws that disagree wholly: half always right, half always wrong
        randoms = [torch.ones(N, dtype=torch.bool)] * 2 + [torch.zeros(N, dtype=torch.bool)] * 2
        est = _faith(torch.ones(N, dtype=torch.bool), randoms, ctx).summary(**KW)["faithfulness_over_random"]
        assert est.value == pytest.approx(0.5)
        assert est.high - est.low > 0.3  # from the draws alone: every context agrees

    def _extended(self, ext: torch.Tensor, rand_ext: list[torch.Tensor], ctx) -> binding.ExtendedFaithfulness:
        paper = _draws(1, 0.4, seed=9)[0]
        return binding.ExtendedFaithfulness(
            "m", None, None, None, _ev("F(M)", torch.ones(N), ctx),
            {"paper": _ev("p", paper, ctx), "extended": _ev("e", ext, ctx), "label_kept": _ev("l", ext, ctx)},
            {"random_paper": [_ev("rp", r, ctx) for r in _draws(3, 0.3, seed=8)],
             "random_extended": [_ev("re", r, ctx) for r in rand_ext]})

    def test_extended_over_random(self):
        _, ctx = _copies()
        ext, *rand = _draws(11, 0.5, seed=6)
        res = self._extended(ext, rand, ctx)
        est = res.summary(**KW)["extended_over_random"]
        assert est.n_clusters == CONTEXTS and est.low < 0 < est.high and abs(est.value) < 0.1
        better = self._extended(_draws(1, 0.95, seed=7)[0], rand, ctx).summary(**KW)
        assert better["extended_over_random"].low > 0.3
        assert better["gain"].n_clusters == CONTEXTS

    def test_context_ablation_and_boxes_over_contexts(self):
        correct, ctx = _copies()
        evs = {k: _ev(k, correct if k == "clean" else _draws(1, 0.5, seed=i)[0], ctx)
               for i, k in enumerate(binding.SETTINGS)}
        s = binding.ContextAblation("m", evs, {}).summary(**KW)
        assert {e.n_clusters for e in s.values()} == {CONTEXTS}
        prompts = [{"query_index": i % QUERIES, "objects": ["o"] * QUERIES, "context_id": int(c)}
                   for i, c in enumerate(ctx)]
        boxes = binding.accuracy_by_box(None, prompts, evaluation=_ev("clean", correct), **KW)
        assert [b.estimate.n_clusters for b in boxes] == [CONTEXTS] * QUERIES  # from the records


# --- end to end on a tiny model: records carry their context ids into the results -----------


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    d = build_tiny_model(TinySpec(family="llama", n_layers=2, n_heads=3, d_model=24, d_mlp=32, seed=3),
                         tmp_path_factory.mktemp("clusters") / "m")
    return load_model(ModelSpec(name="m", local_path=str(d)), verbose=False)


@pytest.mark.usefixtures("one_thread")
def test_records_carry_context_ids_into_results(lm):
    records = make_eval_prompts(lm.tokenizer, 12, num_boxes=3, seed=0)
    ids = [r["context_id"] for r in records]
    assert len(set(ids)) < len(ids)  # several queries per context
    ev = model_accuracy(lm, records, progress=False)
    assert ev.clusters.tolist() == ids and ev.estimate(n_resamples=50).n_clusters == len(set(ids))
    # a user's own prompts (no context_id): per prompt
    own = [{k: v for k, v in r.items() if k != "context_id"} for r in records]
    assert model_accuracy(lm, own, progress=False).clusters is None
    # an encoded batch may carry them too (here relabelled with the model's own predictions)
    ref = make_mean_reference_prompts(lm.tokenizer, 6, num_boxes=3, seed=0, n_tokens=records[0]["n_tokens"])
    means = compute_means(lm, ref, batch_size=4, progress=False)
    batch = encode_for(lm, records)
    batch["target"] = mean_ablated_logits(lm, batch, None).argmax(-1)
    batch["context_id"] = torch.tensor(ids)
    circ = Circuit("m", {"value_fetcher": [(1, 0)], "position_transmitter": [(0, 1)],
                         "position_detector": [(0, 2)], "structure_reader": [(1, 2)]})
    res = faithfulness(lm, batch, means, circ, n_random=2, progress=False)
    assert res.clusters.tolist() == ids
    s = res.summary(n_resamples=50)
    assert s["faithfulness_over_random"].n_clusters == len(set(ids))
    assert s["full_accuracy"].value == 1.0
