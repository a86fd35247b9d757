"""The positional organism's recipe (issue 17): context resampling is an option that leaves the
default recipes (and their cached builds' hashes) untouched, replaces exactly the context's head
outputs by another row's, and trains."""

from __future__ import annotations

import random

import pytest
import torch

from entity_tracking import organism as O
from entity_tracking.config import OrganismSpec, PositionalSpec, load_profile
from entity_tracking.model.arch import arch_for
from entity_tracking.model.tokenizer import build_word_tokenizer
from entity_tracking.organism.curriculum import Batch

TINY = dict(n_layers=2, n_heads=2, d_model=32, d_mlp=64, batch_size=8, queries_per_context=2,
            stage_max_steps=3, final_max_steps=3, seed=0)

#: The recipe hashes of the default and ci profiles' organism builds (cached builds under results/
#: carry them): they must not move by accident, e.g. when an option is added. They moved on
#: purpose twice: in session 11 the default full fine-tune went to 900 steps and its LoRA to 300
#: (both had trained 800: 0bf7ceae418481ea, 4ca3286ad855626d), and for issue 28 no training stream
#: holds a held-out arithmetic problem any more (RECIPE_VERSION 2, FINETUNE_VERSION 2; before:
#: default 80498d868ee1a9da / c6c4f1a3d306e668 / 93575d66af0080c3 / c8bdf523ae40f04c, ci
#: 7bfd3b5f983a5917 / 7a476d5e6afa49c6 / 02fa7c5de9327502 / f0b34d4b7e208baf).
HASHES_BEFORE = {
    "default": {"organism": "50c4cea30d89c97b", "organism-lora": "411e571ca72c0087",
                "organism-full": "05e6bc24720fc501", "organism-control": "020c72d415e6460d"},
    "ci": {"tiny": "44d1e17bcd3b64d6", "tiny-lora": "214781b0bb9cd4a9",
           "tiny-full": "c11724ef9e7d1c0c", "tiny-control": "4ab811c253ba1bd5"},
}


@pytest.mark.parametrize("profile", sorted(HASHES_BEFORE))
def test_default_recipes_keep_their_hashes(profile):
    models = {m.name: m for m in load_profile(profile).models}
    got = {name: O.recipe_hash(models[name].organism, models[name].build) for name in HASHES_BEFORE[profile]}
    assert got == HASHES_BEFORE[profile]


def test_positional_option_enters_the_hash():
    plain = OrganismSpec(**TINY)
    pos = OrganismSpec(**TINY, positional=PositionalSpec())
    assert O.recipe_hash(pos) != O.recipe_hash(plain)
    assert O.recipe_hash(pos) != O.recipe_hash(OrganismSpec(**TINY, positional=PositionalSpec(mean_share=0.5)))
    with pytest.raises(ValueError, match="min_boxes"):
        PositionalSpec(min_boxes=5, max_boxes=3)


def test_context_length_ends_at_the_first_query_period():
    vocab = build_word_tokenizer().get_vocab()
    for fmt in O.STAGES:
        for n in (2, 5):
            b = O.make_batch(random.Random(0), vocab, fmt, 4, (n, n), queries=1)
            k = O.context_length(fmt, n)
            assert all(int(row[k - 1]) == vocab["."] for row in b.input_ids)
            assert all(vocab["."] not in row[: k - 1].tolist() for row in b.input_ids)


def tiny_model(**kw):
    return O.train_organism(OrganismSpec(**{**TINY, **kw}), progress=False, max_total_steps=0).model


def paper_batch(contexts_alike: bool, n: int = 3, rows: int = 6, seed: int = 0) -> Batch:
    """Rows of ``n`` boxes; with ``contexts_alike`` every row has the first row's context (its
    queries still differ), else each row has its own."""
    vocab = build_word_tokenizer().get_vocab()
    b = O.make_batch(random.Random(seed), vocab, "paper", rows, (n, n), queries=3)
    if contexts_alike:
        k = O.context_length("paper", n)
        b.input_ids[:, :k] = b.input_ids[0, :k]
    return b


def logits(model, batch, n_positions=None, source=None, mean=False):
    with torch.no_grad():
        if n_positions is None:
            return model(input_ids=batch.input_ids).logits
        src = None if mean else source
        with O.resampled_context(model, n_positions, src):
            return model(input_ids=batch.input_ids).logits


@pytest.mark.parametrize("mean", [False, True])
def test_resampling_rows_that_share_their_context_changes_nothing(mean):
    """Oracle: the context's head outputs only depend on the context (causal attention), so
    taking them from another row with the same context -- or the mean of such rows -- leaves
    every logit as it was, even though the queries differ."""
    model = tiny_model()
    b = paper_batch(contexts_alike=True)
    k = O.context_length("paper", 3)
    src = O.derangement(len(b.input_ids), random.Random(0))
    assert not torch.equal(b.input_ids, b.input_ids[src])  # the rows do differ (queries)
    torch.testing.assert_close(logits(model, b, k, src, mean), logits(model, b), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mean", [False, True])
def test_resampling_rows_with_their_own_contexts_changes_the_answers(mean):
    model = tiny_model(residual_init=1.0)
    b = paper_batch(contexts_alike=False)
    k = O.context_length("paper", 3)
    src = O.derangement(len(b.input_ids), random.Random(0))
    clean, res = logits(model, b), logits(model, b, k, src, mean)
    assert (clean - res).abs().max() > 1e-3
    # identical batches: the loss itself is unchanged
    same = Batch(b.input_ids[:1].repeat(6, 1), b.labels[:1].repeat(6, 1))
    l_clean = torch.nn.functional.cross_entropy(logits(model, same)[:, :-1].flatten(0, 1), same.labels[:, 1:].flatten())
    l_res = torch.nn.functional.cross_entropy(logits(model, same, k, src, mean)[:, :-1].flatten(0, 1),
                                              same.labels[:, 1:].flatten())
    torch.testing.assert_close(l_res, l_clean, rtol=0, atol=1e-6)


def test_resampling_takes_the_other_rows_context_and_stops_on_exit():
    """Row i's context positions in layer 0's o_proj input are row source[i]'s; hooks are removed
    when the context manager exits."""
    model = tiny_model(residual_init=1.0)
    b = paper_batch(contexts_alike=False)
    k = O.context_length("paper", 3)
    src = O.derangement(len(b.input_ids), random.Random(1))
    assert not torch.equal(src, torch.arange(len(src)))
    seen = []
    o_proj = arch_for(model).module(model, "o_proj", 0)
    h = o_proj.register_forward_hook(lambda m, a, out: seen.append(a[0].clone()))  # the input o_proj computed with
    logits(model, b)
    logits(model, b, k, src)
    h.remove()
    clean, res = seen
    torch.testing.assert_close(res[:, :k], clean[src, :k])
    torch.testing.assert_close(res[:, k:], clean[:, k:])  # layer 0 sees no resampled input yet
    torch.testing.assert_close(logits(model, b), logits(model, b))  # no hook left behind


def test_answer_consistency_is_zero_only_for_equal_answers():
    b = paper_batch(contexts_alike=False)
    torch.manual_seed(0)
    a = torch.randn(*b.input_ids.shape, 50)
    assert float(O.answer_consistency(a, a, b.labels)) == pytest.approx(0.0, abs=1e-6)
    assert float(O.answer_consistency(a, torch.randn_like(a), b.labels)) > 0.1


@pytest.mark.parametrize("pos", [PositionalSpec(min_boxes=2, max_boxes=4),
                                 PositionalSpec(min_boxes=2, max_boxes=4, mean_share=0.5, consistency=1.0)])
def test_short_positional_run_lowers_the_loss(pos):
    spec = OrganismSpec(**{**TINY, "final_max_steps": 60, "batch_size": 16}, lr=1e-2, arithmetic_fraction=0.0,
                        residual_init=1.0, target_accuracy=1.0, positional=pos)
    res = O.train_organism(spec, progress=False, stages=("paper",))
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < sum(losses[:5]) / 5 - 0.3


def test_ordinal_queries_ask_for_the_box_number():
    """Oracle: every ordinal query ``. Box F =`` is answered by the 1-based index of F's box in
    its own context; a share of 0 leaves the batch exactly as before (same random stream)."""
    tok = build_word_tokenizer()
    vocab = tok.get_vocab()
    words = {i: w for w, i in vocab.items()}
    b = O.make_batch(random.Random(0), vocab, "paper", 16, (5, 5), queries=6, ordinal_share=0.5)
    k = O.context_length("paper", 5)
    n_ordinal = 0
    for ids, lab in zip(b.input_ids.tolist(), b.labels.tolist()):
        ctx = [words[i] for i in ids[:k]]
        box_labels = [ctx[j + 1] for j in range(len(ctx) - 1) if ctx[j] == "Box"]
        for t, a in enumerate(lab):
            if a != -100 and words[ids[t - 1]] == "=":
                n_ordinal += 1
                assert words[ids[t - 2]] in box_labels
                assert words[a] == str(box_labels.index(words[ids[t - 2]]) + 1)
    assert 0 < n_ordinal < 16 * 6
    plain = O.make_batch(random.Random(0), vocab, "paper", 16, (5, 5), queries=6)
    again = O.make_batch(random.Random(0), vocab, "paper", 16, (5, 5), queries=6, ordinal_share=0.0)
    assert torch.equal(plain.input_ids, again.input_ids)
