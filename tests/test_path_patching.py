"""Path patching (entity_tracking.methods.path_patching) on tiny random models built offline.

Grouped by behaviour: the fast kernel gives the naive oracle's scores for all four steps on
every family (Llama MHA and GQA, Qwen2, Gemma3), whatever its chunking; GQA scores equal those
of the multi-head twin; what the scores must satisfy by construction; the four-step search
returns a Circuit and calls the pruning hook; the cost estimate works from a config alone; bad
input fails naming the problem.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from entity_tracking import task as D
from entity_tracking.methods import path_patching as PP
from entity_tracking.schema import GROUPS
from entity_tracking.methods.circuit import Circuit
from entity_tracking.config import ModelSpec, TinySpec
from entity_tracking.model.tiny import build_tiny_model
from entity_tracking.load import load_model
from helpers import mha_twin, sharpen

SPECS = {
    "llama-mha": TinySpec(family="llama", n_layers=2, n_heads=4, d_model=64, d_mlp=96, seed=21),
    "llama-gqa": TinySpec(family="llama", n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, d_mlp=96, seed=22),
    "qwen2": TinySpec(family="qwen2", n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, d_mlp=96, seed=23),
    "gemma3": TinySpec(family="gemma3", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, d_head=16, d_mlp=64, seed=24),
}
#: Receivers of each step, fixed so fast and naive see the same ones; layer-0 receivers make
#: sender layer 0 patch a subset of them and skip a block in the fast pass 2.
RECEIVERS = {
    "value_fetcher": [],
    "position_transmitter": [(1, 0), (1, 3), (0, 2)],
    "position_detector": [(1, 1), (1, 2)],
    "structure_reader": [(1, 3), (0, 1)],
}
N_EX, BOXES = 6, 3
TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("path_patching")
    out = {name: build_tiny_model(spec, root / name) for name, spec in SPECS.items()}
    out["llama-gqa-twin"] = mha_twin(out["llama-gqa"], root / "llama-gqa-twin")
    return out


_MODELS: dict[str, object] = {}


def model(dirs, name: str):
    if name not in _MODELS:
        _MODELS[name] = sharpen(load_model(ModelSpec(name=name, local_path=str(dirs[name])), verbose=False))
    return _MODELS[name]


def encode(lm, n: int = N_EX, boxes: int = BOXES, seed: int = 3):
    return D.encode_pairs(lm.tokenizer, D.make_path_patching_pairs(lm.tokenizer, n, boxes, seed=seed),
                          padding_side="right")


def patcher(lm, enc, **kw):
    kw = {"batch_size": 4, "progress": False, "verbose": False, **kw}
    return PP.PathPatcher(lm, enc["base"], enc["source"], enc["target"], **kw)


# --------------------------------------------------------------------------------------------


class TestFastEqualsNaive:
    @pytest.mark.parametrize("name", list(SPECS))
    def test_all_four_steps(self, dirs, name):
        lm = model(dirs, name)
        pp = patcher(lm, encode(lm))
        for step, recv in RECEIVERS.items():
            fast = PP.step_scores(lm, pp, step, recv, method="fast")
            naive = PP.step_scores(lm, pp, step, recv, method="naive")
            assert fast.shape == (lm.arch.n_layers, lm.arch.n_heads)
            assert (fast - naive).abs().max() < TOL, (step, fast, naive)
            assert naive.abs().max() > 1e-3, f"{step}: scores too small for the comparison to mean anything"

    def test_chunking_and_cache_budget_do_not_change_scores(self, dirs):
        """Few rows per pass-2 forward, examples split into groups, no whole-dataset clean state."""
        lm = model(dirs, "llama-gqa")
        enc = encode(lm)
        ref = patcher(lm, enc, batch_size=64)
        small = patcher(lm, enc, batch_size=2, max_rows=3, cache_budget=0)
        for step in ("position_detector", "structure_reader"):
            a = PP.step_scores(lm, ref, step, RECEIVERS[step])
            b = PP.step_scores(lm, small, step, RECEIVERS[step])
            assert (a - b).abs().max() < 1e-6

    def test_explicit_positions_and_key_receivers(self, dirs):
        """The general kernel: any sender/corrupt positions, receivers read through their keys."""
        lm = model(dirs, "llama-gqa")
        enc = encode(lm)
        pp = patcher(lm, enc)
        ps = enc["base"]["object_positions"][:, 1]
        pc = enc["source"]["label_positions"][:, 0]
        for site, recv in ((None, []), ("k", [(1, 2)]), ("v", [(1, 0), (1, 3)])):
            fast = pp.scores(ps, pc, recv, site, method="fast")
            naive = pp.scores(ps, pc, recv, site, method="naive")
            assert (fast - naive).abs().max() < TOL
            if site is None:  # frozen heads keep an object-position sender away from the last token
                assert torch.equal(fast, torch.zeros_like(fast))
            else:
                assert naive.abs().max() > 1e-3


class TestKeyAndValueReceivers:
    """The receiver site of our Object Writer step: receivers' keys and values patched together."""

    @pytest.mark.parametrize("name", list(SPECS))
    def test_fast_equals_naive(self, dirs, name):
        lm = model(dirs, name)
        pp = patcher(lm, encode(lm))
        recv = [(1, 0), (1, 3), (0, 2)]
        fast = PP.step_scores(lm, pp, "object_writer", recv, method="fast")
        naive = PP.step_scores(lm, pp, "object_writer", recv, method="naive")
        assert (fast - naive).abs().max() < TOL, (fast, naive)
        assert naive.abs().max() > 1e-3
        assert torch.equal(fast[1], torch.zeros(lm.arch.n_heads))  # no receiver above the last layer
        # both projections patched: not the key alone, not the value alone
        step = PP.EXTENSION_STEPS["object_writer"]
        for site in ("k", "v"):
            alone = pp.scores(step.sender_position, step.corrupt_position, recv, site)
            assert (alone - fast).abs().max() > 1e-4, site

    def test_gqa_equals_the_mha_twin(self, dirs):
        gqa, twin = model(dirs, "llama-gqa"), model(dirs, "llama-gqa-twin")
        a = gqa.arch
        enc = encode(gqa)
        recv = [(1, 1), (0, 3)]
        twin_recv = sorted({(l, q) for l, h in recv for q in a.query_heads(a.kv_head(h))})
        sg = PP.step_scores(gqa, patcher(gqa, enc), "object_writer", recv)
        st = PP.step_scores(twin, patcher(twin, enc), "object_writer", twin_recv)
        assert (sg - st).abs().max() < TOL

    def test_extend_circuit_adds_the_lowest_scoring_heads_and_keeps_the_paper_groups(self, dirs, tmp_path):
        lm = model(dirs, "llama-mha")
        enc = encode(lm)
        kw = dict(progress=False, verbose=False, batch_size=4)
        c = PP.discover_circuit(lm, enc, receivers_k={"value_fetcher": 2, "position_transmitter": 2,
                                                      "position_detector": 2},
                                circuit_k={"value_fetcher": 2, "position_transmitter": 1, "position_detector": 1,
                                           "structure_reader": 1}, metric=PP.pooled, **kw)
        e = PP.extend_circuit(lm, enc, c, k=3, **kw)
        assert {g: e.groups[g] for g in GROUPS} == c.groups and c.group_names == GROUPS
        assert e.group_names == GROUPS + ("object_writer",) and e.positions["object_writer"] == "prev_query_label"
        want = PP.step_scores(lm, patcher(lm, enc, metric=PP.pooled), "object_writer", c.groups["value_fetcher"])
        assert torch.allclose(torch.tensor(e.scores["object_writer"]), want, atol=1e-6)
        assert e.groups["object_writer"] == PP.top_heads(want, 3, "paper")
        ext = e.meta["extension"]["object_writer"]
        assert ext["metric"] == "pooled" and ext["selection"] == "paper" and ext["k"] == 3
        assert ext["receivers"] == [list(h) for h in c.groups["value_fetcher"]] and ext["step"]["receiver_site"] == "kv"
        assert Circuit.load(e.save(tmp_path / "e.json")) == e
        # without Value Fetchers there is nothing to score through: zeros, and an empty group
        none = PP.extend_circuit(lm, enc, c.without([("value_fetcher", h) for h in c.groups["value_fetcher"]]),
                                 k=3, selection="negative", **kw)
        assert none.groups["object_writer"] == [] and not any(x for row in none.scores["object_writer"] for x in row)
        with pytest.raises(ValueError, match="unknown extension step 'name_mover'"):
            PP.extend_circuit(lm, enc, c, "name_mover", k=1, **kw)

    def test_cost_of_the_extension_step(self):
        from transformers import LlamaConfig

        cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                          vocab_size=1000)
        ow = PP.estimate_cost(cfg, 50, 40, "float32", "fast", steps=["object_writer"], n_receivers={"object_writer": 4})
        sr = PP.estimate_cost(cfg, 50, 40, "float32", "fast", steps=["structure_reader"],
                              n_receivers={"structure_reader": 4})
        assert ow.per_part["object_writer"] > sr.per_part["structure_reader"]  # two projections per receiver
        naive = PP.estimate_cost(cfg, 50, 40, "float32", "naive", steps=["object_writer"])
        assert naive.per_part["object_writer"] == pytest.approx(2 * 4 * 8)


class TestScoresByConstruction:
    def test_senders_at_or_above_every_receiver_score_zero(self, dirs):
        lm = model(dirs, "llama-mha")
        pp = patcher(lm, encode(lm))
        s = PP.step_scores(lm, pp, "position_transmitter", [(1, 0)], method="fast")
        assert torch.equal(s[1], torch.zeros(4))
        naive = PP.step_scores(lm, pp, "position_transmitter", [(1, 0)], method="naive")
        assert naive[1].abs().max() < 1e-6
        assert s[0].abs().max() > 0

    def test_gqa_scores_equal_the_mha_twin(self, dirs):
        """Q receivers are the same heads; a V receiver is its kv head, i.e. its whole group in the twin."""
        gqa, twin = model(dirs, "llama-gqa"), model(dirs, "llama-gqa-twin")
        a = gqa.arch
        enc = encode(gqa)
        pg, pt = patcher(gqa, enc), patcher(twin, enc)
        for step, recv in RECEIVERS.items():
            site = PP.STEPS[step].receiver_site
            twin_recv = sorted({(l, q) for l, h in recv for q in a.query_heads(a.kv_head(h))}) if site == "v" else recv
            sg = PP.step_scores(gqa, pg, step, recv)
            st = PP.step_scores(twin, pt, step, twin_recv)
            assert (sg - st).abs().max() < TOL, step
        # a single query head of the twin is a different receiver than its GQA kv group
        single = PP.step_scores(twin, pt, "position_detector", RECEIVERS["position_detector"])
        grouped = PP.step_scores(gqa, pg, "position_detector", RECEIVERS["position_detector"])
        assert (single - grouped).abs().max() > 1e-4

    def test_top_heads_paper_rule_takes_k_heads_whatever_their_sign(self):
        s = torch.tensor([[0.1, -0.5], [-0.2, -0.5]])
        assert PP.top_heads(s, 2) == [(0, 1), (1, 1)]
        assert PP.top_heads(s, 3) == [(0, 1), (1, 1), (1, 0)]
        # fewer than k negative: the reference's rule fills the group with positive-score heads
        assert PP.top_heads(s, 4) == [(0, 1), (1, 1), (1, 0), (0, 0)]
        assert PP.top_heads(s, 10) == [(0, 1), (1, 1), (1, 0), (0, 0)]
        assert PP.top_heads(torch.tensor([[0.3, 0.1], [0.2, 0.4]]), 2) == [(0, 1), (1, 0)]
        assert PP.top_heads(torch.zeros(2, 3), 2) == [(0, 0), (0, 1)]

    def test_top_heads_negative_rule_keeps_only_negative_scores(self):
        s = torch.tensor([[0.1, -0.5], [-0.2, -0.5]])
        assert PP.top_heads(s, 2, "negative") == [(0, 1), (1, 1)]
        # a zero (cannot reach) or positive score never qualifies
        assert PP.top_heads(s, 10, "negative") == [(0, 1), (1, 1), (1, 0)]
        assert PP.top_heads(torch.zeros(2, 3), 4, "negative") == []
        with pytest.raises(ValueError, match="unknown selection rule 'neg'"):
            PP.top_heads(s, 2, "neg")

    def test_pooled_metric_is_not_dominated_by_confidently_wrong_prompts(self, dirs):
        """A head that cuts p(correct) 0.9 -> 0.1 on a right prompt and lifts 0.001 -> 0.01 on a
        wrong one: the paper's mean of ratios calls it helpful (+4), the pooled metric harmful."""
        pcl, p = torch.tensor([0.9, 0.001]), torch.tensor([0.1, 0.01])
        logits = torch.stack([p, 1 - p], 1).log()  # p(target = token 0) is p
        clean = PP.Clean(pcl, pcl.mean(), lambda: torch.stack([pcl, 1 - pcl], 1).log())
        scores = {name: float(metric(logits, torch.zeros(2, dtype=torch.long), clean).mean())
                  for name, metric in PP.METRICS.items()}
        assert scores["relative"] == pytest.approx(((0.1 - 0.9) / 0.9 + (0.01 - 0.001) / 0.001) / 2)
        assert scores["relative"] > 4
        assert scores["pooled"] == pytest.approx((p - pcl).sum() / pcl.sum())
        assert scores["pooled"] < -0.8

    @pytest.mark.parametrize("name", ["llama-mha", "llama-gqa"])
    def test_pooled_scores_are_the_relative_change_of_the_mean_probability(self, dirs, name):
        """Fast equals naive under the pooled metric too; and pooled x mean p_clean is the mean
        absolute change, i.e. relative scores weighted by each prompt's clean probability."""
        lm = model(dirs, name)
        enc = encode(lm)
        pooled = patcher(lm, enc, metric=PP.metric_named("pooled"))
        for step, recv in RECEIVERS.items():
            fast = PP.step_scores(lm, pooled, step, recv, method="fast")
            naive = PP.step_scores(lm, pooled, step, recv, method="naive")
            assert (fast - naive).abs().max() < TOL, step
            assert naive.abs().max() > 1e-4, step
        with pytest.raises(ValueError, match="unknown path-patching metric 'logit_diff'; the metrics are"):
            PP.metric_named("logit_diff")
        with pytest.raises(TypeError, match="metric_named"):
            patcher(lm, enc, metric="pooled")

    def test_a_metric_of_ones_own_fast_equals_naive(self, dirs):
        """A user's metric, the change of the target's logit (a logit difference against the clean
        run), plugs in as a callable; the fast kernel gives the naive scores under it too."""
        lm = model(dirs, "llama-mha")

        def logit_difference(logits, target, clean):
            return (logits.gather(1, target[:, None]) - clean.logits.gather(1, target[:, None]))[:, 0]

        pp = patcher(lm, encode(lm), metric=logit_difference)
        for step, recv in RECEIVERS.items():
            fast = PP.step_scores(lm, pp, step, recv, method="fast")
            naive = PP.step_scores(lm, pp, step, recv, method="naive")
            assert (fast - naive).abs().max() < TOL, step
            assert naive.abs().max() > 1e-4, step
        c = PP.discover_circuit(lm, pp, receivers_k={"value_fetcher": 2, "position_transmitter": 2,
                                                     "position_detector": 2}, progress=False, verbose=False)
        assert c.meta["metric"] == "logit_difference"


class TestDiscoverCircuit:
    def test_four_steps_give_a_circuit_and_call_the_pruner(self, dirs, tmp_path):
        lm = model(dirs, "llama-mha")
        seen = []

        def prune(c: Circuit) -> Circuit:
            seen.append(c)
            return c.without([("position_transmitter", c.groups["position_transmitter"][0])])

        c = PP.discover_circuit(lm, encode(lm), receivers_k={"value_fetcher": 3, "position_transmitter": 2,
                                                             "position_detector": 2},
                                circuit_k={"value_fetcher": 5, "position_transmitter": 2, "position_detector": 3,
                                           "structure_reader": 2},
                                prune=prune, selection="negative", progress=False, verbose=False, batch_size=4)
        cand = seen[0]
        assert len(cand.groups["position_transmitter"]) == 2
        assert not set(cand.groups["value_fetcher"]) & set(cand.groups["position_transmitter"])
        assert len(c.groups["position_transmitter"]) == 1 and c.meta["pruned"] and not cand.meta["pruned"]
        k = c.meta["circuit_k"]
        for g in GROUPS:
            m = torch.tensor(c.scores[g])
            assert m.shape == (2, 4)
            assert len(cand.groups[g]) <= k[g]
            assert cand.groups[g] == [h for h in PP.top_heads(m, 10, "negative") if h in cand.groups[g]]
            assert all(m[h] < 0 for h in cand.groups[g]), g
            recv = c.meta["receivers"][g]
            if PP.STEPS[g].receivers_from and not recv:  # nothing to score through: no group either
                assert torch.equal(m, torch.zeros(2, 4)) and cand.groups[g] == []
        vf = torch.tensor(c.scores["value_fetcher"])
        assert c.meta["receivers"]["position_transmitter"] == [list(h) for h in PP.top_heads(vf, 3, "negative")]
        assert c.meta["n_examples"] == N_EX and c.meta["kernel"] == "fast"
        back = Circuit.load(c.save(tmp_path / "c.json"))
        assert back.groups == c.groups and back.scores == c.scores

    @pytest.mark.parametrize("selection", PP.SELECTIONS)
    def test_selection_rules(self, dirs, selection):
        lm = model(dirs, "llama-mha")
        c = PP.discover_circuit(lm, encode(lm), receivers_k={"value_fetcher": 3, "position_transmitter": 2,
                                                             "position_detector": 2},
                                circuit_k={g: 3 for g in GROUPS}, drop_vf_pt_overlap=False, selection=selection,
                                progress=False, verbose=False, batch_size=4)
        assert c.meta["selection"] == selection
        for g in GROUPS:
            m = torch.tensor(c.scores[g])
            assert c.groups[g] == PP.top_heads(m, 3, selection), g
            if selection == "paper":
                assert len(c.groups[g]) == 3, g
            else:
                assert all(m[h] < 0 for h in c.groups[g]), g
            recv = c.meta["receivers"][g]
            if PP.STEPS[g].receivers_from and not recv:  # nothing to score through: no group either
                assert selection == "negative"
                assert torch.equal(m, torch.zeros(2, 4)) and c.groups[g] == []

    @pytest.mark.parametrize("selection,runs", [("paper", True), ("negative", False)])
    def test_a_step_after_an_all_positive_group(self, dirs, monkeypatch, selection, runs):
        """Every Value Fetcher scores above zero: the paper's rule still takes the k lowest as the
        Transmitter step's receivers and runs it; ours has no receivers and scores zeros."""
        lm = model(dirs, "llama-mha")
        calls, real = [], PP.step_scores

        def fake(lm_, pp, step, receivers=(), **kw):
            calls.append((step, list(receivers)))
            if step == "value_fetcher":
                return torch.tensor([[0.5, 0.4, 0.3, 0.2], [0.9, 0.8, 0.7, 0.1]])
            return real(lm_, pp, step, receivers, **kw)

        monkeypatch.setattr(PP, "step_scores", fake)
        c = PP.discover_circuit(lm, encode(lm), receivers_k={"value_fetcher": 2}, selection=selection,
                                progress=False, verbose=False, batch_size=4)
        stepped = dict(calls)
        assert ("position_transmitter" in stepped) == runs
        if runs:
            assert stepped["position_transmitter"] == [(1, 3), (0, 3)]
            assert torch.tensor(c.scores["position_transmitter"]).abs().max() > 0
        else:
            assert c.meta["receivers"]["position_transmitter"] == []
            assert c.groups["value_fetcher"] == c.groups["position_transmitter"] == []

    def test_records_are_encoded_with_the_model_tokenizer(self, dirs):
        lm = model(dirs, "llama-mha")
        records = D.make_path_patching_pairs(lm.tokenizer, 4, BOXES, seed=5)
        s = PP.step_scores(lm, records, "value_fetcher", progress=False, verbose=False)
        assert s.shape == (2, 4)


class TestCost:
    def test_llama_7b_from_its_config_alone(self, capsys):
        from transformers import LlamaConfig

        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          vocab_size=32000)
        naive = PP.estimate_cost(cfg, 300, 54, "float16", "naive")
        fast = PP.estimate_cost(cfg, 300, 54, "float16", "fast")  # upper bound: receivers in every layer
        assert naive.forward_equivalents == pytest.approx(2 + 7 * 32 * 32)
        assert fast.forward_equivalents < naive.forward_equivalents / 10
        # with receivers where the paper found them (PT 11-19, PD 9-13), far fewer senders and blocks run
        paper = PP.estimate_cost(cfg, 300, 54, "float16", "fast", receiver_layers={
            "position_transmitter": range(15, 25), "position_detector": range(11, 20),
            "structure_reader": range(9, 14)})
        assert paper.forward_equivalents < naive.forward_equivalents / 20
        assert 0 < fast.peak_bytes and 0 < naive.peak_bytes
        assert naive.flops > 1e15  # ~7,000 forward passes of 300 prompts of a 7B model
        print(fast)
        assert "forward-pass equivalents" in capsys.readouterr().out

    def test_a_sweep_prints_its_cost_first(self, dirs, capsys):
        lm = model(dirs, "llama-mha")
        pp = patcher(lm, encode(lm), verbose=True)
        PP.step_scores(lm, pp, "value_fetcher")
        out = capsys.readouterr().out
        assert "value_fetcher: path patching (fast)" in out and "peak activation memory" in out


class TestErrors:
    def test_prompts_of_unequal_length(self, dirs):
        lm = model(dirs, "llama-mha")
        recs = D.make_path_patching_pairs(lm.tokenizer, 2, 3, seed=0) + D.make_path_patching_pairs(lm.tokenizer, 2, 4,
                                                                                                    seed=0)
        enc = D.encode_pairs(lm.tokenizer, recs, padding_side="right")
        with pytest.raises(ValueError, match=r"base prompts have unequal lengths \[26, 33\]"):
            patcher(lm, enc)

    def test_positions_and_heads(self, dirs):
        lm = model(dirs, "llama-mha")
        enc = encode(lm)
        pp = patcher(lm, enc)
        S = enc["base"]["input_ids"].shape[1]
        with pytest.raises(IndexError, match=rf"position {S} \(example 0, base position\) .* sequence length {S}"):
            pp.scores(torch.full((N_EX,), S), enc["source"]["last_position"])
        absent = {**enc, "base": {**enc["base"], "prev_query_label_position": enc["base"]["prev_query_label_position"].clone()}}
        absent["base"]["prev_query_label_position"][1] = -1  # a base whose query label is not in the context
        with pytest.raises(IndexError, match=r"position -1 \(example 1, base prev_query_label\)"):
            PP.step_scores(lm, patcher(lm, absent), "structure_reader", [(1, 0)])
        with pytest.raises(IndexError, match="query head 7 out of range"):
            PP.step_scores(lm, pp, "position_transmitter", [(1, 7)])
        with pytest.raises(IndexError, match="layer 3 out of range"):
            PP.step_scores(lm, pp, "position_transmitter", [(3, 0)])
        with pytest.raises(ValueError, match="unknown step"):
            PP.step_scores(lm, pp, "name_mover")
        with pytest.raises(ValueError, match="no receiver heads"):
            pp.scores("last", "last", [], "q")
        with pytest.raises(ValueError, match=r"receiver site must be None \(logits\) or one of"):
            pp.scores("last", "last", [(1, 0)], "o")
        with pytest.raises(ValueError, match="method must be one of"):
            PP.step_scores(lm, pp, "value_fetcher", method="approximate")


class TestNull:
    def test_shuffled_attention_scrambles_and_restores(self, dirs):
        from entity_tracking.intervene.patching import last_logits

        lm = model(dirs, "llama-gqa")
        batch = D.encode_prompts(lm.tokenizer, D.make_eval_prompts(lm.tokenizer, 4, BOXES, seed=2))
        before = last_logits(lm, batch)
        weights = [m.weight.detach().clone() for l in range(lm.arch.n_layers) for m in lm.arch.attention_projections(lm, l)]
        with PP.shuffled_attention(lm, seed=1):
            inside = last_logits(lm, batch)
            now = [m.weight for l in range(lm.arch.n_layers) for m in lm.arch.attention_projections(lm, l)]
            assert all(not torch.equal(a, b) for a, b in zip(weights, now))
            # the same values, permuted
            assert all(torch.equal(a.flatten().sort().values, b.flatten().sort().values) for a, b in zip(weights, now))
        assert not torch.allclose(before, inside, atol=1e-4)
        assert torch.equal(last_logits(lm, batch), before)
        with pytest.raises(RuntimeError, match="boom"):
            with PP.shuffled_attention(lm, seed=2):
                raise RuntimeError("boom")
        after = [m.weight for l in range(lm.arch.n_layers) for m in lm.arch.attention_projections(lm, l)]
        assert all(torch.equal(a, b) for a, b in zip(weights, after))

    def test_null_circuit_runs_the_same_sweep_on_the_scrambled_model(self, dirs):
        from entity_tracking.methods.verdicts import groups_standing_out

        lm = model(dirs, "llama-mha")
        kw = dict(receivers_k={"value_fetcher": 2, "position_transmitter": 2, "position_detector": 2},
                  circuit_k={g: 2 for g in GROUPS}, progress=False, verbose=False, batch_size=4)
        real = PP.discover_circuit(lm, encode(lm), **kw)
        null = PP.null_circuit(lm, encode(lm), seed=0, **kw)
        assert null.meta["null"] == "shuffled attention" and null.meta["circuit_k"] == real.meta["circuit_k"]
        assert null.scores != real.scores
        again = PP.discover_circuit(lm, encode(lm), **kw)
        assert again.scores == real.scores  # the real model is untouched
        table = groups_standing_out(real, null)
        for g in GROUPS:
            low = min(real.scores[g][l][h] for l, h in real.groups[g])
            null_low = min(x for row in null.scores[g] for x in row)
            assert table[g]["lowest"] == low and table[g]["null_lowest"] == null_low
            eff, null_eff = low * real.meta["mean_p_clean"], null_low * null.meta["mean_p_clean"]
            assert table[g]["effect"] == pytest.approx(eff) and table[g]["null_effect"] == pytest.approx(null_eff)
            assert table[g]["stands_out"] == (low < -1e-3 and eff < null_eff)
        assert 0 < null.meta["mean_p_clean"] < 1 and null.meta["mean_p_clean"] != real.meta["mean_p_clean"]
        with pytest.raises(TypeError, match="needs the pairs"):
            PP.null_circuit(lm, patcher(lm, encode(lm)))
