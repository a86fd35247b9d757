"""DCM: the mask's two extremes are oracles, and a head built to carry the answer is the one found."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from entity_tracking import data as D
from entity_tracking.config import ModelSpec, TinySpec
from entity_tracking.dcm import DCMError, desideratum_accuracy, masked_logits, source_head_outputs, take_rows, train_mask
from entity_tracking.models import build_tiny_model, load_model
from entity_tracking.patching import HeadPatch, last_logits, run

N_LAYERS, N_HEADS, D_MODEL = 2, 4, 64
D_HEAD = D_MODEL // N_HEADS


def _load(path: Path):
    return load_model(ModelSpec(name=path.name, local_path=str(path)), verbose=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = build_tiny_model(TinySpec(n_layers=N_LAYERS, n_heads=N_HEADS, d_model=D_MODEL, d_mlp=96, seed=5),
                         tmp_path_factory.mktemp("dcm") / "tiny")
    return _load(d)


@pytest.fixture(scope="module")
def pairs(tiny):
    recs = D.make_desiderata(tiny.tokenizer, "positional", 24, num_boxes=3, seed=2)
    return D.encode_pairs(tiny.tokenizer, recs, padding_side="right")


GROUP = [(1, h) for h in range(N_HEADS)] + [(0, 2)]


def test_mask_of_ones_is_the_base_run(tiny, pairs):
    src = source_head_outputs(tiny, pairs["source"], GROUP, "last")
    got = masked_logits(tiny, pairs["base"], src, GROUP, "last", torch.ones(len(GROUP)))
    assert torch.allclose(got, last_logits(tiny, pairs["base"]), atol=1e-5)


@pytest.mark.parametrize("position", ["last", "query_label", "prev_query_label"])
def test_mask_of_zeros_is_patching_the_whole_group(tiny, pairs, position):
    src = source_head_outputs(tiny, pairs["source"], GROUP, position)
    got = masked_logits(tiny, pairs["base"], src, GROUP, position, torch.zeros(len(GROUP)))
    # the oracle: plain activation patching of every group head, source read at its own position
    by_layer = {0: [2], 1: list(range(N_HEADS))}
    cache = run(tiny, pairs["source"], (), [("z", l) for l in by_layer],
                record_positions=pairs["source"][f"{position}_position"], logits=False).cache
    patches = [HeadPatch("z", l, hs, cache["z", l][:, :, hs], pairs["base"][f"{position}_position"])
               for l, hs in by_layer.items()]
    want = run(tiny, pairs["base"], patches).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, last_logits(tiny, pairs["base"]), atol=1e-4)


def test_mask_is_differentiable(tiny, pairs):
    src = source_head_outputs(tiny, pairs["source"], GROUP, "last")
    m = torch.full((len(GROUP),), 0.5, requires_grad=True)
    masked_logits(tiny, pairs["base"], src, GROUP, "last", m)[:, 3].sum().backward()
    assert m.grad is not None and m.grad.abs().sum() > 0


def test_bad_mask_shape_is_named(tiny, pairs):
    src = source_head_outputs(tiny, pairs["source"], GROUP, "last")
    with pytest.raises(DCMError, match=r"one entry per head \(5\)"):
        masked_logits(tiny, pairs["base"], src, GROUP, "last", torch.ones(3))


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny):
    """A copy of the tiny model in which head (1, CARRIER) dominates the last layer's output:
    its W_O columns are scaled up and the other heads' scaled down."""
    dst = tmp_path_factory.mktemp("planted") / "m"
    shutil.copytree(Path(tiny.source), dst)
    f = next(dst.glob("*.safetensors"))
    sd = load_file(f)
    w = sd["model.layers.1.self_attn.o_proj.weight"]
    for h in range(N_HEADS):
        w[:, h * D_HEAD:(h + 1) * D_HEAD] *= 40.0 if h == CARRIER else 0.01
    save_file(sd, f, metadata={"format": "pt"})
    return _load(dst)


CARRIER = 2


def test_dcm_selects_the_head_that_carries_the_answer(planted):
    tok = planted.tokenizer
    recs = D.make_desiderata(tok, "positional", 96, num_boxes=3, seed=4)
    enc = D.encode_pairs(tok, recs, padding_side="right")
    group = [(1, h) for h in range(N_HEADS)]
    # the desideratum this model satisfies by construction: what it says when the carrier is patched
    src = source_head_outputs(planted, enc["source"], group, "last")
    only_carrier = torch.tensor([0.0 if h == CARRIER else 1.0 for h in range(N_HEADS)])
    enc["target"] = masked_logits(planted, enc["base"], src, group, "last", only_carrier).argmax(-1).detach()
    keep_all = masked_logits(planted, enc["base"], src, group, "last", torch.ones(N_HEADS)).argmax(-1)
    assert (keep_all != enc["target"]).float().mean() > 0.3, "the planted head must matter"
    split = {k: {"base": take_rows(enc["base"], s), "source": take_rows(enc["source"], s), "target": enc["target"][s]}
             for k, s in {"train": slice(0, 48), "eval": slice(48, 72), "test": slice(72, 96)}.items()}
    res = train_mask(planted, group, "last", split["train"], split["eval"], split["test"],
                     lam=0.05, lr=0.1, epochs=4, batch_size=16, eval_every=2, seed=0, progress=False)
    assert res.selected == [(1, CARRIER)]
    assert res.test_accuracy > 0.9
    sem = desideratum_accuracy(planted, res.selected, "last", split["test"], n_resamples=5)
    assert abs(sem["accuracy"] - res.test_accuracy) < 1e-9



def test_functionality_reads_the_paper_pattern():
    from entity_tracking import paper
    from entity_tracking.dcm import functionality

    rows = [{"group": g, "desideratum": d, "selected_for": d, "model": "Llama-7B", "mean": v["Llama-7B"]}
            for (g, d), v in paper.DCM_SEMANTICS.items()]
    got = functionality(rows)["Llama-7B"]
    assert got == {"value_fetcher": "value", "position_transmitter": "position", "position_detector": "position",
                   "structure_reader": "neither"}
