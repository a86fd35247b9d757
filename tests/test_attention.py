"""Attention patterns: a head's output at a position is its pattern applied to its values."""

from __future__ import annotations

import pytest
import torch

from entity_tracking import task as D
from entity_tracking.methods.attention import attention_patterns
from entity_tracking.config import ModelSpec, TinySpec
from entity_tracking.model.tiny import build_tiny_model
from entity_tracking.load import load_model
from entity_tracking.intervene.patching import cache_activations


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def lm(request, tmp_path_factory):
    d = build_tiny_model(TinySpec(n_layers=2, n_heads=4, n_kv_heads=request.param, d_model=64, d_mlp=96, seed=1),
                         tmp_path_factory.mktemp("att") / "m")
    return load_model(ModelSpec(name="m", local_path=str(d)), verbose=False)


def test_pattern_reproduces_the_head_output(lm):
    batch = D.encode_prompts(lm.tokenizer, D.make_eval_prompts(lm.tokenizer, 6, num_boxes=3, seed=3))
    heads = [(0, 1), (1, 3)]
    q = batch["query_label_position"]
    pat = attention_patterns(lm, batch, heads, q)
    cache = cache_activations(lm, batch, sites=("z", "v"))
    rows = torch.arange(q.shape[0])
    for i, (layer, head) in enumerate(heads):
        v = lm.arch.expand_kv(cache["v", layer])[:, :, head]  # [batch, seq, d_head]
        z = cache["z", layer][rows, q, head]  # [batch, d_head]
        assert torch.allclose(torch.einsum("bs,bsd->bd", pat[i], v), z, atol=1e-5)


def test_rows_are_causal_distributions_and_the_model_is_restored(lm):
    batch = D.encode_prompts(lm.tokenizer, D.make_eval_prompts(lm.tokenizer, 4, num_boxes=3, seed=0))
    q = batch["query_label_position"]
    before = lm.hf.config._attn_implementation
    pat = attention_patterns(lm, batch, [(1, 0)], q)[0]
    assert torch.allclose(pat.sum(-1), torch.ones(4), atol=1e-5)
    after_query = torch.arange(pat.shape[1])[None, :] > q[:, None]
    assert float(pat[after_query].abs().max()) == 0.0
    assert lm.hf.config._attn_implementation == before


def test_bad_head_is_named(lm):
    batch = D.encode_prompts(lm.tokenizer, D.make_eval_prompts(lm.tokenizer, 2, num_boxes=3, seed=0))
    with pytest.raises(IndexError, match="query head 9 out of range"):
        attention_patterns(lm, batch, [(0, 9)], batch["last_position"])


def test_mass_by_role_partitions_the_pattern(lm):
    from entity_tracking.methods.attention import ROLES, mass_by_role

    prompts = D.make_eval_prompts(lm.tokenizer, 6, num_boxes=3, seed=2)
    batch = D.encode_prompts(lm.tokenizer, prompts)
    qi = torch.tensor([p["query_index"] for p in prompts])
    pat = attention_patterns(lm, batch, [(1, 2)], batch["last_position"])[0]
    roles = mass_by_role(pat, batch, qi)
    assert set(roles) == set(ROLES) and abs(sum(roles.values()) - 1) < 1e-5
    # a pattern that is all on the correct object is read as such
    onehot = torch.zeros_like(pat)
    onehot[torch.arange(6), batch["object_positions"][torch.arange(6), qi]] = 1
    assert mass_by_role(onehot, batch, qi)["correct object"] == pytest.approx(1.0)


def test_explorer_describes_a_head_and_stays_silent_in_batch_runs(lm, monkeypatch):
    from entity_tracking.methods.attention import BATCH_ENV, ROLES, describe_head, explorer
    from entity_tracking.methods.circuit import Circuit

    prompts = D.make_eval_prompts(lm.tokenizer, 4, num_boxes=3, seed=0)
    batch = D.encode_prompts(lm.tokenizer, prompts)
    qi = torch.tensor([p["query_index"] for p in prompts])
    scores = {g: [[-0.5 * (l + h) for h in range(lm.arch.n_heads)] for l in range(lm.arch.n_layers)]
              for g in ("value_fetcher", "position_transmitter", "position_detector", "structure_reader")}
    c = Circuit("m", {"value_fetcher": [(1, 1)]}, scores=scores)
    text = describe_head(lm, c, batch, qi, "value_fetcher", 1, 1)
    assert "head 1.1: score -1.0000 (in the circuit)" in text and all(r in text for r in ROLES)
    assert "(not in the circuit)" in describe_head(lm, c, batch, qi, "value_fetcher", 0, 1)
    monkeypatch.setenv(BATCH_ENV, "1")
    assert explorer(lm, c, batch, qi) is None
