"""Mean ablation, circuit performance, faithfulness, completeness, minimality, bootstrap.

Tiny random Llamas of a *non-square* shape (3 layers x 5 heads), so any mix-up of layer and
head indices shows. A random model rarely answers the task, so most tests relabel the
evaluation prompts with the full model's own predictions: F(M) = 1 and every ablation can only
lose accuracy. Grouped by behaviour: means; what is ablated where (checked against a plain
torch-hook implementation that loops over heads); the metrics' limiting cases (full circuit,
empty circuit, full model against itself); random circuits; minimality; bootstrap intervals;
errors naming the problem.
"""

from __future__ import annotations

import math

import pytest
import torch

from entity_tracking.methods.ablation import ALL_POSITIONS, Ablation, AblationError, MeanActivations, NecessityResult, Evaluation, circuit_performance, completeness, compute_means, empty_circuit, encode_for, evaluate, faithfulness, full_circuit, keep_mask, mean_ablated_logits, minimality, necessity, outside_at_positions, pruner, random_circuit, random_circuits, shortfall_by_position
from entity_tracking.intervene import patching as P
from entity_tracking.intervene.stats import bootstrap
from entity_tracking.model.arch import arch_for
from entity_tracking.schema import GROUP_LABELS, GROUP_POSITIONS, GROUPS
from entity_tracking.methods.circuit import Circuit
from entity_tracking.methods import verdicts as V
from entity_tracking.config import ModelSpec, TinySpec
from entity_tracking.task.samplers import make_eval_prompts, make_mean_reference_prompts
from entity_tracking.model.tiny import build_tiny_model
from entity_tracking.load import load_model

N_LAYERS, N_HEADS = 3, 5
BOXES = 3


def _spec(seed: int) -> TinySpec:
    return TinySpec(family="llama", n_layers=N_LAYERS, n_heads=N_HEADS, d_model=40, d_mlp=48, seed=seed)


pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    out = {}
    for name, seed in (("a", 11), ("b", 12)):
        d = build_tiny_model(_spec(seed), root / name)
        out[name] = load_model(ModelSpec(name=name, local_path=str(d)), verbose=False)
    return out


@pytest.fixture(scope="module")
def lm(models):
    return models["a"]


@pytest.fixture(scope="module")
def prompts(lm):
    ev = make_eval_prompts(lm.tokenizer, 14, num_boxes=BOXES, seed=0)
    ref = make_mean_reference_prompts(lm.tokenizer, 10, num_boxes=BOXES, seed=0, n_tokens=ev[0]["n_tokens"])
    return ev, ref


@pytest.fixture(scope="module")
def means(lm, prompts):
    return compute_means(lm, prompts[1], batch_size=4, progress=False)


def _self_labelled(model, records):
    """Encoded prompts whose target is the full model's own prediction (F(M) = 1)."""
    batch = encode_for(model, records)
    batch["target"] = mean_ablated_logits(model, batch, None).argmax(-1)
    return batch


@pytest.fixture(scope="module")
def batch(lm, prompts):
    return _self_labelled(lm, prompts[0])


def _circuit() -> Circuit:
    return Circuit("a", {
        "value_fetcher": [(2, 4), (2, 1), (1, 3)],
        "position_transmitter": [(1, 0)],
        "position_detector": [(0, 4), (1, 2)],
        "structure_reader": [(0, 1)],
    })


def _hooked_logits(model, batch, means, circuit=None, removed=None):
    """Reference implementation with plain torch hooks and Python loops over sites: keep
    ``circuit``'s heads at their group positions (every head everywhere if None), minus
    ``removed``'s, and replace every other head output by its mean."""
    a, hf = model.arch, model.hf
    ids = batch["input_ids"]
    B, S = ids.shape

    def sites(c):
        out = set()
        for g in c.group_names:
            for layer, head in c.groups[g]:
                for b in range(B):
                    if c.positions[g] == ALL_POSITIONS:
                        out |= {(layer, head, b, s) for s in range(S)}
                    else:
                        out.add((layer, head, b, int(batch[f"{c.positions[g]}_position"][b])))
        return out

    keep = sites(circuit) if circuit is not None else {
        (layer, h, b, s) for layer in range(N_LAYERS) for h in range(N_HEADS) for b in range(B) for s in range(S)}
    if removed is not None:
        keep -= sites(removed)

    mask = torch.tensor([[[[(layer, h, b, s) in keep for h in range(a.n_heads)] for s in range(S)]
                          for b in range(B)] for layer in range(a.n_layers)])  # [layer, b, s, h]

    def hook(layer):
        def pre(mod, args):
            z = args[0].view(B, S, a.n_heads, a.d_head)
            z = torch.where(mask[layer][..., None], z, means.means[layer][None])
            return (z.reshape(B, S, -1),) + args[1:]
        return pre

    handles = [a.o_proj(hf, layer).register_forward_pre_hook(hook(layer)) for layer in range(a.n_layers)]
    try:
        with torch.no_grad():
            logits = hf(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    finally:
        for h in handles:
            h.remove()
    return logits[torch.arange(B), batch["last_position"]]


def _counting(rows: list):
    """``Session.predict_rows`` that records how many rows of settings each evaluation runs (not
    the rows of the reference runs they share work with)."""
    real = P.Session.predict_rows

    def counted(self, prompts, *a, **k):
        rows.append(len(prompts))
        return real(self, prompts, *a, **k)
    return counted


# --------------------------------------------------------------------------------------------


class TestMeans:
    def test_shape_and_value_per_position(self, lm, prompts, means):
        ref = encode_for(lm, prompts[1])
        S = ref["input_ids"].shape[1]
        assert means.shape == (N_LAYERS, S, N_HEADS, lm.arch.d_head) and means.n_prompts == 10
        with lm.trace(input_ids=ref["input_ids"]):
            z = lm.arch.read(lm.nn, "z", 1).clone().save()
        torch.testing.assert_close(means.means[1], z.mean(0), atol=1e-6, rtol=1e-5)

    def test_single_prompt_means_make_ablation_the_identity(self, lm, prompts):
        one = prompts[1][:1]
        m1 = compute_means(lm, one, progress=False)
        clean = mean_ablated_logits(lm, one, None, all_positions=True)
        ablated = mean_ablated_logits(lm, one, m1, Ablation(keep=empty_circuit()), all_positions=True)
        torch.testing.assert_close(ablated, clean, atol=1e-5, rtol=0)

    def test_each_model_has_its_own_means(self, models, prompts):
        ma = compute_means(models["a"], prompts[1], progress=False)
        mb = compute_means(models["b"], prompts[1], progress=False)
        assert (ma.model, mb.model) == ("a", "b")
        assert (ma.means - mb.means).abs().max() > 1e-3
        ev = prompts[0][:4]
        with pytest.raises(AblationError, match="computed on model 'a' but are applied to 'b'"):
            evaluate(models["b"], ev, ma, [Ablation(keep=empty_circuit())], progress=False)
        # the override exists, and the result differs from ablating with b's own means
        own = mean_ablated_logits(models["b"], ev, mb, Ablation(keep=empty_circuit()))
        foreign = mean_ablated_logits(models["b"], ev, ma, Ablation(keep=empty_circuit()), check_model=False)
        assert (own - foreign).abs().max() > 1e-3

    def test_save_and_load(self, means, tmp_path):
        back = MeanActivations.load(means.save(tmp_path / "m.pt"))
        assert back.model == means.model and back.n_prompts == means.n_prompts
        assert torch.equal(back.means, means.means)

    def test_reference_prompts_of_different_lengths(self, lm):
        mixed = (make_mean_reference_prompts(lm.tokenizer, 2, num_boxes=2, seed=0)
                 + make_mean_reference_prompts(lm.tokenizer, 2, num_boxes=3, seed=0))
        with pytest.raises(AblationError, match="one token length"):
            compute_means(lm, mixed, progress=False)

    def test_eval_and_reference_lengths_differ(self, lm, means):
        longer = make_eval_prompts(lm.tokenizer, 4, num_boxes=BOXES + 1, seed=0)
        with pytest.raises(AblationError, match=rf"must be {means.seq_len} tokens long"):
            evaluate(lm, longer, means, [Ablation(keep=_circuit())], progress=False)
        # nothing ablated: no means needed, any length is fine
        (full,) = evaluate(lm, longer, means, [Ablation()], progress=False)
        assert full.n == 4


class TestWhatIsAblated:
    def test_keep_mask_sites(self, lm, batch):
        c = _circuit()
        keep = keep_mask(lm.arch, batch, Ablation(keep=c))
        B, S = batch["input_ids"].shape
        assert keep.shape == (N_LAYERS, B, S, N_HEADS)
        want = torch.zeros_like(keep)
        for g in GROUPS:
            pos = batch[f"{GROUP_POSITIONS[g]}_position"]
            for layer, h in c.groups[g]:
                want[layer, torch.arange(B), pos, h] = True
        assert torch.equal(keep, want)
        # M\K ablates only K's sites; C\K = C's sites minus K's
        k = Circuit("K", {"position_detector": [(0, 4)]})
        mk = keep_mask(lm.arch, batch, Ablation(ablate=k))
        assert int((~mk).sum()) == B and not mk[0, torch.arange(B), batch["query_label_position"], 4].any()
        ck = keep_mask(lm.arch, batch, Ablation(keep=c, ablate=k))
        assert torch.equal(ck, want & mk)

    @pytest.mark.parametrize("case", ["circuit", "circuit_minus_k", "model_minus_k", "empty", "random"])
    def test_matches_a_loop_over_heads(self, lm, batch, means, case):
        c, k = _circuit(), Circuit("K", {"value_fetcher": [(2, 4)], "structure_reader": [(0, 1)]})
        keep, removed = {
            "circuit": (c, None), "circuit_minus_k": (c, k), "model_minus_k": (None, k),
            "empty": (empty_circuit(), None), "random": (random_circuit(lm.arch, c, seed=3), None),
        }[case]
        want = _hooked_logits(lm, batch, means, keep, removed)
        got = mean_ablated_logits(lm, batch, means, Ablation(keep=keep, ablate=removed))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    def test_batched_settings_equal_separate_runs(self, lm, batch, means):
        settings = [Ablation(), Ablation(keep=_circuit()), Ablation(keep=empty_circuit()),
                    Ablation(ablate=Circuit("K", {"value_fetcher": [(2, 4)]}))]
        together = evaluate(lm, batch, means, settings, batch_size=5, progress=False)
        for ab, ev in zip(settings, together):
            (alone,) = evaluate(lm, batch, means, [ab], batch_size=64, progress=False)
            assert torch.equal(ev.predicted, alone.predicted)
            want = mean_ablated_logits(lm, batch, means, ab).argmax(-1)
            assert torch.equal(ev.predicted, want)

    def test_equal_settings_run_once_and_a_memo_serves_later_calls(self, lm, batch, means, monkeypatch):
        """Fast path: settings that ablate the same sites (whatever their labels and group names)
        are run once, and a memo hands a later call what an earlier one evaluated; the
        evaluations equal those of each setting run alone."""
        import entity_tracking.methods.ablation as A

        renamed = Circuit("other name", {"position_transmitter": [(2, 4)]},
                          positions={"position_transmitter": GROUP_POSITIONS["value_fetcher"]})
        settings = [Ablation(label="F(M)"), Ablation(keep=_circuit(), label="F(C)"), Ablation(label="F(M) again"),
                    Ablation(ablate=Circuit("K", {"value_fetcher": [(2, 4)]}), label="K"),
                    Ablation(ablate=renamed, label="K, other group"), Ablation(ablate=Circuit("none", {}))]
        assert A.setting_key(lm.arch, settings[3]) == A.setting_key(lm.arch, settings[4])
        rows, real = [], P.Session.predict_rows
        monkeypatch.setattr(P.Session, "predict_rows", _counting(rows))
        memo: dict = {}
        together = evaluate(lm, batch, means, settings, batch_size=5, progress=False, memo=memo)
        n = len(batch["input_ids"])
        assert sum(rows) == 3 * n, "F(M) (three times), F(C) and K (twice): three settings run"
        assert [e.label for e in together] == [a.label or f"setting {i}" for i, a in enumerate(settings)]
        rows.clear()
        again = evaluate(lm, batch, means, [Ablation(keep=_circuit()), Ablation(keep=empty_circuit())],
                         batch_size=5, progress=False, memo=memo)
        assert sum(rows) == n, "F(C) came from the memo, only F(empty) ran"
        assert torch.equal(again[0].predicted, together[1].predicted)
        other = {**batch, "target": torch.zeros_like(batch["target"])}
        rows.clear()
        evaluate(lm, other, means, [Ablation()], batch_size=5, progress=False, memo=memo)
        assert sum(rows) == n, "other prompts or targets are not served from the memo"
        monkeypatch.setattr(P.Session, "predict_rows", real)
        for ab, ev in zip(settings, together):
            (alone,) = evaluate(lm, batch, means, [ab], batch_size=64, progress=False)
            assert torch.equal(ev.predicted, alone.predicted) and torch.equal(ev.correct, alone.correct)

    def test_rows_run_from_a_shared_prefix_give_the_whole_runs(self, lm, batch, means, monkeypatch):
        """Fast path: rows that begin as the run with nothing or every head ablated run only
        their suffix, from that run's cached keys and values, and from their first block that
        differs from it; every prediction is the whole run's, for settings of every kind (and
        the reference runs are made)."""
        import entity_tracking.methods.ablation as A

        c = _circuit()
        k = Circuit("K", {"value_fetcher": [(2, 4), (1, 3)], "position_detector": [(0, 4)]})
        settings = [Ablation(), Ablation(keep=c), Ablation(keep=empty_circuit()), Ablation(keep=c, ablate=k),
                    Ablation(ablate=k), Ablation(ablate=Circuit("all", {"value_fetcher": [(1, 1)]},
                                                                positions={"value_fetcher": ALL_POSITIONS})),
                    Ablation(ablate=outside_at_positions(lm.arch, c, ["query_label"]))]
        settings += [Ablation(keep=r) for r in random_circuits(lm.arch, c, 4, seed=3)]
        calls, real = [], P._execute
        monkeypatch.setattr(P, "_execute", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
        fast = evaluate(lm, batch, means, settings, batch_size=6, progress=False)
        assert any(kw.get("return_kv") for kw in calls) and any(kw.get("prefix") is not None for kw in calls)
        assert any(list(kw.get("skip_layers", ())) for kw in calls), "the head ablated everywhere starts above block 0"
        monkeypatch.setattr(P, "_execute", real)
        slow = evaluate(lm, batch, means, settings, batch_size=6, progress=False, cached=False)
        for a, b in zip(fast, slow):
            assert torch.equal(a.predicted, b.predicted), a.label

    def test_a_key_naming_several_positions_is_the_union_of_single_positions(self, lm, batch, means):
        B = batch["input_ids"].shape[0]
        multi = dict(batch)
        multi["two_position"] = torch.stack([batch["query_label_position"], batch["last_position"]], 1)
        multi["two_position"][0, 1] = -1  # absent for prompt 0: only its query label is ablated
        heads = [(0, 4), (2, 1)]
        got = keep_mask(lm.arch, multi, Ablation(ablate=Circuit("K", {"value_fetcher": heads},
                                                                  positions={"value_fetcher": "two"})))
        want = keep_mask(lm.arch, batch, Ablation(ablate=Circuit(
            "K", {"value_fetcher": heads, "position_detector": heads},
            positions={"value_fetcher": "last", "position_detector": "query_label"})))
        want[:, 0] = keep_mask(lm.arch, batch, Ablation(ablate=Circuit(
            "K", {"position_detector": heads}, positions={"position_detector": "query_label"})))[:, 0]
        assert torch.equal(got, want)
        assert int((~got).sum()) == len(heads) * (2 * B - 1)
        # batched evaluation picks each row's own positions (rows are regrouped across settings)
        ab = Ablation(ablate=Circuit("K", {"value_fetcher": heads}, positions={"value_fetcher": "two"}))
        two = Ablation(ablate=Circuit("K", {"value_fetcher": heads, "position_detector": heads},
                                      positions={"value_fetcher": "last", "position_detector": "query_label"}))
        got_ev, want_ev = evaluate(lm, multi, means, [ab, two], batch_size=5, progress=False)
        assert torch.equal(got_ev.predicted[1:], want_ev.predicted[1:])

    def test_a_position_out_of_range_names_the_key(self, lm, batch, means):
        bad = dict(batch)
        S = batch["input_ids"].shape[1]
        bad["far_position"] = torch.full((batch["input_ids"].shape[0], 2), S)
        c = Circuit("c", {"value_fetcher": [(0, 0)]}, positions={"value_fetcher": "far"})
        with pytest.raises(AblationError, match=rf"far_position'\] holds position {S}, out of range"):
            evaluate(lm, bad, means, [Ablation(ablate=c)], progress=False)



class TestCircuitMetrics:
    def test_full_circuit_is_the_full_model(self, lm, batch, means):
        full = full_circuit(lm.arch, "a")
        assert all(len(full.groups[g]) == N_LAYERS * N_HEADS for g in GROUPS)
        res = faithfulness(lm, batch, means, full, n_random=0, progress=False)
        assert res.full.accuracy == 1.0
        assert torch.equal(res.circuit_eval.correct, res.full.correct)
        assert res.score == 1.0
        assert res.summary(n_resamples=50)["faithfulness"].value == 1.0

    def test_empty_circuit_is_everything_ablated(self, lm, batch, means):
        res = faithfulness(lm, batch, means, empty_circuit("a"), n_random=0, progress=False)
        assert torch.equal(res.circuit_eval.correct, res.ablated.correct)
        assert res.ablated.accuracy < 1.0  # ablating every head changes the model's answers
        want = _hooked_logits(lm, batch, means, empty_circuit()).argmax(-1)
        assert torch.equal(res.ablated.predicted, want)

    def test_faithfulness_of_a_circuit(self, lm, batch, means):
        c = _circuit()
        res = faithfulness(lm, batch, means, c, n_random=10, seed=5, progress=False)
        assert res.score == pytest.approx(res.circuit_eval.accuracy / res.full.accuracy)
        assert res.circuit_eval.accuracy == circuit_performance(lm, batch, means, c, progress=False).accuracy
        assert len(res.random) == len(res.random_circuits) == 10
        for r in res.random_circuits:
            assert {g: len(r.groups[g]) for g in GROUPS} == {g: len(c.groups[g]) for g in GROUPS}
        s = res.summary(n_resamples=200, seed=1)
        assert set(s) == {"full_accuracy", "circuit_accuracy", "ablated_accuracy", "faithfulness",
                          "random_accuracy", "random_faithfulness", "faithfulness_over_random"}
        assert s["random_accuracy"].value == pytest.approx(res.random_accuracy)
        over = s["faithfulness"].value - s["random_faithfulness"].value
        assert s["faithfulness_over_random"].value == pytest.approx(over)
        again = faithfulness(lm, batch, means, c, n_random=10, seed=5, progress=False)
        assert [e.accuracy for e in again.random] == [e.accuracy for e in res.random]
        assert res.to_json(n_resamples=20)["group_sizes"]["value_fetcher"] == 3

    def test_circuit_of_one_model_in_another(self, models, prompts, means):
        """The base circuit evaluated in a second model with that model's own means."""
        b = models["b"]
        mb = compute_means(b, prompts[1], progress=False)
        bb = _self_labelled(b, prompts[0])
        res = faithfulness(b, bb, mb, _circuit(), n_random=2, progress=False)
        assert res.model == "b" and res.circuit.model == "a" and res.full.accuracy == 1.0
        want = _hooked_logits(b, bb, mb, _circuit()).argmax(-1)
        assert torch.equal(res.circuit_eval.predicted, want)

    def test_completeness_of_the_full_model_is_zero(self, lm, batch, means):
        res = completeness(lm, batch, means, full_circuit(lm.arch, "a"), n_draws=3, seed=0, progress=False)
        assert len(res.draws) == 3 and set(res.groups) == set(GROUPS)
        assert res.score == 0.0 and all(d.score == 0.0 for d in res.groups.values())
        assert any(d.removed.n_heads > 0 for d in res.draws)
        s = res.summary(n_resamples=50)
        assert s["random_score"].value == 0.0 and s["random_score"].high == 0.0
        frame = res.to_frame()  # what a chapter displays: one row per K, no keys to parse
        assert list(frame["K"]) == ["random K"] * 3 + [GROUP_LABELS[g] for g in GROUPS]
        assert list(frame["score"]) == [d.score for d in res.draws] + [d.score for d in res.groups.values()]
        row = res.scores_row(n_resamples=50)
        assert list(row) == ["random K", *(GROUP_LABELS[g] for g in GROUPS)]
        assert row[GROUP_LABELS["value_fetcher"]] == s["value_fetcher_score"]

    def test_completeness_limits_and_groups(self, lm, batch, means):
        c = _circuit()
        none = completeness(lm, batch, means, c, n_draws=1, p=0.0, by_group=False, progress=False)
        assert none.draws[0].removed.n_heads == 0
        assert none.draws[0].model_minus.accuracy == 1.0  # F(M\{}) = F(M)
        assert none.draws[0].circuit_minus.accuracy == circuit_performance(lm, batch, means, c,
                                                                           progress=False).accuracy
        everything = completeness(lm, batch, means, c, n_draws=1, p=1.0, progress=False)
        assert everything.draws[0].removed.n_heads == c.n_heads
        (ablated,) = evaluate(lm, batch, means, [Ablation(keep=empty_circuit())], progress=False)
        assert torch.equal(everything.draws[0].circuit_minus.correct, ablated.correct)  # C\C keeps nothing
        for g, d in everything.groups.items():
            assert d.removed.groups[g] == c.groups[g] and d.removed.n_heads == len(c.groups[g])
            want = _hooked_logits(lm, batch, means, None, d.removed).argmax(-1)
            assert torch.equal(d.model_minus.predicted, want)
        draws = completeness(lm, batch, means, c, n_draws=6, seed=4, by_group=False, progress=False)
        sizes = [d.removed.n_heads for d in draws.draws]
        assert len(set(sizes)) > 1 and all(0 <= s <= c.n_heads for s in sizes)
        assert draws.score == pytest.approx(sum(d.score for d in draws.draws) / 6)
        assert set(draws.draw_std()) == {"circuit_minus", "model_minus", "score"}


class TestRandomCircuits:
    def test_sizes_indices_and_decoding_on_a_non_square_model(self):
        from transformers import LlamaConfig

        arch = arch_for(LlamaConfig(num_hidden_layers=3, num_attention_heads=5, hidden_size=40))
        like = {"value_fetcher": 15, "position_transmitter": 4, "position_detector": 2, "structure_reader": 0}
        c = random_circuit(arch, like, seed=0)
        assert {g: len(c.groups[g]) for g in GROUPS} == like
        # all 15 layer x head pairs: indices decoded as divmod(i, n_heads), not i // n_layers
        assert sorted(c.groups["value_fetcher"]) == [(layer, h) for layer in range(3) for h in range(5)]
        many = random_circuits(arch, like, n=12, seed=1)
        seen = {h for r in many for g in GROUPS for h in r.groups[g]}
        assert {layer for layer, _ in seen} == {0, 1, 2} and {h for _, h in seen} == {0, 1, 2, 3, 4}
        for r in many:
            for g in GROUPS:
                assert len(set(r.groups[g])) == len(r.groups[g])  # no repeats within a group
        assert len({tuple(r.groups["position_transmitter"]) for r in many}) > 1

    def test_deterministic_by_seed_and_keeps_positions(self, lm):
        c = _circuit()
        c.positions["structure_reader"] = "query_label"
        a, b = random_circuits(lm.arch, c, n=3, seed=9), random_circuits(lm.arch, c, n=3, seed=9)
        assert [r.groups for r in a] == [r.groups for r in b]
        assert a[0].positions == c.positions
        assert [r.groups for r in random_circuits(lm.arch, c, n=3, seed=10)] != [r.groups for r in a]

    def test_too_many_heads(self, lm):
        with pytest.raises(AblationError, match="cannot draw 16 distinct heads from 15"):
            random_circuit(lm.arch, {"value_fetcher": 16})

    def test_excluded_heads_are_never_drawn(self, lm):
        out = [(0, 0), (1, 3), (-1, 4)]
        drawn = random_circuits(lm.arch, {"value_fetcher": 12}, n=5, seed=2, exclude=out)
        allowed = {(layer, h) for layer in range(N_LAYERS) for h in range(N_HEADS)} - {(0, 0), (1, 3), (2, 4)}
        for r in drawn:  # 12 of the 12 allowed heads: exactly the allowed set, whatever the seed
            assert set(r.groups["value_fetcher"]) == allowed
        with pytest.raises(AblationError, match=r"cannot draw 13 distinct heads from 12 \(3 excluded\)"):
            random_circuit(lm.arch, {"value_fetcher": 13}, exclude=out)
        with pytest.raises(IndexError, match="head 7 out of range"):
            random_circuit(lm.arch, {"value_fetcher": 1}, exclude=[(0, 7)])


class TestExtendedCircuits:
    """A circuit with an extension group of ours is ablated by the same rule as the paper's."""

    def test_an_object_writer_group_keeps_its_heads_at_its_position(self, lm, batch, means):
        c = _circuit()
        e = c.with_group("object_writer", [(0, 2), (1, 4)])
        want = _hooked_logits(lm, batch, means, e)
        got = mean_ablated_logits(lm, batch, means, Ablation(keep=e))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        keep, plain = keep_mask(lm.arch, batch, Ablation(keep=e)), keep_mask(lm.arch, batch, Ablation(keep=c))
        B = batch["input_ids"].shape[0]
        added = keep & ~plain
        assert int(added.sum()) == 2 * B and bool(added[0, torch.arange(B), batch["prev_query_label_position"], 2].all())
        # the paper's circuit evaluated beside the extended one gives its own number
        ev_c, ev_e = evaluate(lm, batch, means, [Ablation(keep=c), Ablation(keep=e)], progress=False)
        assert torch.equal(ev_c.predicted, circuit_performance(lm, batch, means, c, progress=False).predicted)
        assert faithfulness(lm, batch, means, e, n_random=2, progress=False).to_json(n_resamples=20)[
            "group_sizes"]["object_writer"] == 2

    def test_random_circuits_like_an_extended_circuit_extend_the_paper_draws(self, lm):
        c = _circuit()
        e = c.with_group("object_writer", [(0, 2), (1, 4)], position="query_label")
        for rc, re in zip(random_circuits(lm.arch, c, n=4, seed=3), random_circuits(lm.arch, e, n=4, seed=3)):
            assert {g: re.groups[g] for g in GROUPS} == rc.groups
            assert len(re.groups["object_writer"]) == 2 and re.positions["object_writer"] == "query_label"
        assert len(random_circuit(lm.arch, {"object_writer": 3}).groups["object_writer"]) == 3

    def test_minimality_and_outside_heads_cover_extension_groups(self, lm, batch, means):
        e = _circuit().with_group("object_writer", [(0, 2), (1, 4)], position="query_label")
        res = minimality(lm, batch, means, e, groups=["object_writer"], progress=False)
        assert {h.group for h in res.heads} == {"object_writer"}
        assert res.pruned.group_names == e.group_names
        out = outside_at_positions(lm.arch, e, ["query_label"])
        inside = set(e.groups["position_detector"]) | set(e.groups["object_writer"])
        assert out.n_heads == N_LAYERS * N_HEADS - len(inside)


class TestOutsideAtPositions:
    def test_sites_are_the_heads_outside_each_groups_position(self, lm):
        c = _circuit()
        out = outside_at_positions(lm.arch, c)
        every = [(layer, h) for layer in range(N_LAYERS) for h in range(N_HEADS)]
        last = set(c.groups["value_fetcher"]) | set(c.groups["position_transmitter"])
        assert out.groups["value_fetcher"] == [h for h in every if h not in last]  # VF and PT share 'last'
        assert out.groups["position_transmitter"] == []
        assert out.groups["position_detector"] == [h for h in every if h not in set(c.groups["position_detector"])]
        assert out.groups["structure_reader"] == [h for h in every if h not in set(c.groups["structure_reader"])]
        only = outside_at_positions(lm.arch, c, ["query_label"])
        assert only.n_heads == N_LAYERS * N_HEADS - 2 and only.groups["position_detector"]
        with pytest.raises(AblationError, match="not positions of circuit"):
            outside_at_positions(lm.arch, c, ["first"])

    def test_a_circuit_of_every_head_leaves_nothing_to_ablate(self, lm, batch, means):
        every = [(layer, h) for layer in range(N_LAYERS) for h in range(N_HEADS)]
        c = Circuit("a", {g: list(every) for g in GROUPS})
        assert outside_at_positions(lm.arch, c).n_heads == 0
        res = evaluate(lm, batch, means, [Ablation(ablate=outside_at_positions(lm.arch, c))], progress=False)
        assert res[0].accuracy == 1.0

    def test_equals_the_hooked_reference(self, lm, batch, means):
        """Only non-circuit heads at the vital positions are replaced; all else keeps its value."""
        c = _circuit()
        out = outside_at_positions(lm.arch, c)
        got = mean_ablated_logits(lm, batch, means, Ablation(ablate=out))
        want = _hooked_logits(lm, batch, means, circuit=full_circuit(lm.arch), removed=out)
        assert torch.allclose(got, want, atol=1e-5)
        assert not torch.allclose(got, mean_ablated_logits(lm, batch, means, Ablation(keep=c)), atol=1e-3)

    def test_shortfall_by_position_rows(self, lm, batch, means):
        """F(M), the paper's F(C), each vital position alone, then all: each row equals its own
        ablation evaluated directly."""
        c = _circuit()
        rows = shortfall_by_position(lm, batch, means, c, progress=False)
        keys = ["last", "query_label", "prev_query_label"]
        assert [r["setting"] for r in rows] == ["F(M)", "F(C)", *keys, "all vital positions"]
        assert rows[0]["evaluation"].accuracy == 1.0 and rows[0]["heads_ablated"] is None
        outs = [outside_at_positions(lm.arch, c, [k]) for k in keys] + [outside_at_positions(lm.arch, c)]
        direct = evaluate(lm, batch, means, [Ablation(keep=c)] + [Ablation(ablate=o) for o in outs], progress=False)
        assert [r["evaluation"].accuracy for r in rows[1:]] == [e.accuracy for e in direct]
        assert [r["heads_ablated"] for r in rows[2:]] == [o.n_heads for o in outs]
        assert rows[-1]["heads_ablated"] == sum(r["heads_ablated"] for r in rows[2:5])


    def test_a_memo_carries_f_m_and_f_c_from_faithfulness_to_the_shortfall(self, lm, batch, means, monkeypatch):
        import entity_tracking.methods.ablation as A

        c, memo = _circuit(), {}
        faithfulness(lm, batch, means, c, n_random=2, progress=False, memo=memo)
        rows, real = [], P.Session.predict_rows
        monkeypatch.setattr(P.Session, "predict_rows", _counting(rows))
        got = shortfall_by_position(lm, batch, means, c, progress=False, memo=memo)
        assert sum(rows) == (len(got) - 2) * len(batch["input_ids"]), "F(M) and F(C) came from the memo"
        monkeypatch.setattr(P.Session, "predict_rows", real)
        plain = shortfall_by_position(lm, batch, means, c, progress=False)
        assert all(torch.equal(a["evaluation"].predicted, b["evaluation"].predicted) for a, b in zip(got, plain))

class TestNecessity:
    def test_group_ablated_everywhere_against_random_heads(self, lm, batch, means):
        c = _circuit()
        res = necessity(lm, batch, means, c, "value_fetcher", n_random=4, seed=1, progress=False)
        vf = Circuit("a", {"value_fetcher": c.groups["value_fetcher"]}, positions={"value_fetcher": ALL_POSITIONS})
        direct = evaluate(lm, batch, means, [Ablation(), Ablation(ablate=vf)], progress=False)
        assert res.full.accuracy == 1.0 and res.ablated.accuracy == direct[1].accuracy
        assert res.drop == pytest.approx(1.0 - direct[1].accuracy)
        assert len(res.random_any) == len(res.random_outside) == 4
        # the outside baseline equals ablating those very draws, none of which touches the circuit
        inside = {h for g in GROUPS for h in c.groups[g]}
        draws = random_circuits(lm.arch, vf, 4, 1, exclude=inside)
        assert all(not set(d.groups["value_fetcher"]) & inside for d in draws)
        again = evaluate(lm, batch, means, [Ablation(ablate=d) for d in draws], progress=False)
        assert [e.accuracy for e in res.random_outside] == [e.accuracy for e in again]
        r = res.random_drop("outside")
        assert V.far_more(res, "outside") == (res.drop > 2 * r + 0.1)
        assert V.far_more(res, "outside", factor=0.0, margin=-1.0)  # any drop beats a -1 bar
        assert V.is_necessary(res) == (V.far_more(res, "outside") and res.drop > res.random_drop("any"))
        assert V.necessity_json(res)["necessary"] == V.is_necessary(res)
        assert "necessary" not in res.to_json()  # the result holds measurements, the verdicts are verdicts'
        assert res.to_frame().to_dict("records") == [res.row()]
        row = res.row()
        assert row["heads"] == 3 and row["group ablated"] == res.ablated.accuracy
        assert res.to_json()["head_list"] == [list(h) for h in c.groups["value_fetcher"]]

    def test_effect_size_interval_over_prompts_and_draws(self):
        n = 40
        ev = lambda correct: Evaluation("x", torch.as_tensor(correct, dtype=torch.bool), torch.zeros(n, dtype=torch.long))
        full = ev([True] * n)
        ablated = ev([i % 4 == 0 for i in range(n)])  # 0.25
        same = [ev([i % 10 != 0 for i in range(n)])] * 2  # 0.9, twice
        spread = [ev([True] * n), ev([i % 5 != 0 for i in range(n)])]  # 1.0 and 0.8: mean 0.9
        a = NecessityResult("m", "value_fetcher", [(0, 0)], full, ablated, [], same)
        b = NecessityResult("m", "value_fetcher", [(0, 0)], full, ablated, [], spread)
        for r in (a, b):
            e = r.effect("outside", n_resamples=500)
            assert e.value == pytest.approx(r.drop - r.random_drop("outside")) and e.value == pytest.approx(0.65)
            assert e.low < e.value < e.high and e.low > 0
        # resampling the draws widens the interval when the draws disagree
        wa, wb = (r.effect(n_resamples=2000) for r in (a, b))
        assert wb.high - wb.low > wa.high - wa.low
        assert math.isnan(r.effect("any").value)  # no draws from the whole model
        with pytest.raises(ValueError, match="baseline must be"):
            r.effect("inside")

    def test_every_head_is_everything_ablated_and_leaves_no_outside(self, lm, batch, means):
        every = [(layer, h) for layer in range(N_LAYERS) for h in range(N_HEADS)]
        c = Circuit("a", {"value_fetcher": every})
        res = necessity(lm, batch, means, c, n_random=2, progress=False)
        nothing = evaluate(lm, batch, means, [Ablation(keep=empty_circuit())], progress=False)[0]
        assert res.ablated.accuracy == nothing.accuracy
        # every draw of 15 of 15 heads is the group itself; no head is left outside the circuit
        assert [e.accuracy for e in res.random_any] == [res.ablated.accuracy] * 2
        assert res.random_outside == [] and not V.far_more(res, "outside") and not V.is_necessary(res)
        assert math.isnan(res.random_drop("outside"))

    def test_errors(self, lm, batch, means):
        c = _circuit()
        with pytest.raises(AblationError, match="no structure_reader heads"):
            necessity(lm, batch, means, Circuit("a", {"value_fetcher": [(0, 1)]}), "structure_reader", progress=False)
        with pytest.raises(AblationError, match="unknown group 'mlp'"):
            necessity(lm, batch, means, c, "mlp", progress=False)
        with pytest.raises(ValueError, match="baseline must be"):
            necessity(lm, batch, means, c, n_random=1, progress=False).random_drop("inside")


class TestMinimality:
    def test_scores_and_pruned_circuit(self, lm, batch, means):
        c = _circuit()
        res = minimality(lm, batch, means, c, top_fraction=0.5, threshold=0.01, progress=False)
        assert {(h.group, h.head) for h in res.heads} == {(g, h) for g in GROUPS for h in c.groups[g]}
        for g in GROUPS:
            assert res.pair_accuracy[g].shape == (len(c.groups[g]),) * 2
            assert torch.equal(res.pair_accuracy[g], res.pair_accuracy[g].T)
            assert res.pruned.groups[g] == [h for h in c.groups[g] if res.scores[(g, h)] >= 0.01]
        for i, h in enumerate(res.heads):
            n = len(c.groups[h.group])
            assert len(h.removed) <= math.ceil(0.5 * n) and h.head not in h.removed
            assert set(h.removed) <= set(c.groups[h.group])
            if i % 3:
                continue  # the loop reference is slow: check a few heads
            # before/after are F(C\K) and F(C\(K+v)) with K's heads removed at the group's position
            k = Circuit("K", {h.group: h.removed})
            kv = Circuit("K", {h.group: h.removed + [h.head]})
            assert torch.equal(h.before.predicted, _hooked_logits(lm, batch, means, c, k).argmax(-1))
            assert torch.equal(h.after.predicted, _hooked_logits(lm, batch, means, c, kv).argmax(-1))
        assert res.pruned.meta["minimality"]["threshold"] == 0.01
        assert set(res.summary(n_resamples=20)) == set(res.scores)

    def test_pairwise_drop_picks_k(self, lm, batch, means):
        c = Circuit("a", {"value_fetcher": [(2, 4), (2, 1), (1, 3), (2, 0)]})
        res = minimality(lm, batch, means, c, top_fraction=1.0, threshold=-math.inf, progress=False)
        pair = res.pair_accuracy["value_fetcher"]
        hs = c.groups["value_fetcher"]
        for h in res.heads:
            v = hs.index(h.head)
            drops = {hs[u]: float(pair[u, u] - pair[u, v]) for u in range(4) if u != v}
            assert set(h.removed) == {u for u, d in drops.items() if d > 0}
        assert res.pruned.groups == c.groups  # threshold -inf keeps every head

    def test_pruner_for_discovery(self, lm, batch, means):
        c = _circuit()
        want = minimality(lm, batch, means, c, progress=False).pruned
        assert pruner(lm, batch, means, progress=False)(c).groups == want.groups

    def test_only_chosen_groups(self, lm, batch, means):
        c = _circuit()
        res = minimality(lm, batch, means, c, groups=["structure_reader"], threshold=math.inf, progress=False)
        assert [h.group for h in res.heads] == ["structure_reader"]
        assert res.pruned.groups["value_fetcher"] == c.groups["value_fetcher"]


    def test_records_f_of_c_and_keeps_the_candidates_when_it_is_not_above_chance(self, lm, batch, means):
        c = _circuit()
        res = minimality(lm, batch, means, c, threshold=math.inf, progress=False)  # prunes every head
        assert torch.equal(res.circuit_accuracy.correct, circuit_performance(lm, batch, means, c).correct)
        assert all(not res.pruned.groups[g] for g in GROUPS)
        n = res.circuit_accuracy.n
        for n_correct, boxes, measurable in [(n, 7, True), (0, 7, False), (n // 2, 2, False), (n // 2, 26, True)]:
            res.circuit_accuracy = Evaluation("F(C)", torch.arange(n) < n_correct, torch.zeros(n, dtype=torch.long))
            assert V.minimality_holds(res, boxes) is measurable, (n_correct, boxes)
            kept = V.chosen_circuit(res, boxes)
            assert kept.groups == (res.pruned.groups if measurable else c.groups)
            info = kept.meta["minimality"]
            assert info["measurable"] is measurable and kept.meta["pruned"] is measurable
            assert info["chance"] == pytest.approx(1 / boxes)
            assert info["circuit_accuracy"]["value"] == pytest.approx(n_correct / n)


class TestBootstrap:
    def test_contains_point_and_shrinks_with_more_examples(self):
        g = torch.Generator().manual_seed(0)
        widths = []
        for n in (40, 400, 4000):
            x = torch.rand(n, generator=g) < 0.6
            e = bootstrap(x[None], n_resamples=500, seed=0)
            assert e.low <= e.value <= e.high and e.value == pytest.approx(float(x.float().mean()))
            widths.append(e.high - e.low)
        assert widths[0] > widths[1] > widths[2] > 0

    def test_deterministic_paired_and_nan_safe(self):
        g = torch.Generator().manual_seed(1)
        full = torch.rand(200, generator=g) < 0.8
        circ = full & (torch.rand(200, generator=g) < 0.9)
        ratio = lambda a: a[1] / a[0]  # noqa: E731
        e1 = bootstrap(torch.stack([full, circ]), ratio, n_resamples=300, seed=3)
        e2 = bootstrap([full, circ], ratio, n_resamples=300, seed=3)
        assert e1 == e2 and e1.low <= e1.value <= e1.high <= 1.0  # paired: circ correct => full correct
        zero = bootstrap(torch.zeros(1, 5, dtype=torch.bool), lambda a: a[0] / a[0], n_resamples=10)
        assert math.isnan(zero.low) and math.isnan(zero.high)
        assert f"{e1:.2f}".startswith(f"{e1.value:.2f} [")

    def test_evaluations_have_intervals(self, lm, batch, means):
        res = faithfulness(lm, batch, means, _circuit(), n_random=2, progress=False)
        for key, est in res.summary(n_resamples=200).items():
            assert est.n == batch["input_ids"].shape[0]
            if not math.isnan(est.value):
                assert est.low <= est.value + 1e-9 and est.value <= est.high + 1e-9, key


class TestErrors:
    def test_head_outside_the_model(self, lm, batch, means):
        big = Circuit("big", {"value_fetcher": [(3, 0)]})
        with pytest.raises(AblationError, match=r"head \(3, 0\), outside this model's 3 layers x 5 heads"):
            evaluate(lm, batch, means, [Ablation(keep=big)], progress=False)

    def test_unknown_position(self, lm, batch, means):
        c = Circuit("c", {"value_fetcher": [(0, 0)]}, positions={"value_fetcher": "nowhere"})
        with pytest.raises(AblationError, match="no 'nowhere_position'"):
            evaluate(lm, batch, means, [Ablation(keep=c)], progress=False)

    def test_ablation_without_means(self, lm, batch):
        with pytest.raises(AblationError, match="MeanActivations"):
            evaluate(lm, batch, None, [Ablation(keep=_circuit())], progress=False)
