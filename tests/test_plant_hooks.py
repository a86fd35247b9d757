"""The planting trainer's o_proj hooks against the book's kernel (issue 29): the same interchange
and the same resample ablation, computed two independent ways, give the same logits."""

from __future__ import annotations

import pytest
import torch

from entity_tracking import task as D
from entity_tracking.config import ModelSpec
from entity_tracking.load import load_model
from entity_tracking.methods.planting import GroundTruth, interchange_logits, resample_ablated_logits
from entity_tracking.organism import plant as P


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    recipe = P.PlantRecipe(n_layers=4, n_heads=4, d_model=32, d_mlp=64, num_boxes=4, residual_init=1.0)
    from entity_tracking.model.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer()
    model = P.build_model(recipe, tok)
    d = tmp_path_factory.mktemp("planted")
    model.save_pretrained(d)
    tok.save_pretrained(str(d))
    lm = load_model(ModelSpec(name="planted", local_path=str(d)), verbose=False)
    lay, _ = P.layout(recipe.num_boxes, tok)
    records = D.make_desiderata(lm.tokenizer, "positional", 12, num_boxes=4, seed=3)
    return recipe, model, lm, lay, records


def test_the_layout_is_the_books_template(planted):
    recipe, model, lm, lay, records = planted
    pairs = P.pairs_from_records(lm.tokenizer, records, lay)
    enc = D.encode_prompts(lm.tokenizer, [r["base"] for r in records])
    assert torch.equal(enc["input_ids"], pairs.base_ids)
    assert torch.equal(enc["target"], pairs.answer)
    assert (enc["last_position"] == lay.last).all()
    from entity_tracking.methods.causal_model import interchange

    for v in ("position", "value"):
        want = [lm.tokenizer.convert_tokens_to_ids(interchange(r, v)) for r in records]
        assert pairs.cf[v].tolist() == want


def test_the_hooks_interchange_equals_the_kernels(planted):
    recipe, model, lm, lay, records = planted
    pairs = P.pairs_from_records(lm.tokenizer, records, lay)
    d_head = recipe.d_model // recipe.n_heads
    source_z, _ = P.record_z(model, pairs.source_ids, range(recipe.n_layers))
    for g, heads in recipe.designated().items():
        pos = P.GROUP_POSITION[g]
        take = P.node_mask(lay, recipe.n_layers, recipe.n_heads, P.group_nodes(heads, lay.position(pos)))
        with torch.no_grad():
            ours = P.patched_logits(model, pairs.base_ids, source_z, take, d_head).logits[:, lay.last]
            kernel = interchange_logits(lm, records, heads, pos)
            plain = model(input_ids=pairs.base_ids).logits[:, lay.last]
        torch.testing.assert_close(ours, kernel.to(ours.dtype), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ours, plain, atol=1e-4)  # the interchange did something


def test_the_hooks_resample_ablation_equals_the_kernels(planted):
    recipe, model, lm, lay, records = planted
    pairs = P.pairs_from_records(lm.tokenizer, records, lay)
    truth = GroundTruth(recipe.designated(), dict(P.GROUP_POSITION), recipe.n_layers, recipe.n_heads)
    d_head = recipe.d_model // recipe.n_heads
    source_z, _ = P.record_z(model, pairs.source_ids, range(recipe.n_layers))
    # whole heads outside the circuit, at every position: the kernel's resample ablation
    take = {l: torch.zeros(lay.length, recipe.n_heads, dtype=torch.bool) for l in range(recipe.n_layers)}
    for l, h in truth.outside():
        take[l][:, h] = True
    with torch.no_grad():
        ours = P.patched_logits(model, pairs.base_ids, source_z, take, d_head).logits[:, lay.last]
        kernel, _ = resample_ablated_logits(lm, records, truth.outside())
    torch.testing.assert_close(ours, kernel.to(ours.dtype), atol=1e-5, rtol=1e-5)


def test_nothing_taken_changes_nothing_and_everything_taken_is_the_source_attention(planted):
    recipe, model, lm, lay, records = planted
    pairs = P.pairs_from_records(lm.tokenizer, records, lay)
    d_head = recipe.d_model // recipe.n_heads
    source_z, _ = P.record_z(model, pairs.source_ids, range(recipe.n_layers))
    none = {l: torch.zeros(lay.length, recipe.n_heads, dtype=torch.bool) for l in range(recipe.n_layers)}
    with torch.no_grad():
        same = P.patched_logits(model, pairs.base_ids, source_z, none, d_head).logits
        plain = model(input_ids=pairs.base_ids).logits
        # the source's own head outputs written into the source run: the source run
        src = P.patched_logits(model, pairs.source_ids, source_z, {l: ~m for l, m in none.items()}, d_head).logits
        src_plain = model(input_ids=pairs.source_ids).logits
    torch.testing.assert_close(same, plain)
    torch.testing.assert_close(src, src_plain)


def test_fine_tuning_some_heads_changes_those_heads_only():
    from entity_tracking.model.tokenizer import build_word_tokenizer

    recipe = P.PlantRecipe(n_layers=4, n_heads=4, d_model=32, d_mlp=64, num_boxes=4, residual_init=1.0, batch_size=8)
    model = P.build_model(recipe, build_word_tokenizer())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    P.train_heads_only(model, recipe, [(2, 1)], steps=3, attention={(2, 1): "position_transmitter"})
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"model.layers.2.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    dh = recipe.d_model // recipe.n_heads
    for p in ("q_proj", "k_proj", "v_proj"):
        k = f"model.layers.2.self_attn.{p}.weight"
        diff = (before[k] != after[k]).any(1)
        assert diff[dh:2 * dh].any() and not diff[:dh].any() and not diff[2 * dh:].any()
    k = "model.layers.2.self_attn.o_proj.weight"
    diff = (before[k] != after[k]).any(0)
    assert diff[dh:2 * dh].any() and not diff[:dh].any() and not diff[2 * dh:].any()
