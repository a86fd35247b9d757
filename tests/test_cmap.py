"""CMAP: identity into itself, recovery of an edited head, input (q+k+v) == output patching."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from entity_tracking import data as D
from entity_tracking.cmap import CMAPError, head_sets, heads_by_position, input_cmap, output_cmap
from entity_tracking.circuit import Circuit
from entity_tracking.config import ModelSpec, TinySpec
from entity_tracking.models import build_tiny_model, load_model
from entity_tracking.patching import last_logits


def _load(name: str, path: Path):
    return load_model(ModelSpec(name=name, local_path=str(path)), verbose=False)


def _edited_copy(src: Path, dst: Path, layer: int, head: int, d_head: int, kv: bool = True) -> Path:
    """A copy of ``src`` whose value weights of one (kv) head are replaced by random ones."""
    import shutil

    shutil.copytree(src, dst)
    f = next(dst.glob("*.safetensors"))
    sd = load_file(f)
    key = next(k for k in sd if k.endswith(f"layers.{layer}.self_attn.v_proj.weight"))
    g = torch.Generator().manual_seed(7)
    sd[key][head * d_head:(head + 1) * d_head] = torch.randn(d_head, sd[key].shape[1], generator=g) * 0.5
    save_file(sd, f, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module", params=["mha", "gqa"])
def models(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"cmap-{request.param}")
    spec = TinySpec(family="llama", n_layers=3, n_heads=4, n_kv_heads=4 if request.param == "mha" else 2,
                    d_model=64, d_mlp=96, seed=3)
    base_dir = build_tiny_model(spec, root / "base")
    d_head = spec.d_model // spec.n_heads
    ft_dir = _edited_copy(base_dir, root / "ft", layer=1, head=1, d_head=d_head)
    base, ft = _load("base", base_dir), _load("ft", ft_dir)
    prompts = D.make_eval_prompts(base.tokenizer, 8, num_boxes=3, seed=1)
    batch = D.encode_prompts(base.tokenizer, prompts)
    return base, ft, batch


def test_into_itself_is_identity(models):
    base, _, batch = models
    clean = last_logits(base, batch)
    heads = {"last": [(0, 1), (2, 3)], "query_label": [(1, 0)], "prev_query_label": [(1, 2)]}
    assert torch.allclose(output_cmap(base, base, batch, heads), clean, atol=1e-5)
    for sites in ("q", "k", "v", "qkv"):
        assert torch.allclose(input_cmap(base, base, batch, heads, sites), clean, atol=1e-5), sites


def test_output_cmap_of_edited_head_everywhere_recovers_the_copy(models):
    base, ft, batch = models
    # the edited v rows belong to kv head 1, read by query heads arch.query_heads(1)
    heads = [(1, h) for h in base.arch.query_heads(1)]
    clean, target = last_logits(base, batch), last_logits(ft, batch)
    assert not torch.allclose(clean, target, atol=1e-3), "the edit must change the model"
    patched = output_cmap(base, ft, batch, {"all": heads})
    assert torch.allclose(patched, target, atol=1e-5)


@pytest.mark.parametrize("key,head", [("last", (1, 1)), ("query_label", (1, 0)), ("prev_query_label", (2, 3))])
def test_input_qkv_equals_output_cmap(models, key, head):
    base, ft, batch = models
    out = output_cmap(base, ft, batch, {key: [head]})
    inp = input_cmap(base, ft, batch, {key: [head]}, "qkv")
    assert torch.allclose(inp, out, atol=1e-5)


def test_input_cmap_changes_the_output_when_values_differ(models):
    base, ft, batch = models
    clean = last_logits(base, batch)
    edited = base.arch.query_heads(1)[0]  # a query head reading the edited kv head
    assert not torch.allclose(input_cmap(base, ft, batch, {"last": [(1, edited)]}, "v"), clean, atol=1e-4)


def test_groups_map_to_their_positions():
    c = Circuit("m", {"value_fetcher": [(2, 0)], "position_transmitter": [(1, 1)],
                      "position_detector": [(1, 0)], "structure_reader": [(0, 3)]})
    assert heads_by_position(c) == {"last": [(2, 0), (1, 1)], "query_label": [(1, 0)], "prev_query_label": [(0, 3)]}
    assert heads_by_position(c, ["structure_reader"]) == {"prev_query_label": [(0, 3)]}
    with pytest.raises(CMAPError, match="unknown circuit group 'nope'"):
        heads_by_position(c, ["nope"])


def test_head_sets_leave_out_sets_with_nothing_to_patch():
    """An empty group (a model without that path) and a DCM selection of no heads are not
    patched as sets; every other set patches its heads at its group's position."""
    c = Circuit("m", {"value_fetcher": [(1, 0), (1, 2)], "position_transmitter": [(0, 1)]})
    sets = head_sets(c, {("value_fetcher", "object_value"): [(1, 2)], ("position_transmitter", "positional"): []})
    assert sets == {
        "full circuit": {"last": [(1, 0), (1, 2), (0, 1)]},
        "value_fetcher (DCM object_value)": {"last": [(1, 2)]},
        "value_fetcher (whole group)": {"last": [(1, 0), (1, 2)]},
        "position_transmitter (whole group)": {"last": [(0, 1)]},
    }


def test_different_head_shapes_fail_clearly(tmp_path):
    a = _load("a", build_tiny_model(TinySpec(n_layers=2, n_heads=4, d_model=64, d_mlp=96), tmp_path / "a"))
    b = _load("b", build_tiny_model(TinySpec(n_layers=2, n_heads=8, d_model=64, d_mlp=96), tmp_path / "b"))
    batch = D.encode_prompts(a.tokenizer, D.make_eval_prompts(a.tokenizer, 2, num_boxes=3, seed=0))
    with pytest.raises(CMAPError, match="'a' vs 'b' differ in n_heads: 4 vs 8"):
        output_cmap(a, b, batch, {"last": [(0, 0)]})
