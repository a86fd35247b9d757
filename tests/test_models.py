"""Models: the architecture table and the loader, on tiny models built offline in tmp dirs.

Grouped by behaviour: every family traces with the right geometry; per-head writes act on the
model; GQA equals its multi-head twin; a merged LoRA adapter is visible to hooks (o_proj
included, the reference code's bug); missing models and unknown architectures fail naming
the problem; the paper and modern profiles load end to end with tiny stand-ins.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from entity_tracking.model.arch import FAMILIES, UnsupportedArchitecture, arch_for
from entity_tracking.config import ModelSpec, TinySpec, find_repo_root, load_profile
from entity_tracking.io import ResultsPaths
from helpers import mha_twin
from entity_tracking.load import LoadedModel, ModelNotAvailable, RemoteNotConfigured, load_model, load_tokenizer, model_dir, remote_trace_kwargs
from entity_tracking.model.tiny import build_tiny_model

REPO = find_repo_root(Path(__file__).parent)
PROMPTS = ["The apple is in Box A , the cup is in Box B . Box B contains the",
           "The bell is in Box C , the drum is in Box D . Box C contains the"]

# Every family as a GQA tiny model; Gemma3 with an explicit head_dim (n_heads * d_head != d_model).
FAMILY_SPECS = {
    "llama": TinySpec(family="llama", n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, d_mlp=96, seed=1),
    "qwen2": TinySpec(family="qwen2", n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, d_mlp=96, seed=2),
    "gemma3": TinySpec(family="gemma3", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, d_head=16, d_mlp=64, seed=3),
}
EXPECTED = {  # (n_heads, n_kv_heads, d_head, adds_bos)
    "llama": (4, 2, 16, True),
    "qwen2": (4, 2, 16, False),
    "gemma3": (4, 2, 16, True),
}


def _local(name: str, path: Path, **update) -> ModelSpec:
    return ModelSpec(name=name, local_path=str(path), **update)


def _ids(lm: LoadedModel) -> torch.Tensor:
    return lm.tokenizer(PROMPTS, return_tensors="pt")["input_ids"]


def _logits(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    with lm.trace(ids):
        out = lm.nn.output.logits.save()
    return out


@pytest.fixture(scope="module")
def offline(monkeypatch_module):
    """Make sure no test reaches the network, whatever the shell exported."""
    import huggingface_hub.constants as hc

    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch_module.setattr(hc, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, offline) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    dirs = {fam: build_tiny_model(spec, root / fam) for fam, spec in FAMILY_SPECS.items()}
    dirs["llama-mha"] = build_tiny_model(TinySpec(family="llama", n_layers=2, n_heads=4, d_model=64, d_mlp=96, seed=4),
                                         root / "llama-mha")
    return dirs


def _save_lora(base_dir: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     init_lora_weights=False, lora_dropout=0.0)
    pm = get_peft_model(base, cfg)
    for n, p in pm.named_parameters():  # make the deltas large enough to see in every output
        if "lora_B" in n:
            assert p.abs().sum() > 0
            p.data.mul_(5.0)
    pm.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dir(tiny_dirs, tmp_path_factory) -> Path:
    return _save_lora(tiny_dirs["llama-mha"], tmp_path_factory.mktemp("lora") / "adapter")


@pytest.fixture(scope="module")
def peft_reference(tiny_dirs, adapter_dir):
    """The unmerged PEFT model, run as plain torch: the reference for what the adapter does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama-mha"]).eval()
    return PeftModel.from_pretrained(base, adapter_dir).eval()


# --------------------------------------------------------------------------------------------


class TestArchTable:
    def test_every_family_has_a_row(self):
        assert set(FAMILIES) == {"llama", "qwen2", "gemma3"}

    def test_mistral_uses_the_llama_row(self):
        from transformers import MistralConfig, MistralForCausalLM

        m = MistralForCausalLM(MistralConfig(vocab_size=20, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=1, head_dim=8))
        a = arch_for(m)
        assert (a.family, a.n_heads, a.n_kv_heads, a.d_head, a.group_size) == ("llama", 4, 1, 8, 4)
        assert a.path("o_proj", -1) == "model.layers.0.self_attn.o_proj"
        assert a.module(m, "k_proj", 0) is m.model.layers[0].self_attn.k_proj

    def test_gqa_head_mapping(self):
        from transformers import LlamaConfig

        a = arch_for(LlamaConfig(num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2, hidden_size=64))
        assert [a.kv_head(h) for h in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
        assert list(a.query_heads(1)) == [4, 5, 6, 7]
        kv = torch.arange(2.0).view(1, 1, 2, 1).expand(1, 1, 2, 8)
        assert a.expand_kv(kv)[0, 0, :, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]

    def test_unknown_architecture_is_named(self):
        from transformers import GPT2Config

        with pytest.raises(UnsupportedArchitecture, match="gpt2"):
            arch_for(GPT2Config())

    def test_wrong_class_of_a_known_family(self):
        from transformers import LlamaConfig, LlamaForSequenceClassification

        m = LlamaForSequenceClassification(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=16,
                                                       num_hidden_layers=1, num_attention_heads=2))
        with pytest.raises(UnsupportedArchitecture, match="LlamaForSequenceClassification"):
            arch_for(m)

    def test_bad_sites_and_layers(self):
        from transformers import LlamaConfig

        a = arch_for(LlamaConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=64))
        with pytest.raises(IndexError, match="2 layers"):
            a.path("o_proj", 2)
        with pytest.raises(ValueError, match="unknown site"):
            a.path("c_proj", 0)
        with pytest.raises(ValueError, match="needs a layer"):
            a.path("q_proj")


class TestFamiliesTraced:
    @pytest.mark.parametrize("family", list(FAMILY_SPECS))
    def test_geometry_and_sites(self, family, tmp_path, offline):
        spec = ModelSpec(name=f"tiny-{family}", build="tiny", tiny=FAMILY_SPECS[family])
        lm = load_model(spec, ResultsPaths(tmp_path), verbose=False)
        a = lm.arch
        assert a.family == family
        assert (a.n_heads, a.n_kv_heads, a.d_head, a.adds_bos) == EXPECTED[family]
        assert a.n_layers == 2
        ids = _ids(lm)
        b, p = ids.shape
        assert (ids[:, 0] == lm.tokenizer.bos_token_id).all() == a.adds_bos
        with lm.trace(ids):
            q = a.read(lm.nn, "q", 1).save()
            k = a.read(lm.nn, "k", 1).save()
            v = a.read(lm.nn, "v", 1).save()
            flat = a.o_proj(lm.nn, 1).input.save()
            resid = a.layer(lm.nn, 1).output.save()
            logits = lm.nn.output.logits.save()
        assert flat.shape == (b, p, a.n_heads * a.d_head)
        assert a.split_heads(flat).shape == (b, p, a.n_heads, a.d_head)
        assert q.shape == (b, p, a.n_heads, a.d_head)
        assert k.shape == v.shape == (b, p, a.n_kv_heads, a.d_head)
        assert resid.shape == (b, p, a.d_model)  # transformers 5: blocks return a tensor
        assert logits.shape == (b, p, a.vocab_size)
        if family == "gemma3":
            assert a.n_heads * a.d_head != a.d_model

    @pytest.mark.parametrize("family", list(FAMILY_SPECS))
    def test_head_writes_act_on_the_model(self, family, tiny_dirs):
        lm = load_model(_local(family, tiny_dirs[family]), verbose=False)
        a, ids = lm.arch, _ids(lm)
        clean = _logits(lm, ids)
        with lm.trace(ids):
            a.write(lm.nn, "z", 0, a.read(lm.nn, "z", 0).clone())
            same = lm.nn.output.logits.save()
        with lm.trace(ids):
            z = a.read(lm.nn, "z", 0).clone()
            z[:, :, 1] = 0
            a.write(lm.nn, "z", 0, z)
            zeroed = lm.nn.output.logits.save()
        with lm.trace(ids):
            a.write(lm.nn, "q", 1, a.read(lm.nn, "q", 1).clone())
            a.write(lm.nn, "k", 1, a.read(lm.nn, "k", 1).clone())
            a.write(lm.nn, "v", 1, a.read(lm.nn, "v", 1).clone())
            same_qkv = lm.nn.output.logits.save()
        with lm.trace(ids):
            a.write(lm.nn, "v", 1, torch.zeros_like(a.read(lm.nn, "v", 1)))
            zero_v = lm.nn.output.logits.save()
        assert torch.equal(same, clean) and torch.equal(same_qkv, clean)
        assert (zeroed - clean).abs().max() > 1e-4
        assert (zero_v - clean).abs().max() > 1e-4

    def test_write_checks_shape(self, tiny_dirs):
        lm = load_model(_local("llama", tiny_dirs["llama"]), verbose=False)
        with pytest.raises(ValueError, match=r"\[batch, pos, 2, 16\]"):
            with lm.trace(_ids(lm)):
                lm.arch.write(lm.nn, "k", 0, lm.arch.read(lm.nn, "q", 0).clone())

    def test_arch_resolves_on_torch_and_loaded_roots(self, tiny_dirs):
        lm = load_model(_local("llama", tiny_dirs["llama"]), verbose=False)
        a = lm.arch
        assert a.o_proj(lm.hf, 1) is lm.hf.model.layers[1].self_attn.o_proj
        assert a.o_proj(lm, 1).path == a.o_proj(lm.nn, 1).path
        assert len(a.layers(lm.hf)) == a.n_layers
        assert a.lm_head(lm.hf) is lm.hf.lm_head


def test_site_table_covers_every_site_in_forward_order():
    from entity_tracking.model.arch import SITE_MODULES
    from entity_tracking.schema import SITES

    assert tuple(SITE_MODULES) == SITES


class TestAttentionPattern:
    """:meth:`Arch.attention_pattern` from recorded queries and keys equals the weights of the
    model's own eager attention, with each family's rules switched on: a sliding window shorter
    than the prompt (Qwen2, Gemma3), padding; and Gemma3's ``attn_logit_softcapping``, which its
    attention ignores (so must the pattern)."""

    OVERRIDES = {
        "llama": {},
        "qwen2": {"use_sliding_window": True, "sliding_window": 3,
                  "layer_types": ["sliding_attention", "full_attention"]},
        "gemma3": {"sliding_window": 3, "attn_logit_softcapping": 2.0,
                   "layer_types": ["sliding_attention", "full_attention"]},
    }

    @pytest.mark.parametrize("family", list(FAMILY_SPECS))
    def test_pattern_equals_eager_attention(self, family, tiny_dirs):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf = AutoModelForCausalLM.from_pretrained(tiny_dirs[family], attn_implementation="eager",
                                                  **self.OVERRIDES[family]).eval()
        a = arch_for(hf)
        tok = AutoTokenizer.from_pretrained(tiny_dirs[family])
        enc = tok([PROMPTS[0], PROMPTS[1][:30]], return_tensors="pt", padding=True)
        seen = {}
        hooks = [a.module(hf, f"{s}_proj", l).register_forward_hook(
                 lambda m, i, o, key=(s, l): seen.__setitem__(key, o.detach()))
                 for s in ("q", "k") for l in range(a.n_layers)]
        try:
            with torch.no_grad():
                out = hf(**enc, output_attentions=True)
        finally:
            for h in hooks:
                h.remove()
        windows = [getattr(a.attn(hf, l), "sliding_window", None) for l in range(a.n_layers)]
        if family != "llama":
            assert any(w == 3 for w in windows)  # the window is shorter than the prompts
        for l in range(a.n_layers):
            q = a.rope(hf, "q", l, a.split_heads(seen["q", l], a.n_heads))
            k = a.rope(hf, "k", l, a.split_heads(seen["k", l], a.n_kv_heads))
            got = a.attention_pattern(hf, l, q, k, attention_mask=enc["attention_mask"])
            want = out.attentions[l]
            rows = enc["attention_mask"].bool()  # padded queries' rows are meaningless
            torch.testing.assert_close(got.transpose(1, 2)[rows], want.transpose(1, 2)[rows], atol=1e-6, rtol=0)
            # from chosen query positions only: the same rows
            qpos = torch.tensor([[3, 5], [2, 4]])
            sub = a.attention_pattern(hf, l, q[torch.arange(2)[:, None], qpos], k, query_positions=qpos,
                                      attention_mask=enc["attention_mask"])
            torch.testing.assert_close(sub, got[torch.arange(2)[:, None, None], torch.arange(a.n_heads)[None, :, None],
                                                qpos[:, None, :]], atol=1e-6, rtol=0)  # ulps apart on some CPUs


class TestGQA:
    @pytest.mark.parametrize("family", list(FAMILY_SPECS))
    def test_gqa_equalsmha_twin(self, family, tiny_dirs, tmp_path):
        gqa = load_model(_local("gqa", tiny_dirs[family]), verbose=False)
        mha = load_model(_local("mha", mha_twin(tiny_dirs[family], tmp_path / "twin")), verbose=False)
        assert gqa.arch.is_gqa and not mha.arch.is_gqa and mha.arch.n_kv_heads == gqa.arch.n_heads
        ids = _ids(gqa)
        outs = {}
        for name, lm in (("gqa", gqa), ("mha", mha)):
            ks, hs = [], []
            with lm.trace(ids):
                for layer in range(lm.arch.n_layers):  # forward order: k_proj before o_proj
                    ks.append(lm.arch.read(lm.nn, "k", layer).save())
                    hs.append(lm.arch.read(lm.nn, "z", layer).clone().save())
                logits = lm.nn.output.logits.save()
            outs[name] = (ks, hs, logits)
        torch.testing.assert_close(outs["gqa"][2], outs["mha"][2], atol=1e-5, rtol=1e-5)
        for hg, hm in zip(outs["gqa"][1], outs["mha"][1]):
            torch.testing.assert_close(hg, hm, atol=1e-5, rtol=1e-5)
        # The documented mapping: MHA key head h is GQA kv head h // group.
        for kg, km in zip(outs["gqa"][0], outs["mha"][0]):
            torch.testing.assert_close(gqa.arch.expand_kv(kg), km)


class TestAdapter:
    def test_merged_adapter_is_visible_to_hooks(self, tiny_dirs, adapter_dir, peft_reference):
        base = load_model(_local("base", tiny_dirs["llama-mha"]), verbose=False)
        goat = load_model(_local("goat", tiny_dirs["llama-mha"], adapter=str(adapter_dir)), verbose=False)
        assert goat.adapter_merged
        assert not any("lora" in n for n, _ in goat.hf.named_modules())
        ids = _ids(base)
        with torch.no_grad():
            want = peft_reference(input_ids=ids).logits
        got, base_logits = _logits(goat, ids), _logits(base, ids)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert (got - base_logits).abs().max() > 1e-2

    def test_o_proj_delta_is_in_the_traced_activations(self, tiny_dirs, adapter_dir, peft_reference):
        """The reference code's bug: hooks recomputing o_proj from base weights lose its LoRA delta."""
        goat = load_model(_local("goat", tiny_dirs["llama-mha"], adapter=str(adapter_dir)), verbose=False)
        a, ids = goat.arch, _ids(goat)
        with goat.trace(ids):
            z0 = a.o_proj(goat.nn, 0).input.save()
            out0 = a.o_proj(goat.nn, 0).output.save()
            z1 = a.o_proj(goat.nn, 1).input.save()
        lora_o = a.o_proj(peft_reference.get_base_model(), 0)
        w_base = lora_o.base_layer.weight
        w_ft = w_base + lora_o.get_delta_weight("default")
        torch.testing.assert_close(out0, z0 @ w_ft.T, atol=1e-4, rtol=1e-4)
        assert (out0 - z0 @ w_base.T).abs().max() > 1e-2  # what the reference code computed
        # Downstream: the next layer's per-head outputs equal the PEFT model's.
        seen = {}
        mod = a.o_proj(peft_reference.get_base_model(), 1)
        handle = mod.register_forward_pre_hook(lambda m, args: seen.setdefault("z1", args[0].detach()))
        try:
            with torch.no_grad():
                peft_reference(input_ids=ids)
        finally:
            handle.remove()
        torch.testing.assert_close(z1, seen["z1"], atol=1e-4, rtol=1e-4)

    def test_unmerged_adapter_keeps_paths_and_delta(self, tiny_dirs, adapter_dir, peft_reference):
        lm = load_model(_local("goat-lora", tiny_dirs["llama-mha"], adapter=str(adapter_dir), merge_adapter=False),
                        verbose=False)
        assert not lm.adapter_merged
        ids = _ids(lm)
        with torch.no_grad():
            want = peft_reference(input_ids=ids).logits
        with lm.trace(ids):
            h = lm.arch.read(lm.nn, "z", 1).clone().save()
            got = lm.nn.output.logits.save()
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert h.shape[-2:] == (4, 16)

    def test_adapter_that_does_not_land_is_refused(self, tiny_dirs, tmp_path):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama-mha"])
        get_peft_model(base, LoraConfig(r=2, target_modules=["o_proj"])).save_pretrained(tmp_path / "zero")
        with pytest.raises(ModelNotAvailable, match="identity"):
            load_model(_local("x", tiny_dirs["llama-mha"], adapter=str(tmp_path / "zero")), verbose=False)


class TestErrors:
    def test_missing_hub_model_offline_names_the_id(self, offline):
        spec = ModelSpec(name="llama-7b", hub_id="huggyllama/llama-7b")
        with pytest.raises(ModelNotAvailable, match=r"'huggyllama/llama-7b'.*not on disk.*cannot be reached"):
            load_model(spec, verbose=False)

    def test_missing_adapter_and_tokenizer_name_their_ids(self, tiny_dirs, offline):
        d = tiny_dirs["llama-mha"]
        with pytest.raises(ModelNotAvailable, match="tiedong/goat-lora-7b"):
            load_model(_local("goat", d, adapter="tiedong/goat-lora-7b"), verbose=False)
        with pytest.raises(ModelNotAvailable, match="hf-internal-testing/llama-tokenizer"):
            load_model(_local("x", d, tokenizer="hf-internal-testing/llama-tokenizer"), verbose=False)

    def test_missing_local_path(self, tmp_path):
        with pytest.raises(ModelNotAvailable, match="does not exist"):
            load_model(_local("x", tmp_path / "nowhere"), verbose=False)

    def test_unknown_architecture_before_weights(self, tmp_path):
        from transformers import GPT2Config, GPT2LMHeadModel

        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20)).save_pretrained(tmp_path / "g")
        with pytest.raises(UnsupportedArchitecture, match="GPT2LMHeadModel"):
            load_model(_local("g", tmp_path / "g"), verbose=False)

    def test_remote_needs_key_and_hub_id(self, monkeypatch, tiny_dirs):
        from nnsight import CONFIG

        monkeypatch.setattr(CONFIG.API, "APIKEY", CONFIG.API.APIKEY)  # restored after the test
        monkeypatch.delenv("NDIF_API_KEY", raising=False)
        spec = ModelSpec(name="r", hub_id="huggyllama/llama-7b", remote=True)
        with pytest.raises(RemoteNotConfigured, match="NDIF_API_KEY"):
            load_model(spec, verbose=False)
        monkeypatch.setenv("NDIF_API_KEY", "test-key")
        assert remote_trace_kwargs(spec) == {"remote": True}
        assert remote_trace_kwargs(spec.model_copy(update={"remote": False})) == {}
        with pytest.raises(RemoteNotConfigured, match="hub_id"):
            load_model(_local("r", tiny_dirs["llama"], remote=True), verbose=False)

    def test_remote_model_is_built_on_meta(self, monkeypatch, tiny_dirs):
        """No weights are loaded for a remote model; its traces carry remote=True. (A local
        directory stands in for the hub id: the meta build only reads the config.)"""
        from nnsight import CONFIG

        monkeypatch.setattr(CONFIG.API, "APIKEY", CONFIG.API.APIKEY)
        monkeypatch.setenv("NDIF_API_KEY", "test-key")
        lm = load_model(ModelSpec(name="r", hub_id=str(tiny_dirs["qwen2"]), remote=True), verbose=False)
        assert lm.remote and lm.trace_kwargs == {"remote": True} and CONFIG.API.APIKEY == "test-key"
        assert {p.device.type for p in lm.hf.parameters()} == {"meta"}
        assert (lm.arch.family, lm.arch.n_kv_heads) == ("qwen2", 2)


class TestLoading:
    def test_device_auto_is_printed(self, tiny_dirs, capsys):
        lm = load_model(_local("x", tiny_dirs["llama"]))
        out = capsys.readouterr().out
        expected = "cuda" if torch.cuda.is_available() else "cpu"
        assert f"device auto -> {expected}" in out
        assert lm.device.type == expected and lm.trace_kwargs == {}
        assert not any(p.requires_grad for p in lm.hf.parameters())

    def test_dtype_and_tokenizer_override(self, tiny_dirs):
        lm = load_model(_local("x", tiny_dirs["llama"], dtype="bfloat16", tokenizer=str(tiny_dirs["qwen2"])),
                        verbose=False)
        assert next(lm.hf.parameters()).dtype == torch.bfloat16
        assert lm.arch.adds_bos is False  # the qwen2 tiny tokenizer prepends no BOS
        assert lm.tokenizer.pad_token is not None

    def test_tiny_build_is_cached_and_rebuilt_on_change(self, tmp_path):
        paths = ResultsPaths(tmp_path)
        spec = ModelSpec(name="t", build="tiny", tiny=TinySpec(n_layers=1))
        d = model_dir(spec, paths)
        mtime = (d / "model.safetensors").stat().st_mtime_ns
        assert model_dir(spec, paths) == d and (d / "model.safetensors").stat().st_mtime_ns == mtime
        spec2 = spec.model_copy(update={"tiny": TinySpec(n_layers=3)})
        model_dir(spec2, paths)
        assert json.loads((d / "config.json").read_text())["num_hidden_layers"] == 3
        assert load_tokenizer(spec2, paths)("Box A")["input_ids"][0] == 0  # BOS

    def test_hub_id_model_dir_is_the_id(self):
        assert model_dir(ModelSpec(name="x", hub_id="Qwen/Qwen2.5-1.5B")) == "Qwen/Qwen2.5-1.5B"


class TestProfiles:
    """The shipped profiles load end to end once each hub id is swapped for a tiny local copy."""

    @staticmethod
    def _standin(spec: ModelSpec, model: Path, adapter: Path | None) -> ModelSpec:
        update = {"hub_id": None, "local_path": str(model)}
        if spec.adapter:
            update["adapter"] = str(adapter)
        if spec.tokenizer:
            update["tokenizer"] = str(model)
        return spec.model_copy(update=update)

    def test_paper_profile(self, tiny_dirs, adapter_dir):
        prof = load_profile("paper", REPO)
        assert [m.paper_accuracy for m in prof.models] == [0.66, 0.67, 0.82, 0.82]
        goat = prof.model("goat-7b")
        assert (goat.hub_id, goat.adapter, goat.merge_adapter) == ("huggyllama/llama-7b", "tiedong/goat-lora-7b", True)
        assert all(m.tokenizer == "hf-internal-testing/llama-tokenizer" for m in prof.models)
        loaded = {m.name: load_model(self._standin(m, tiny_dirs["llama-mha"], adapter_dir), verbose=False)
                  for m in prof.models}
        assert all(lm.arch.family == "llama" and lm.dtype == torch.float16 for lm in loaded.values())
        assert loaded["goat-7b"].adapter_merged
        ids = _ids(loaded["llama-7b"])
        base, goat_l = _logits(loaded["llama-7b"], ids), _logits(loaded["goat-7b"], ids)
        assert torch.isfinite(goat_l).all() and (goat_l.float() - base.float()).abs().max() > 1e-2

    def test_modern_profile(self, tiny_dirs):
        prof = load_profile("modern", REPO)
        assert [m.hub_id for m in prof.models] == [
            "Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-Math-1.5B", "Qwen/Qwen2.5-1.5B-Instruct"]
        for m in prof.models:
            lm = load_model(self._standin(m, tiny_dirs["qwen2"], None), verbose=False)
            assert lm.arch.family == "qwen2" and lm.arch.is_gqa and lm.spec.name == m.name
            assert _logits(lm, _ids(lm)).shape[-1] == lm.arch.vocab_size
