"""Activation patching kernels (entity_tracking.intervene.patching) on tiny random models built offline.

Grouped by behaviour: patching with a run's own activations changes nothing; patching every
head from the corrupt run reproduces the corrupt run; per-example positions land where asked;
GQA kernels equal those of the multi-head twin (same weights, kv heads repeated); the metrics;
bad input fails naming the problem.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from entity_tracking import task as D
from entity_tracking.intervene import patching as P
from entity_tracking.model.arch import arch_for
from entity_tracking.config import ModelSpec, TinySpec
from entity_tracking.model.tiny import build_tiny_model
from entity_tracking.load import load_model
from helpers import mha_twin, sharpen

SPEC_GQA = TinySpec(family="llama", n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, d_mlp=96, seed=11)
N_EX = 6


pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("patching")
    gqa = build_tiny_model(SPEC_GQA, root / "gqa")
    return {"gqa": gqa, "mha": mha_twin(gqa, root / "mha")}


def _load(path: Path):
    return sharpen(load_model(ModelSpec(name=path.name, local_path=str(path)), verbose=False))


@pytest.fixture(scope="module")
def lm(dirs):
    return _load(dirs["gqa"])


@pytest.fixture(scope="module")
def twin(dirs):
    return _load(dirs["mha"])


@pytest.fixture(scope="module")
def enc(lm):
    pairs = D.make_path_patching_pairs(lm.tokenizer, N_EX, 3, seed=1)
    return D.encode_pairs(lm.tokenizer, pairs, padding_side="right")


def _hf_last_logits(lm, ids):
    with torch.no_grad():
        return lm.hf(input_ids=ids).logits[:, -1]


# --------------------------------------------------------------------------------------------


class TestCleanRuns:
    def test_last_logits_match_the_model_in_any_chunking(self, lm, enc):
        ids = enc["base"]["input_ids"]
        want = _hf_last_logits(lm, ids)
        for bs in (2, 4, 100):
            torch.testing.assert_close(P.last_logits(lm, enc["base"], batch_size=bs), want, atol=1e-5, rtol=1e-5)

    def test_cache_shapes(self, lm, enc):
        a = lm.arch
        B, S = enc["base"]["input_ids"].shape
        c = P.cache_activations(lm, enc["base"], sites=P.SITES, batch_size=4)
        assert c["z", 1].shape == c["q", 0].shape == (B, S, a.n_heads, a.d_head)
        assert c["k", 1].shape == c["v", 0].shape == (B, S, a.n_kv_heads, a.d_head)
        assert c["resid_pre", 0].shape == c["attn_out", 1].shape == c["resid_post", 1].shape == (B, S, a.d_model)
        at = P.cache_activations(lm, enc["base"], sites=("z",), positions=enc["base"]["query_label_position"])
        b = torch.arange(B)
        torch.testing.assert_close(at["z", 1][:, 0], c["z", 1][b, enc["base"]["query_label_position"]])
        # the residual stream bookkeeping: resid_post(l) = resid_pre(l + 1)
        torch.testing.assert_close(c["resid_post", 0], c["resid_pre", 1])


    def test_a_run_without_logits_stops_early_and_records_the_same(self, lm, enc):
        """Fast path: with ``logits=None`` the forward pass stops after the last recorded site;
        the records equal those of a run through the whole model, with and without patches."""
        b = enc["base"]
        rec = [("z", 0), ("resid_post", 0), ("q", 1)]
        patch = P.HeadPatch("z", 0, [1], torch.zeros(len(b["input_ids"]), 1, 1, lm.arch.d_head), b["last_position"])
        calls = []
        hook = lm.hf.model.norm.register_forward_hook(lambda *a: calls.append(1))  # the final norm
        try:
            for patches in ((), (patch,)):
                full = P.run(P.Session(lm, b, batch_size=4), patches, rec)
                n = len(calls)
                early = P.run(P.Session(lm, b, batch_size=4), patches, rec, logits=None)
                assert len(calls) == n, "the run without logits went through the final norm"
                assert early.logits is None
                for key in full.cache.keys():
                    assert torch.equal(early.cache[key], full.cache[key]), key
        finally:
            hook.remove()


class TestIdentityPatches:
    @pytest.mark.parametrize("site", ["z", "q", "k", "v"])
    def test_patching_own_clean_activation_changes_nothing(self, lm, enc, site):
        base = enc["base"]
        clean = P.last_logits(lm, base)
        cache = P.cache_activations(lm, base, sites=(site,))
        pos = base["query_label_position"]
        patches = [P.patch_from_cache(cache, site, l, None, pos) for l in range(lm.arch.n_layers)]
        patches.append(P.patch_from_cache(cache, site, 1, [1], None))  # every position of one head
        torch.testing.assert_close(P.last_logits(lm, base, patches), clean, atol=1e-6, rtol=1e-6)

    def test_every_head_from_the_corrupt_run_reproduces_it(self, lm, enc):
        """Base and corrupt prompts end with the same tokens ("... contains the"), so with every
        head's output taken from the corrupt run the residual stream at the last position is the
        corrupt run's (embedding + heads + MLPs of the same inputs)."""
        base, source = enc["base"], enc["source"]
        assert torch.equal(base["input_ids"][:, -1], source["input_ids"][:, -1])
        corrupt_logits = P.last_logits(lm, source)
        cache = P.cache_activations(lm, source, sites=("z",))
        every = [P.patch_from_cache(cache, "z", l, None, None) for l in range(lm.arch.n_layers)]
        torch.testing.assert_close(P.last_logits(lm, base, every), corrupt_logits, atol=1e-5, rtol=1e-5)
        last = [P.patch_from_cache(cache, "z", l, None, base["last_position"], source["last_position"])
                for l in range(lm.arch.n_layers)]
        torch.testing.assert_close(P.last_logits(lm, base, last), corrupt_logits, atol=1e-5, rtol=1e-5)
        assert (P.last_logits(lm, base) - corrupt_logits).abs().max() > 1e-2  # it did change something


class TestWrites:
    """The write objects, each against an oracle: a blend at its two ends is the base run and
    the patched run; mean ablation with means of the prompt itself is the identity; a run from
    a cached prefix is the whole run."""

    def test_blend_at_mask_one_is_the_base_run_and_at_zero_the_patch(self, lm, enc):
        base, source = enc["base"], enc["source"]
        n = len(base["input_ids"])
        src = P.cache_activations(lm, source, sites=("z",), positions=source["query_label_position"])
        vals = src["z", 0][:, :, [0, 3]]  # layer 0: reaches the last token through layer 1
        pos = base["query_label_position"]
        def blended(m):
            return P.run(lm, batch=base, writes=[P.Blend("z", 0, [0, 3], vals, pos, torch.full((2,), m))]).logits
        torch.testing.assert_close(blended(1.0), P.last_logits(lm, base), atol=0, rtol=0)
        patched = P.last_logits(lm, base, [P.HeadPatch("z", 0, [0, 3], vals, pos)])
        torch.testing.assert_close(blended(0.0), patched, atol=0, rtol=0)
        assert (patched - P.last_logits(lm, base)).abs().max() > 1e-3  # the two ends differ
        # differentiable in the mask, with grad=True
        m = torch.full((2,), 0.5, requires_grad=True)
        out = P.run(lm, batch=base, writes=[P.Blend("z", 0, [0, 3], vals, pos, m)], grad=True).logits
        out[torch.arange(n), enc["target"]].sum().backward()
        assert m.grad is not None and m.grad.abs().sum() > 0
        with pytest.raises(ValueError, match="one entry per head"):
            P.run(lm, batch=base, writes=[P.Blend("z", 0, [0, 3], vals, pos, torch.ones(3))])

    def test_mean_of_the_prompt_itself_changes_nothing(self, lm, enc):
        one = {k: v[:1] for k, v in enc["base"].items()}
        z = P.cache_activations(lm, one, sites=("z",))
        S = one["input_ids"].shape[1]
        keep = torch.zeros(1, S, lm.arch.n_heads, dtype=torch.bool)
        writes = [P.Mean(l, keep, z["z", l][0]) for l in range(lm.arch.n_layers)]
        torch.testing.assert_close(P.run(lm, writes, batch=one, logits="all").logits,
                                   P.run(lm, batch=one, logits="all").logits, atol=1e-6, rtol=0)
        # other means do change it, and only where keep is False
        other = [P.Mean(l, keep, torch.zeros_like(z["z", l][0])) for l in range(lm.arch.n_layers)]
        assert (P.run(lm, other, batch=one).logits - P.run(lm, batch=one).logits).abs().max() > 1e-3
        kept = [P.Mean(l, ~keep, torch.zeros_like(z["z", l][0])) for l in range(lm.arch.n_layers)]
        assert torch.equal(P.run(lm, kept, batch=one).logits, P.run(lm, batch=one).logits)

    def test_a_cached_session_runs_what_the_uncached_oracle_runs(self, lm, enc):
        """A cached session starts a head-writing run late, from the prompts' clean keys and values
        (made on first use); its logits are the whole run's (to float32 round-off: MKL's AVX2 path
        differs by a few ulps between shapes), and so are those of a run of some of its rows."""
        base, source = enc["base"], enc["source"]
        src = P.cache_activations(lm, source, sites=("z",), positions=source["query_label_position"])
        patch = P.HeadPatch("z", 1, None, src["z", 1], base["query_label_position"])
        seq = base["input_ids"].shape[1]
        session = P.Session(lm, base, batch_size=4, cached=True)
        whole = P.run(lm, [patch], batch=base).logits
        torch.testing.assert_close(P.run(session, [patch]).logits, whole, atol=1e-5, rtol=1e-5)
        assert session.prefix is not None and session.prefix.start == seq - 2
        rows = torch.tensor([3, 0, 5])
        torch.testing.assert_close(P.run(session.rows(rows), [patch.rows(rows)]).logits, whole[rows], atol=1e-5, rtol=1e-5)
        assert P.Session(lm, base).prefix is None  # uncached: nothing is kept
        with pytest.raises(ValueError, match="without batch="):
            P.run(session, [patch], batch=base)
        with pytest.raises(ValueError, match="needs the prompts"):
            P.run(lm, [patch])
        with pytest.raises(ValueError, match="prefix returns last-position logits only"):
            P._execute(lm, P.as_batch(base), [patch], [("z", 0)], prefix=session.prefix)

    def test_the_kernel_takes_at_most_eight_parameters(self):
        import inspect

        assert len(inspect.signature(P.run).parameters) <= 8

    def test_a_residual_write_skips_the_blocks_below_it_from_the_kept_clean_run(self, lm, enc):
        base, source = enc["base"], enc["source"]
        src = P.cache_activations(lm, source, sites=("resid_post",), layers=[1])["resid_post", 1]
        at = base["query_label_position"][:, None]
        write = P.ResidPatch("resid_post", 1, src[torch.arange(len(at))[:, None], at], at)
        session = P.Session(lm, base, batch_size=4, cached=True)
        session.clean([("resid_post", 1)])
        calls = []
        hook = lm.hf.model.layers[0].mlp.register_forward_hook(lambda *a: calls.append(1))
        try:
            fast = P.run(session, [write]).logits
        finally:
            hook.remove()
        assert not calls, "block 0's MLP ran although the clean run's output of block 1 was kept"
        torch.testing.assert_close(fast, P.run(lm, [write], batch=base).logits, atol=1e-5, rtol=1e-5)

    def test_a_tiled_session_runs_each_row_k_times_from_the_clean_run(self, lm, enc):
        base = enc["base"]
        n, seq = base["input_ids"].shape
        rows, k = torch.tensor([1, 4]), 3
        at = torch.full((len(rows) * k, 1), seq - 3, dtype=torch.long)
        values = torch.randn(len(rows) * k, 1, 2, lm.arch.d_head, generator=torch.Generator().manual_seed(0))
        write = P.HeadPatch("v", 1, [0, 1], values, at)
        tiled = P.run(P.Session(lm, base, batch_size=4).rows(rows).tile(k), [write]).logits
        oracle = P.run(lm, [write], batch=P.Session(lm, base).rows(rows.repeat_interleave(k)).batch).logits
        torch.testing.assert_close(tiled, oracle, atol=1e-5, rtol=1e-5)


class TestPositions:
    def test_per_example_positions_land_where_asked(self, lm, enc):
        base, source = enc["base"], enc["source"]
        B = base["input_ids"].shape[0]
        src = P.cache_activations(lm, source, sites=("z", "v"))
        bpos = base["prev_query_label_position"]
        spos = source["corrupt_label_position"]
        assert not torch.equal(bpos, spos)  # the positions really differ per example
        patch = P.patch_from_cache(src, "z", 0, [2], bpos, spos)
        res = P.run(lm, [patch], [("z", 0)], batch=base)
        clean = P.cache_activations(lm, base, sites=("z",))
        want = clean["z", 0].clone()
        b = torch.arange(B)
        want[b, bpos, 2] = src["z", 0][b, spos, 2]
        torch.testing.assert_close(res.cache["z", 0], want)
        # and it reaches the output
        assert (res.logits - P.last_logits(lm, base)).abs().max() > 1e-4

    def test_several_positions_per_example(self, lm, enc):
        base = enc["base"]
        pos = torch.stack([base["query_label_position"], base["last_position"]], 1)  # [batch, 2]
        zeros = torch.zeros(pos.shape[0], 2, 1, lm.arch.d_head)
        res = P.run(lm, [P.HeadPatch("q", 1, [3], zeros, pos)], [("q", 1)], batch=base)
        b = torch.arange(pos.shape[0])[:, None]
        assert res.cache["q", 1][b, pos, 3].abs().max() == 0
        assert res.cache["q", 1][:, 0, 3].abs().max() > 0


class TestGQA:
    def test_site_heads_map_query_heads_to_kv_heads(self, lm):
        a = lm.arch
        assert P.site_heads(a, "q", [3, 1]) == [3, 1]
        assert P.site_heads(a, "v", [0, 1, 3]) == [0, 1] == [a.kv_head(0), a.kv_head(3)]

    def test_head_output_patching_equals_the_mha_twin(self, lm, twin, enc):
        outs = []
        for m in (lm, twin):
            src = P.cache_activations(m, enc["source"], sites=("z",))
            p = P.patch_from_cache(src, "z", 0, [1, 2], enc["base"]["query_label_position"],
                                   enc["source"]["query_label_position"])
            outs.append(P.last_logits(m, enc["base"], [p]))
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)

    def test_query_patching_equals_the_mha_twin(self, lm, twin, enc):
        outs = []
        for m in (lm, twin):
            src = P.cache_activations(m, enc["source"], sites=("q",))
            p = P.patch_from_cache(src, "q", 1, [0, 3], enc["base"]["last_position"], enc["source"]["last_position"])
            outs.append(P.last_logits(m, enc["base"], [p]))
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)

    def test_value_of_a_query_head_is_its_kv_group(self, lm, twin, enc):
        """GQA: patching query head 3's value patches kv head 1, i.e. query heads 2 and 3 of the twin."""
        base, source = enc["base"], enc["source"]
        pos, spos = base["query_label_position"], source["query_label_position"]
        src = P.cache_activations(lm, source, sites=("v",))
        got = P.last_logits(lm, base, [P.patch_from_cache(src, "v", 0, P.site_heads(lm.arch, "v", [3]), pos, spos)])
        tsrc = P.cache_activations(twin, source, sites=("v",))
        group = list(lm.arch.query_heads(lm.arch.kv_head(3)))
        assert group == [2, 3]
        want = P.last_logits(twin, base, [P.patch_from_cache(tsrc, "v", 0, group, pos, spos)])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        only3 = P.last_logits(twin, base, [P.patch_from_cache(tsrc, "v", 0, [3], pos, spos)])
        assert (only3 - want).abs().max() > 1e-4  # one head of the group alone is a different patch


class TestMetrics:
    def test_target_probs_and_accuracy(self):
        logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
        torch.testing.assert_close(P.target_probs(logits, torch.tensor([1, 0])),
                                   torch.tensor([0.5, torch.tensor(2.0).exp() / (1 + torch.tensor(2.0).exp())]))
        assert P.accuracy(logits, torch.tensor([1, 0])) == 0.5
        with pytest.raises(IndexError, match="target ids"):
            P.target_probs(logits, torch.tensor([0, 2]))


class TestErrors:
    def test_position_out_of_range_names_it_and_the_length(self, lm, enc):
        base = enc["base"]
        S = base["input_ids"].shape[1]
        bad = base["last_position"].clone()
        bad[2] = S + 3
        vals = torch.zeros(bad.shape[0], 1, 1, lm.arch.d_head)
        with pytest.raises(IndexError, match=rf"position {S + 3} \(example 2, z patch at layer 0\) is out of range for sequence length {S}"):
            P.last_logits(lm, base, [P.HeadPatch("z", 0, [0], vals, bad)])
        with pytest.raises(IndexError, match=r"-1 .*out of range.*does not have"):
            P.cache_activations(lm, base, positions=torch.full_like(bad, -1))

    def test_head_out_of_range(self, lm, enc):
        vals = torch.zeros(N_EX, 1, 1, lm.arch.d_head)
        pos = enc["base"]["last_position"]
        with pytest.raises(IndexError, match="query head 4 out of range: the model has 4"):
            P.last_logits(lm, enc["base"], [P.HeadPatch("z", 0, [4], vals, pos)])
        with pytest.raises(IndexError, match="key/value head 2 out of range: the model has 2"):
            P.last_logits(lm, enc["base"], [P.HeadPatch("v", 0, [2], vals, pos)])
        with pytest.raises(IndexError, match="query head 9"):
            P.site_heads(lm.arch, "v", [9])

    def test_bad_layer_site_and_value_shape(self, lm, enc):
        pos = enc["base"]["last_position"]
        vals = torch.zeros(N_EX, 1, 1, lm.arch.d_head)
        with pytest.raises(IndexError, match="layer 5 out of range"):
            P.last_logits(lm, enc["base"], [P.HeadPatch("z", 5, [0], vals, pos)])
        with pytest.raises(ValueError, match="cannot patch site 'resid_pre'"):
            P.last_logits(lm, enc["base"], [P.HeadPatch("resid_pre", 0, [0], vals, pos)])
        with pytest.raises(ValueError, match=r"values must be .*\[6, 1, 2, 16\]"):
            P.last_logits(lm, enc["base"], [P.HeadPatch("z", 0, [0, 1], vals, pos)])

    def test_padding_positions_and_unequal_lengths(self, lm):
        ids = torch.tensor([[1, 5, 6, 7], [1, 5, 6, 0]])
        mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
        batch = {"input_ids": ids, "attention_mask": mask}
        assert P.as_batch(batch)["last_position"].tolist() == [3, 2]
        with pytest.raises(IndexError, match="padding position"):
            P.cache_activations(lm, batch, positions=torch.tensor([3, 3]))
        with pytest.raises(ValueError, match=r"unequal lengths \[3, 4\]"):
            P.check_unpadded(P.as_batch(batch))
