"""CMAP: identity into itself, recovery of an edited head, input (q+k+v) == output patching under
ours, and input CMAP under the paper's reference semantics against an independent hook-and-loop
implementation of the authors' ``cmap_in`` on the plain HF model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from entity_tracking import task as D
from entity_tracking.methods.cmap import (
    CMAPError,
    circuit_source,
    HeadSet,
    OutputCMAP,
    gain_recovery,
    head_sets,
    head_sets_for,
    heads_by_position,
    input_cmap,
    input_sets,
    output_cmap,
    paper_accuracy,
)
from entity_tracking.methods import paper
from entity_tracking.methods.circuit import Circuit
from entity_tracking.config import ModelSpec, TinySpec
from entity_tracking.model.tiny import build_tiny_model
from entity_tracking.load import load_model
from entity_tracking.intervene.patching import last_logits


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


OURS = {"kv_positions": "through", "restore": "others"}
REFERENCE = {"kv_positions": "before", "restore": "before_last"}


def test_into_itself_is_identity(models):
    base, _, batch = models
    clean = last_logits(base, batch)
    heads = {"last": [(0, 1), (2, 3)], "query_label": [(1, 0)], "prev_query_label": [(1, 2)]}
    assert torch.allclose(output_cmap(base, base, batch, heads), clean, atol=1e-5)
    for mode in (REFERENCE, OURS):
        for sites in ("q", "k", "v", "qkv"):
            assert torch.allclose(input_cmap(base, base, batch, heads, sites, **mode), clean, atol=1e-5), (mode, sites)


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
    inp = input_cmap(base, ft, batch, {key: [head]}, "qkv", **OURS)
    assert torch.allclose(inp, out, atol=1e-5)


def test_output_cmap_of_many_sets_from_one_recording_is_output_cmap_bit_for_bit(models):
    """OutputCMAP records the fine-tuned model once and runs the base from its clean prefix: the
    logits of every set are those of output_cmap, which runs both models whole for each set."""
    base, ft, batch = models
    keys = ["last", "query_label", "prev_query_label"]
    patcher = OutputCMAP(base, ft, batch, keys, batch_size=3)
    assert patcher.session.prefix is not None, "unpadded prompts: the base runs from its clean prefix"
    assert torch.equal(patcher.finetuned_logits, last_logits(ft, batch, batch_size=3))
    sets = [{"last": [(1, 1), (2, 0)]}, {"query_label": [(1, 0), (1, 1)]}, {"prev_query_label": [(0, 3)]},
            {"last": [(2, 3)], "query_label": [(0, 1)], "prev_query_label": [(1, 2)]}]
    for heads in sets:
        assert torch.equal(patcher.logits(heads), output_cmap(base, ft, batch, heads, batch_size=3)), heads
    again = OutputCMAP(base, ft, batch, keys, batch_size=3, session=patcher.session)  # one session, many fine-tunes
    assert torch.equal(again.logits(sets[3]), patcher.logits(sets[3]))
    with pytest.raises(CMAPError, match="'all'"):
        OutputCMAP(base, ft, batch, ["all"])
    with pytest.raises(CMAPError, match="no fine-tuned heads were recorded at 'query_label'"):
        OutputCMAP(base, ft, batch, ["last"]).logits({"query_label": [(1, 0)]})


def test_input_cmap_changes_the_output_when_values_differ(models):
    base, ft, batch = models
    clean = last_logits(base, batch)
    edited = base.arch.query_heads(1)[0]  # a query head reading the edited kv head
    assert not torch.allclose(input_cmap(base, ft, batch, {"last": [(1, edited)]}, "v"), clean, atol=1e-4)


# --------------------------------------------------------------------------------------------
# The paper's reference semantics, against the authors' cmap_in redone with plain forward hooks


def _attn(lm, layer: int):
    return lm.hf.model.layers[layer].self_attn


def _reference_input_cmap(base, ft, batch, layer: int, head: int, key: str, site: str) -> torch.Tensor:
    """The authors' ``cmap_in`` for one head and one site, on the HF modules directly: cache the
    fine-tuned model's ``{site}_proj`` output of ``layer`` and the base model's ``o_proj`` inputs of
    every layer; then run the base model with the head's query overwritten at its position ``p``
    (or its key/value head's key/value at positions ``[:p]``) and every layer's ``o_proj`` input at
    ``[:, :-1]`` overwritten with the base model's cached value. Returns last-position logits."""
    ids = batch["input_ids"]
    positions = [int(p) for p in D.positions_at(batch, key)]
    arch = base.arch
    d, group = arch.d_head, arch.n_heads // arch.n_kv_heads
    col = head if site == "q" else head // group
    cols = slice(col * d, (col + 1) * d)

    ft_out: dict[str, torch.Tensor] = {}
    h = getattr(_attn(ft, layer), f"{site}_proj").register_forward_hook(
        lambda mod, args, out: ft_out.__setitem__("x", out.detach().clone()))
    with torch.no_grad():
        ft.hf(ids)
    h.remove()

    base_z: dict[int, torch.Tensor] = {}

    def saver(l):
        def hook(mod, args):
            base_z[l] = args[0].detach().clone()
        return hook

    hooks = [_attn(base, l).o_proj.register_forward_pre_hook(saver(l)) for l in range(arch.n_layers)]
    with torch.no_grad():
        base.hf(ids)
    for h in hooks:
        h.remove()

    def patch(mod, args, out):
        out = out.clone()
        for b, p in enumerate(positions):
            if site == "q":
                out[b, p, cols] = ft_out["x"][b, p, cols]
            else:
                out[b, :p, cols] = ft_out["x"][b, :p, cols]
        return out

    def restorer(l):
        def hook(mod, args):
            x = args[0].clone()
            x[:, :-1] = base_z[l][:, :-1]
            return (x, *args[1:])
        return hook

    hooks = [getattr(_attn(base, layer), f"{site}_proj").register_forward_hook(patch)]
    hooks += [_attn(base, l).o_proj.register_forward_pre_hook(restorer(l)) for l in range(arch.n_layers)]
    try:
        with torch.no_grad():
            return base.hf(ids).logits[:, -1]
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("site,key,head", [
    ("q", "last", (2, 1)), ("k", "last", (2, 1)), ("v", "last", (2, 1)),
    ("k", "query_label", (2, 0)), ("v", "query_label", (2, 0)),
])
def test_input_cmap_matches_the_reference_hooks(models, site, key, head):
    """q-, k- and v-only input CMAP under the defaults equals the authors' procedure redone with
    forward hooks (layer 2 reads a residual stream the edit in layer 1 changed, so its q/k/v differ)."""
    base, ft, batch = models
    ours = input_cmap(base, ft, batch, {key: [head]}, site)
    ref = _reference_input_cmap(base, ft, batch, *head, key, site)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert not torch.allclose(ours, last_logits(base, batch), atol=1e-4), "the patch must do something"


def test_reference_query_patch_before_the_last_position_does_nothing(models):
    """Under the reference restore a head before the last position acts only through the keys and
    values it adds to the last position; its query changes only its own (restored) output. Under
    ours that output is kept and reaches the last position through layer 2 (the control)."""
    base, _, batch = models
    twin = _load("twin", Path(base.spec.local_path))  # the base model with its layer-1 queries perturbed
    g = torch.Generator().manual_seed(5)
    noise = 10 * torch.randn(base.arch.d_model, generator=g)
    # a pre-hook on q_proj's input: nnsight reads q_proj's output after it (a forward hook's
    # change to the output would reach the model's forward but not nnsight's cache)
    h = _attn(twin, 1).q_proj.register_forward_pre_hook(lambda mod, args: (args[0] + noise, *args[1:]))
    try:
        clean = last_logits(base, batch)
        reference = input_cmap(base, twin, batch, {"query_label": [(1, 0)]}, "q")
        ours = input_cmap(base, twin, batch, {"query_label": [(1, 0)]}, "q", **OURS)
    finally:
        h.remove()
    assert torch.allclose(reference, clean, atol=1e-5)
    assert not torch.allclose(ours, clean, atol=1e-4)


@pytest.mark.parametrize("restore", ["before_last", "others"])
@pytest.mark.parametrize("key,head", [("last", (1, 1)), ("query_label", (1, 0))])
def test_reference_kv_leaves_the_heads_own_position_alone(models, key, head, restore):
    """A "fine-tuned" model that is the base model with its layer-1 keys and values perturbed at
    exactly the head's own position ``p``: with ``kv_positions="before"`` nothing it differs in is
    patched, so the base model comes out unchanged; with ``"through"`` the perturbation at ``p``
    gets in (the control that this test could fail)."""
    base, _, batch = models
    layer = head[0]
    twin = _load("twin", Path(base.spec.local_path))
    positions = [int(p) for p in D.positions_at(batch, key)]
    g = torch.Generator().manual_seed(11)

    def perturb(mod, args):  # on the k_proj/v_proj input, which nnsight's read of their output follows
        x = args[0].clone()
        for b, p in enumerate(positions):
            x[b, p] += 10 * torch.randn(x.shape[-1], generator=g)
        return (x, *args[1:])

    hooks = [getattr(_attn(twin, layer), f"{s}_proj").register_forward_pre_hook(perturb) for s in ("k", "v")]
    try:
        clean = last_logits(base, batch)
        assert not torch.allclose(last_logits(twin, batch), clean, atol=1e-4), "the twin must differ"
        before = input_cmap(base, twin, batch, {key: [head]}, "kv", kv_positions="before", restore=restore)
        through = input_cmap(base, twin, batch, {key: [head]}, "kv", kv_positions="through", restore=restore)
    finally:
        for h in hooks:
            h.remove()
    assert torch.allclose(before, clean, atol=1e-5)
    assert not torch.allclose(through, clean, atol=1e-4)


def test_bad_modes_fail_clearly(models):
    base, ft, batch = models
    with pytest.raises(CMAPError, match="kv_positions='upto' is not one of"):
        input_cmap(base, ft, batch, {"last": [(1, 1)]}, "k", kv_positions="upto")
    with pytest.raises(CMAPError, match="restore='all' is not one of"):
        input_cmap(base, ft, batch, {"last": [(1, 1)]}, "k", restore="all")
    with pytest.raises(CMAPError, match="sites among"):
        input_cmap(base, ft, batch, {"last": [(1, 1)]}, "qx")


def test_head_sets_for_picks_the_circuit():
    """'own': each fine-tune's own circuit and DCM heads; 'base': the base model's, for every fine-tune."""
    circuits = {"base": Circuit("base", {"value_fetcher": [(1, 0)]}),
                "ft": Circuit("ft", {"value_fetcher": [(2, 3), (1, 1)]})}
    selections = {"base": {("value_fetcher", "object_value"): [(1, 0)]},
                  "ft": {("value_fetcher", "object_value"): [(2, 3)]}}
    source, sets = head_sets_for("ft", "base", "own", circuits, selections)
    assert source == "ft"
    assert sets == head_sets(circuits["ft"], selections["ft"])
    assert sets["value_fetcher (DCM object_value)"] == {"last": [(2, 3)]}
    source, sets = head_sets_for("ft", "base", "base", circuits.__getitem__, selections.__getitem__)
    assert source == "base"
    assert sets == head_sets(circuits["base"], selections["base"])
    # only the chosen model is looked up: "base" needs no circuit of the fine-tune
    assert head_sets_for("other", "base", "base", circuits, selections)[0] == "base"
    with pytest.raises(CMAPError, match="no circuit for model 'other'"):
        head_sets_for("other", "base", "own", circuits, selections)
    with pytest.raises(CMAPError, match="circuit='mine' is not one of"):
        head_sets_for("ft", "base", "mine", circuits, selections)
    assert (circuit_source("ft", "base", "own"), circuit_source("ft", "base", "base")) == ("ft", "base")


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
    assert input_sets(sets) == {"value_fetcher (DCM object_value)": {"last": [(1, 2)]}}
    # what each set is travels as fields, not only in its label
    assert [(s.group, s.desideratum) for s in sets.values()] == [
        ("", ""), ("value_fetcher", "object_value"), ("value_fetcher", ""), ("position_transmitter", "")]
    assert all(label == s.label for label, s in sets.items())


def test_head_set_is_the_mapping_the_patches_take_and_knows_whether_the_paper_patched_it():
    s = HeadSet({"last": [(1, 2)]}, "value_fetcher", "object_value")
    assert dict(s) == {"last": [(1, 2)]} and s == {"last": [(1, 2)]} and len(s) == 1 and s["last"] == [(1, 2)]
    assert s.papers and HeadSet({"last": [(0, 0)]}).papers  # the paper's DCM choice; the full circuit
    assert HeadSet({"prev_query_label": [(0, 3)]}, "structure_reader").papers  # the paper patched it whole
    assert not HeadSet({"last": [(1, 2)]}, "value_fetcher").papers  # a whole group the paper did not patch
    assert not HeadSet({"last": [(1, 2)]}, "value_fetcher", "positional").papers
    with pytest.raises(CMAPError, match="needs its group"):
        HeadSet({"last": [(1, 2)]}, "", "object_value")


def test_paper_accuracy_of_each_kind_of_row():
    def row(kind, group="", desideratum="", patched="", sites="z"):
        return {"kind": kind, "group": group, "desideratum": desideratum, "patched": patched, "sites": sites}

    assert paper_accuracy(row("model", patched="base alone"), "Goat-7B") == paper.ACCURACY["Llama-7B"]
    assert paper_accuracy(row("model", patched="fine-tuned alone"), "Goat-7B") == paper.ACCURACY["Goat-7B"]
    assert paper_accuracy(row("output"), "FLoat-7B") == paper.CMAP_OUTPUT["FLoat-7B"]["full circuit"]
    assert paper_accuracy(row("output", "position_detector", "positional"), "Goat-7B") == \
        paper.CMAP_OUTPUT["Goat-7B"]["position_detector"]
    assert paper_accuracy(row("output", "structure_reader"), "Goat-7B") == paper.CMAP_OUTPUT["Goat-7B"]["structure_reader"]
    assert paper_accuracy(row("output", "value_fetcher"), "Goat-7B") is None  # not a set the paper patched
    assert paper_accuracy(row("input", "value_fetcher", "object_value", sites="qk"), "Goat-7B") == \
        paper.CMAP_INPUT["value_fetcher"]["QK"]
    assert paper_accuracy(row("input", "value_fetcher", "object_value", sites="q"), "FLoat-7B") is None
    assert paper_accuracy(row("output"), None) is None  # a fine-tune of no paper model (a positive control)


def test_different_head_shapes_fail_clearly(tmp_path):
    a = _load("a", build_tiny_model(TinySpec(n_layers=2, n_heads=4, d_model=64, d_mlp=96), tmp_path / "a"))
    b = _load("b", build_tiny_model(TinySpec(n_layers=2, n_heads=8, d_model=64, d_mlp=96), tmp_path / "b"))
    batch = D.encode_prompts(a.tokenizer, D.make_eval_prompts(a.tokenizer, 2, num_boxes=3, seed=0))
    with pytest.raises(CMAPError, match="'a' vs 'b' differ in n_heads: 4 vs 8"):
        output_cmap(a, b, batch, {"last": [(0, 0)]})


def test_gain_recovery_shares_of_the_gain_with_paired_intervals(models):
    """Targets are the fine-tuned model's own answers, so it gains over the base model; patching
    every head it changed, at every position, recovers all of the gain (share exactly 1), and
    patching nothing recovers none."""
    base, ft, batch = models
    b = dict(batch)
    b["target"] = last_logits(ft, batch).argmax(-1)
    edited = [(1, h) for h in base.arch.query_heads(1)]
    far = [(0, 0)]  # a head of the untouched layer 0: patching it from ft changes nothing
    rows = {r["patched"]: r for r in gain_recovery(base, ft, b, {"edited": {"all": edited}, "far": {"all": far}},
                                                   n_bootstrap=200)}
    base_acc, ft_row = rows["base alone"]["accuracy"], rows["fine-tuned alone"]
    assert ft_row["accuracy"] == 1.0 and base_acc < 1.0
    assert ft_row["share"] == pytest.approx(1.0 - base_acc) and ft_row["share_low"] <= ft_row["share"] <= ft_row["share_high"]
    assert rows["edited"]["share"] == pytest.approx(1.0) and rows["edited"]["share_low"] == pytest.approx(1.0)
    assert rows["far"]["share"] == pytest.approx(0.0) and rows["far"]["share_high"] == pytest.approx(0.0)
    assert all(r["n_prompts"] == len(b["target"]) for r in rows.values())
    assert {(r["group"], r["desideratum"]) for r in rows.values()} == {("", "")}  # plain mappings: sets of no group
    # no set to patch (a fine-tune DCM left out): the two models alone, the same rows
    alone = gain_recovery(base, ft, b, {}, input_sets({}), n_bootstrap=200)
    assert [r["patched"] for r in alone] == ["base alone", "fine-tuned alone"]
    for got, want in zip(alone, (rows["base alone"], rows["fine-tuned alone"])):
        assert got.keys() == want.keys()
        assert all(got[k] == want[k] or (got[k] != got[k] and want[k] != want[k]) for k in want), (got, want)  # NaN == NaN


def test_checkpoint_row_with_the_base_accuracy_given_is_the_same_row(models):
    """Fast path of the dynamics loop: the base model's accuracy computed once and passed in."""
    from entity_tracking.methods.dynamics import checkpoint_row, eval_accuracy

    base, ft, _ = models
    prompts = D.make_eval_prompts(base.tokenizer, 12, num_boxes=3, seed=1)
    reference = D.make_mean_reference_prompts(base.tokenizer, 12, num_boxes=3, n_tokens=prompts[0]["n_tokens"], seed=2)
    circuit = Circuit("base", {"value_fetcher": [(1, 1), (2, 0)], "position_detector": [(0, 2)]})
    slow = checkpoint_row(base, ft, prompts, reference, circuit, batch_size=5)
    memo: dict = {}
    fast = checkpoint_row(base, ft, prompts, reference, circuit, batch_size=5,
                          base_accuracy=eval_accuracy(base, prompts, batch_size=5), base_memo=memo)
    assert fast == pytest.approx(slow, rel=0, abs=0, nan_ok=True)
    assert memo["session"].prefix is not None
    assert checkpoint_row(base, ft, prompts, reference, circuit, batch_size=5, base_memo=memo) == \
        pytest.approx(slow, rel=0, abs=0, nan_ok=True)


def test_checkpoint_row_is_the_row_of_whole_runs(models):
    """The row's accuracy is the checkpoint's own, and each group's share is that of output_cmap
    (both models run whole for each group), whatever the fast path shares between them."""
    from entity_tracking.methods.dynamics import SHARE_COLUMNS, checkpoint_row, eval_accuracy

    base, ft, _ = models
    prompts = D.make_eval_prompts(base.tokenizer, 12, num_boxes=3, seed=1)
    reference = D.make_mean_reference_prompts(base.tokenizer, 12, num_boxes=3, n_tokens=prompts[0]["n_tokens"], seed=2)
    circuit = Circuit("base", {"value_fetcher": [(1, 1), (2, 0)], "position_detector": [(0, 2)],
                               "structure_reader": [(1, 1)]})
    row = checkpoint_row(base, ft, prompts, reference, circuit, batch_size=5)
    batch = D.encode_prompts(base.tokenizer, prompts)
    acc, base_acc = eval_accuracy(ft, batch, batch_size=5), eval_accuracy(base, batch, batch_size=5)
    assert row["accuracy"] == acc and row["base accuracy"] == base_acc
    for g in ("value_fetcher", "position_detector", "structure_reader"):
        logits = output_cmap(base, ft, batch, heads_by_position(circuit, [g]), batch_size=5)
        patched = float((logits.argmax(-1) == batch["target"]).float().mean())
        want = (patched - base_acc) / (acc - base_acc) if abs(acc - base_acc) > 1e-9 else float("nan")
        assert row[SHARE_COLUMNS[g]] == pytest.approx(want, rel=0, abs=0, nan_ok=True), g


# --------------------------------------------------------------------------------------------
# Against random head sets (issue 28)


def test_random_head_sets_have_the_circuits_sizes_and_positions_and_are_seeded():
    from entity_tracking.methods.cmap import random_head_sets

    circuit = Circuit("m", {"value_fetcher": [(2, 0), (3, 1), (3, 2)], "position_transmitter": [(1, 3)],
                            "position_detector": [(1, 0), (2, 2)], "structure_reader": [(0, 1)]})
    full = head_sets(circuit)["full circuit"]
    draws = random_head_sets(full, n_layers=4, n_heads=4, n=10, seed=5)
    assert len(draws) == 10
    for d in draws:
        assert list(d) == list(full) and {k: len(v) for k, v in d.items()} == {k: len(v) for k, v in full.items()}
        assert all(len(set(v)) == len(v) and all(0 <= l < 4 and 0 <= h < 4 for l, h in v) for v in d.values())
    assert draws == random_head_sets(full, 4, 4, 10, seed=5) and draws != random_head_sets(full, 4, 4, 10, seed=6)
    assert len({tuple(d["last"]) for d in draws}) > 1  # the draws differ from each other
    with pytest.raises(CMAPError, match="more than the model's 4"):
        random_head_sets({"last": [(0, h) for h in range(5)]}, 1, 4)


def test_an_identity_patch_recovers_no_gain_and_reads_nan_not_an_error(models):
    """Fine-tune == base: there is no gain, so every share (per head, circuit, random sets) is NaN
    and every per-head change is 0."""
    from entity_tracking.methods.cmap import random_baseline

    base, _, batch = models
    heads = {"last": [(0, 1), (2, 3)], "query_label": [(1, 0)]}
    res = random_baseline(base, base, batch, heads, n_random=10, n_bootstrap=50)
    assert res["n_random"] == 10 and res["positions"] == {"last": 2, "query_label": 1} and res["n_heads"] == 3
    assert res["base_accuracy"] == res["finetuned_accuracy"]
    for k in ("circuit", "random", "excess"):
        assert all(res[k][x] != res[k][x] for x in ("value", "low", "high")), k
    assert len(res["per_head"]) == 3 and all(r["change"] == 0.0 for r in res["per_head"])
    assert all(r["share"] != r["share"] for r in res["per_head"])
    assert [r["label"] for r in res["per_head"]] == ["L0H1 @ last", "L2H3 @ last", "L1H0 @ query_label"]


def _bigger_batch(base, ft):
    prompts = D.make_eval_prompts(base.tokenizer, 42, num_boxes=3, seed=4)
    b = dict(D.encode_prompts(base.tokenizer, prompts))
    # the fine-tune's own answers on two prompts of three, the base model's on the third: both models
    # do better than nothing, and the fine-tune gains
    ft_answer, base_answer = last_logits(ft, b).argmax(-1), last_logits(base, b).argmax(-1)
    b["target"] = torch.where(torch.arange(len(prompts)) % 3 == 2, base_answer, ft_answer)
    return b, [p["context_id"] for p in prompts]


def test_a_circuit_equal_to_its_random_sets_does_not_hold_against_its_baseline(models):
    """Every head of the tiny model at the last position: each random set of that size there is
    the same set, so the circuit recovers exactly what random sets recover, and CMAP reads
    "does not hold" against its baseline whatever its own recovery."""
    from entity_tracking.methods import verdicts as V
    from entity_tracking.methods.cmap import random_baseline

    base, ft, _ = models
    b, contexts = _bigger_batch(base, ft)
    every = [(l, h) for l in range(base.arch.n_layers) for h in range(base.arch.n_heads)]
    full = HeadSet({"last": every})
    res = random_baseline(base, ft, b, full, n_random=10, clusters=contexts, n_bootstrap=200)
    assert all(sorted(d["last"]) == sorted(map(list, every)) for d in res["draws"])
    assert all(res["excess"][k] == pytest.approx(0.0, abs=1e-6) for k in ("value", "low", "high"))  # float32 means
    assert res["circuit"]["n_clusters"] == len(set(contexts))
    rows = gain_recovery(base, ft, b, {"full circuit": full}, n_bootstrap=200, clusters=contexts)
    gain = rows[1]
    assert gain["share_low"] > 0, "the fixture's fine-tune must gain over the base on its own answers"
    got = V.cmap_verdicts({"ft": rows}, 1000, "base", baselines={"ft": res})[0]  # 1000 boxes: chance ~0
    assert got.holds == "does not hold" and "0.00 [" in got.ours.split("excess ")[1]
    assert "10 random head sets" in got.sample and "contexts x" in got.sample


def test_cmap_recovery_holds_only_beyond_random_by_the_margin():
    from entity_tracking.methods import verdicts as V

    def row(patched, kind, acc, share=(float("nan"),) * 3):
        return {"kind": kind, "patched": patched, "sites": "z" if kind == "output" else "", "n_heads": 0,
                "n_prompts": 504, "n_clusters": 72, "accuracy": acc, "low": acc - 0.04, "high": acc + 0.04,
                "share": share[0], "share_low": share[1], "share_high": share[2], "group": "", "desideratum": ""}

    rows = [row("base alone", "model", 0.6), row("fine-tuned alone", "model", 0.8, (0.2, 0.15, 0.25)),
            row("full circuit", "output", 0.79, (0.95, 0.9, 1.0))]
    base = {"n_random": 10, "random": {"value": 0.1, "low": 0.0, "high": 0.2}}
    one = lambda excess: V.cmap_verdicts({"ft": rows}, 7, baselines={"ft": {**base, "excess": excess}})[0]  # noqa: E731
    assert one({"value": 0.85, "low": 0.7, "high": 1.0}).holds == "holds"
    assert one({"value": 0.3, "low": 0.1, "high": 0.5}).holds == "partly"  # beyond random, by less than the margin
    assert one({"value": 0.05, "low": -0.1, "high": 0.2}).holds == "does not hold"
    assert V.cmap_verdicts({"ft": rows}, 7)[0].holds == "partly"  # no baseline: not shown to beat random heads
    assert one({"value": 0.85, "low": 0.7, "high": 1.0}).sample.startswith("72 contexts x 7 queries")
