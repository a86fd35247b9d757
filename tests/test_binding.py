"""Where the binding lives (entity_tracking.methods.binding): context ablation, accuracy by box, residual
interchange, on tiny random Llamas built offline.

A random model rarely answers the task, so the ablation tests score agreement with the model's
own clean predictions (``targets``): clean accuracy is 1 and an ablation can only lose it.
Grouped by behaviour: which sites each setting ablates; limiting cases (nothing ablated equals
the plain evaluation); per-box accuracies adding up to the overall one; interchange oracles (a
prompt patched into itself changes nothing, every position patched gives the source's run, the
last position at the last layer gives the source's answer); errors naming the problem.
"""

from __future__ import annotations

import pytest
import torch

from entity_tracking.methods import binding as B
from entity_tracking import task as D
from entity_tracking.methods.ablation import ALL_POSITIONS, Ablation, AblationError, Evaluation, compute_means, evaluate, faithfulness, keep_mask, shortfall_by_position
from entity_tracking.methods.circuit import Circuit
from entity_tracking.config import ModelSpec, TinySpec
from entity_tracking.model.tiny import build_tiny_model
from entity_tracking.load import load_model
from entity_tracking.intervene.patching import last_logits
from helpers import sharpen

N_LAYERS, N_HEADS = 3, 2
BOXES = 3

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    spec = TinySpec(family="llama", n_layers=N_LAYERS, n_heads=N_HEADS, d_model=32, d_mlp=48, seed=5)
    d = build_tiny_model(spec, tmp_path_factory.mktemp("binding") / "m")
    return sharpen(load_model(ModelSpec(name="m", local_path=str(d)), verbose=False))


@pytest.fixture(scope="module")
def prompts(lm):
    return D.make_eval_prompts(lm.tokenizer, 18, num_boxes=BOXES, seed=0)


@pytest.fixture(scope="module")
def means(lm, prompts):
    ref = D.make_mean_reference_prompts(lm.tokenizer, 12, num_boxes=BOXES, seed=0, n_tokens=prompts[0]["n_tokens"])
    return compute_means(lm, ref, batch_size=6, progress=False)


@pytest.fixture(scope="module")
def own(lm, prompts):
    """The model's own clean predictions: targets under which its clean accuracy is 1."""
    return last_logits(lm, D.encode_prompts(lm.tokenizer, prompts)).argmax(-1)


@pytest.fixture(scope="module")
def pairs(lm):
    return D.make_desiderata(lm.tokenizer, "object_value", 8, num_boxes=BOXES, seed=2)


@pytest.fixture(scope="module")
def batch(lm, prompts, own):
    """The prompts encoded, scored against the model's own predictions (F(M) = 1)."""
    b = D.encode_prompts(lm.tokenizer, prompts)
    b["target"] = own
    return b


def _bases_sources(pairs):
    return [p["base"] for p in pairs], [p["source"] for p in pairs]


# --------------------------------------------------------------------------------------------


class TestRegions:
    def test_context_is_every_token_before_the_query_box(self, lm, prompts):
        b = B.encode_regions(lm, prompts)
        toks = lm.tokenizer.convert_ids_to_tokens(b["input_ids"][0].tolist())
        ctx = b["context_position"][0].tolist()
        query = b["query_position"][0].tolist()
        assert ctx == list(range(len(ctx))) and query == list(range(len(ctx), len(toks)))
        assert [toks[i] for i in query] == ["Box", toks[int(b["query_label_position"][0])], "contains", "the"]
        assert toks[ctx[-1]] == "."
        kept = b["context_but_queried_label_position"][0].tolist()
        assert set(ctx) - set(kept) == {int(b["prev_query_label_position"][0])}

    def test_bpe_tokenizer_with_left_padding(self, llama_style_tokenizer):
        tok = llama_style_tokenizer
        recs = D.make_eval_prompts(tok, 3, num_boxes=3, seed=0) + D.make_eval_prompts(tok, 4, num_boxes=4, seed=0)
        b = B.encode_regions(tok, recs)
        assert not bool(b["attention_mask"].all()), "the mixed box counts should pad"
        for i in range(len(recs)):
            toks = tok.convert_ids_to_tokens(b["input_ids"][i].tolist())
            real = b["attention_mask"][i].nonzero()[:, 0].tolist()
            ctx = [p for p in b["context_position"][i].tolist() if p >= 0]
            query = [p for p in b["query_position"][i].tolist() if p >= 0]
            assert ctx + query == real  # pads belong to neither region
            assert toks[query[0]].lstrip("▁") == "Box" and toks[ctx[-1]] == "."
            assert query[-1] == int(b["last_position"][i]) and query[1] == int(b["query_label_position"][i])


class TestContextAblation:
    def test_nothing_ablated_equals_clean_and_the_plain_evaluation(self, lm, prompts, means, own):
        res = B.context_ablation(lm, prompts, means, heads=[], targets=own, progress=False)
        batch = D.encode_prompts(lm.tokenizer, prompts)
        batch["target"] = own
        (plain,) = evaluate(lm, batch, None, [Ablation()], progress=False)
        assert plain.accuracy == 1.0
        for k in B.SETTINGS:
            assert torch.equal(res.evaluations[k].correct, plain.correct), k
            assert res.sites_ablated[k] == 0
        assert res.summary(n_resamples=50)["clean"].value == 1.0

    def test_sites_of_each_setting(self, lm, prompts, means, own):
        res = B.context_ablation(lm, prompts, means, targets=own, progress=False)
        b = B.encode_regions(lm, prompts)
        n_ctx = b["context_position"].shape[1]
        n_q = b["query_position"].shape[1]
        every = N_LAYERS * N_HEADS
        assert res.sites_ablated["clean"] == 0
        assert res.sites_ablated["context_ablated"] == every * n_ctx
        # keeping the queried label's context occurrence ablates strictly fewer sites: one position fewer
        assert res.sites_ablated["context_ablated_label_kept"] == every * (n_ctx - 1) < res.sites_ablated["context_ablated"]
        assert res.sites_ablated["query_ablated"] == every * n_q
        settings = B.context_settings(lm.arch)
        keep = keep_mask(lm.arch, b, settings["context_ablated"])  # [layers, batch, pos, heads]
        assert not keep[:, :, :n_ctx].any() and keep[:, :, n_ctx:].all()
        kept = keep_mask(lm.arch, b, settings["context_ablated_label_kept"])
        rows = torch.arange(len(prompts))
        assert kept[:, rows, b["prev_query_label_position"]].all()
        want = keep.clone()
        want[:, rows, b["prev_query_label_position"]] = True
        assert torch.equal(kept, want)
        query = keep_mask(lm.arch, b, settings["query_ablated"])
        assert query[:, :, :n_ctx].all() and not query[:, :, n_ctx:].any()

    def test_ablating_the_context_changes_answers(self, lm, prompts, means, own):
        res = B.context_ablation(lm, prompts, means, targets=own, progress=False)
        s = res.summary(n_resamples=100)
        assert s["clean"].value == 1.0
        assert s["context_ablated"].value < 1.0
        assert s["retention_context_ablated"].value == pytest.approx(s["context_ablated"].value)
        js = res.to_json(n_resamples=50)
        assert set(B.SETTINGS) <= set(js) and {"value", "low", "high"} <= set(js["context_ablated"])


class TestAccuracyByBox:
    def test_weighted_mean_is_the_overall_accuracy(self, lm, prompts, means, own):
        res = B.context_ablation(lm, prompts, means, targets=own, progress=False)
        ev = res.evaluations["context_ablated"]
        assert 0 < ev.accuracy < 1, "pick an ablation that loses some but not all answers"
        boxes = B.accuracy_by_box(lm, prompts, evaluation=ev, n_resamples=50)
        assert [b.box for b in boxes] == list(range(1, BOXES + 1))
        assert sum(b.n for b in boxes) == len(prompts)
        assert sum(b.n * b.estimate.value for b in boxes) / len(prompts) == pytest.approx(ev.accuracy)

    def test_boxes_are_the_queried_index(self, lm, prompts):
        q = torch.tensor([p["query_index"] for p in prompts])
        ev = Evaluation("box 2 only", q == 1, torch.zeros(len(prompts), dtype=torch.long))
        got = [b.estimate.value for b in B.accuracy_by_box(lm, prompts, evaluation=ev, n_resamples=20)]
        assert got == [0.0, 1.0, 0.0]

    def test_clean_by_default(self, lm, prompts):
        (plain,) = evaluate(lm, prompts, None, [Ablation()], progress=False)
        boxes = B.accuracy_by_box(lm, prompts, n_resamples=20, progress=False)
        assert sum(b.n * b.estimate.value for b in boxes) / len(prompts) == pytest.approx(plain.accuracy)


class TestInterchange:
    def test_a_prompt_patched_into_itself_changes_nothing(self, lm, pairs):
        bases, _ = _bases_sources(pairs)
        clean = last_logits(lm, D.encode_prompts(lm.tokenizer, bases))
        for layer in range(N_LAYERS):
            torch.testing.assert_close(B.patch_residual(lm, bases, bases, layer), clean, atol=1e-5, rtol=1e-5)
        m = B.interchange_map(lm, bases, bases, progress=False)
        assert torch.equal(m.predicted, m.clean_predicted.expand_as(m.predicted))

    @pytest.mark.parametrize("site,layer", [("resid_pre", 0), ("resid_post", 0), ("resid_post", N_LAYERS - 1)])
    def test_every_position_patched_gives_the_source_run(self, lm, pairs, site, layer):
        bases, sources = _bases_sources(pairs)
        want = last_logits(lm, D.encode_prompts(lm.tokenizer, sources))
        base = last_logits(lm, D.encode_prompts(lm.tokenizer, bases))
        assert not torch.allclose(base, want, atol=1e-3)
        got = B.patch_residual(lm, bases, sources, layer, site=site)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    def test_map_outcomes(self, lm, pairs):
        bases, sources = _bases_sources(pairs)
        m = B.interchange_map(lm, bases, sources, progress=False)
        S = len(m.positions)
        assert m.predicted.shape == (N_LAYERS, S, len(pairs)) and m.position_labels[-1] == "last"
        # the last position at the last layer is all the logits read: the source's own answer
        src_pred = last_logits(lm, D.encode_prompts(lm.tokenizer, sources)).argmax(-1)
        assert torch.equal(m.predicted[-1, -1], src_pred)
        # the three answers differ, so the four shares add up to 1
        assert not (m.answers["own"] == m.answers["source"]).any()
        assert not (m.answers["own"] == m.answers["positional"]).any()
        want_pos = D.word_token_ids(lm.tokenizer, [b["objects"][s["query_index"]] for b, s in zip(bases, sources)])
        assert m.answers["positional"].tolist() == want_pos
        total = sum(m.shares[k] for k in B.OUTCOMES)
        torch.testing.assert_close(total, torch.ones(N_LAYERS, S))
        # a subset of layers and positions is the same cells of the full map
        sub = B.interchange_map(lm, bases, sources, layers=[1], positions=[0, S - 1], progress=False)
        assert torch.equal(sub.predicted[0], m.predicted[1, [0, S - 1]])
        assert len(sub.rows()) == len(B.OUTCOMES) * 2


    @pytest.mark.parametrize("site", ["resid_post", "resid_pre"])
    def test_reusing_the_base_run_below_the_patch_changes_no_prediction(self, lm, pairs, site):
        """Fast path: each patched run starts at the patched layer from the cached base residual."""
        bases, sources = _bases_sources(pairs)
        fast = B.interchange_map(lm, bases, sources, site=site, batch_size=5, progress=False)
        slow = B.interchange_map(lm, bases, sources, site=site, batch_size=5, progress=False, reuse_base=False)
        assert torch.equal(fast.predicted, slow.predicted) and torch.equal(fast.clean_predicted, slow.clean_predicted)

    def test_strongest_is_the_cell_with_the_largest_share(self):
        # 2 layers x 3 positions x 2 pairs; "source" wins both pairs only at (layer 7, position 12)
        own, src, pos = torch.tensor([1, 1]), torch.tensor([2, 2]), torch.tensor([3, 3])
        pred = own.repeat(2, 3, 1).clone()
        pred[0, 1] = torch.tensor([2, 1])
        pred[1, 2] = src
        m = B.InterchangeMap("m", "resid_post", [3, 7], [10, 11, 12], ["a", "b", "last"], pred,
                             {"own": own, "source": src, "positional": pos}, own)
        assert m.strongest("source") == {"share": 1.0, "layer": 7, "position": 12, "label": "last"}
        assert m.strongest("own") == {"share": 1.0, "layer": 3, "position": 10, "label": "a"}  # first of a tie
        assert m.strongest("positional")["share"] == 0.0
        with pytest.raises(ValueError, match="outcome must be one of"):
            m.strongest("sauce")

    def test_the_papers_implied_retention_is_its_accuracy_over_clean(self):
        implied = B.paper_implied()
        assert set(implied["retention"]) == {k for k in B.SETTINGS[1:] if implied[k] is not None}
        for k, r in implied["retention"].items():
            assert r == pytest.approx(implied[k] / implied["clean"]) and 0 < r <= 1.5

    def test_spread_layers(self):
        assert B.spread_layers(4) == [0, 1, 2, 3]
        assert B.spread_layers(32, 8) == [0, 4, 9, 13, 18, 22, 27, 31]
        assert B.spread_layers(32, 1) == [31]


class TestExtendedCircuit:
    """The paper's circuit beside its extension by groups of ours, under the paper's ablation rule."""

    @staticmethod
    def paper_circuit():
        return Circuit("m", {"value_fetcher": [(2, 0), (2, 1)], "position_transmitter": [(1, 1)],
                             "position_detector": [(1, 0)], "structure_reader": [(0, 1)]})

    def every(self):
        return [(l, h) for l in range(N_LAYERS) for h in range(N_HEADS)]

    def test_an_extension_of_every_head_everywhere_is_the_full_model(self, lm, batch, means):
        empty = Circuit("m", {})
        ext = empty.with_group("object_writer", self.every(), ALL_POSITIONS)
        res = B.extended_faithfulness(lm, batch, means, empty, ext, n_random=2, progress=False)
        s = res.summary(n_resamples=50)
        assert s["full_accuracy"].value == 1.0
        assert (s["extended_faithfulness"].value, s["extended_faithfulness"].low, s["extended_faithfulness"].high) == (1, 1, 1)
        (nothing,) = evaluate(lm, batch, means, [Ablation(keep=empty)], progress=False)
        assert s["paper_faithfulness"].value == pytest.approx(nothing.accuracy) and nothing.accuracy < 1
        assert s["gain"].value == pytest.approx(1 - nothing.accuracy)
        short = B.extension_shortfall(lm, batch, means, res, n_resamples=50, progress=False)
        assert not short.missing and short.ladder == [] and short.by_position == []
        assert "nothing is missing" in short.text

    def test_adding_a_group_never_changes_the_paper_circuits_own_number(self, lm, batch, means):
        c = self.paper_circuit()
        plain = faithfulness(lm, batch, means, c, n_random=3, seed=4, progress=False)
        ps = plain.summary(n_resamples=100)
        for writers in ([(0, 0)], [(0, 0), (1, 1)], self.every()):
            res = B.extended_faithfulness(lm, batch, means, c, c.with_group("object_writer", writers), n_random=3,
                                          seed=4, progress=False)
            assert torch.equal(res.evaluations["paper"].correct, plain.circuit_eval.correct)
            assert torch.equal(res.full.correct, plain.full.correct)
            assert [e.accuracy for e in res.random["random_paper"]] == [e.accuracy for e in plain.random]
            s = res.summary(n_resamples=100)
            assert s["paper_faithfulness"] == ps["faithfulness"]
            assert s["random_paper_faithfulness"] == ps["random_faithfulness"]
            assert s["gain"].value == pytest.approx(s["extended_faithfulness"].value - s["paper_faithfulness"].value)

    def test_label_kept_is_every_head_at_the_extension_position(self, lm, batch, means):
        c = self.paper_circuit()
        e = c.with_group("object_writer", [(0, 0)])
        res = B.extended_faithfulness(lm, batch, means, c, e, n_random=2, progress=False)
        assert res.label_kept.groups["object_writer"] == self.every()
        assert res.label_kept.positions["object_writer"] == "prev_query_label"
        (direct,) = evaluate(lm, batch, means, [Ablation(keep=res.label_kept)], progress=False)
        assert torch.equal(res.evaluations["label_kept"].correct, direct.correct)
        rows = res.rows(n_resamples=50)
        assert [r["key"] for r in rows] == [k for k, _ in B.EXTENDED_SETTINGS]
        assert [r["heads"] for r in rows] == [c.n_heads, c.n_heads + 1, c.n_heads + N_LAYERS * N_HEADS,
                                              c.n_heads, c.n_heads + 1]
        assert all(r["paper"] != r["paper"] for r in rows)  # no paper model: NaN
        theirs = {r["key"]: r["paper"] for r in res.rows("Llama-7B", n_resamples=50)}
        assert theirs["paper"] == 1.0 and theirs["random_paper"] == 0.0 and theirs["extended"] != theirs["extended"]
        js = res.to_json(n_resamples=50)
        assert js["extension_groups"] == ["object_writer"] and js["groups"]["object_writer"] == [[0, 0]]
        assert js["n_examples"] == len(batch["target"]) and len(js["random_accuracies"]["random_extended"]) == 2

    def test_shortfall_grows_the_group_to_every_head_and_locates_the_gap(self, lm, batch, means):
        c = self.paper_circuit()
        scores = [[0.3, -0.2], [-0.5, 0.1], [0.0, 0.2]]
        e = c.with_group("object_writer", [(1, 0)], scores=scores)
        res = B.extended_faithfulness(lm, batch, means, c, e, n_random=2, progress=False)
        short = B.extension_shortfall(lm, batch, means, res, n_resamples=50, progress=False)
        assert short.missing, "the tiny model's extended circuit should not be faithful"
        assert [r["heads"] for r in short.ladder] == [2, 4, N_LAYERS * N_HEADS]
        # every head at the label is the label-kept circuit
        assert short.ladder[-1]["faithfulness"].value == pytest.approx(short.label_kept.value)
        (two,) = evaluate(lm, batch, means, [Ablation(keep=e.with_group("object_writer", [(1, 0), (0, 1)]))],
                          progress=False)
        assert short.ladder[0]["faithfulness"].value == pytest.approx(two.accuracy)
        rows = shortfall_by_position(lm, batch, means, e, progress=False)
        assert [r["setting"] for r in short.by_position] == [r["setting"] for r in rows]
        assert [r["accuracy"].value for r in short.by_position] == [r["evaluation"].accuracy for r in rows]
        assert f"{short.faithfulness.value:.2f}" in short.text and "costs most at" in short.text
        assert "More Object Writers (the best-scoring heads first): 2 heads" in short.text
        assert short.to_json()["missing"] and len(short.to_json()["ladder"]) == 3

    def test_errors(self, lm, batch, means):
        c = self.paper_circuit()
        with pytest.raises(B.BindingError, match="holds no group beyond the paper's"):
            B.extended_faithfulness(lm, batch, means, c, c, progress=False)
        moved = c.without([("value_fetcher", (2, 0))]).with_group("object_writer", [(0, 0)])
        with pytest.raises(B.BindingError, match="does not hold the paper circuit's groups unchanged"):
            B.extended_faithfulness(lm, batch, means, c, moved, progress=False)
        res = B.extended_faithfulness(lm, batch, means, c, c.with_group("object_writer", [(0, 0)]), n_random=1,
                                      progress=False)
        with pytest.raises(B.BindingError, match="'value_fetcher' is not an extension group"):
            B.extension_shortfall(lm, batch, means, res, "value_fetcher", progress=False)


class TestErrors:
    def test_position_out_of_range(self, lm, pairs):
        bases, sources = _bases_sources(pairs)
        S = bases[0]["n_tokens"]
        with pytest.raises(B.BindingError, match=f"position {S + 3} is out of range for prompts of {S} tokens"):
            B.interchange_map(lm, bases, sources, positions=[0, S + 3], progress=False)
        with pytest.raises(B.BindingError, match=f"layer {N_LAYERS} is out of range"):
            B.interchange_map(lm, bases, sources, layers=[N_LAYERS], progress=False)

    def test_prompts_of_unequal_length(self, lm, pairs, prompts, means):
        bases, _ = _bases_sources(pairs)
        longer = D.make_eval_prompts(lm.tokenizer, len(bases), num_boxes=BOXES + 1, seed=1)
        with pytest.raises(B.BindingError, match="one token length"):
            B.interchange_map(lm, bases, longer, progress=False)
        with pytest.raises(B.BindingError, match="3 base prompts but 2 source prompts"):
            B.patch_residual(lm, bases[:3], bases[:2], 0)
        with pytest.raises(AblationError, match="must be .* tokens long"):
            B.context_ablation(lm, prompts[:4] + longer[:4], means, progress=False)

    def test_query_label_absent_from_the_context(self, lm, prompts, means):
        ref = D.make_mean_reference_prompts(lm.tokenizer, 3, num_boxes=BOXES, seed=4)
        with pytest.raises(B.BindingError, match="absent from its context"):
            B.context_ablation(lm, ref, means, progress=False)

    def test_evaluation_of_other_prompts(self, lm, prompts, own):
        ev = Evaluation("x", torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.long))
        with pytest.raises(B.BindingError, match="covers 3 prompts, not the 18 given"):
            B.accuracy_by_box(lm, prompts, evaluation=ev)
        with pytest.raises(B.BindingError, match=r"targets must be \[batch\]"):
            B.context_ablation(lm, prompts, None, heads=[], targets=own[:2], progress=False)
