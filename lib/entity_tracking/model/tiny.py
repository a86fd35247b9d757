"""Tiny random models of real families (Llama, Qwen2, Gemma3; GQA via ``n_kv_heads``) with the
project's word-level tokenizer: the stand-ins on which every architecture's code path is tested.

:func:`tiny_config` is the one place a family's config is made from a :class:`~entity_tracking.config.TinySpec`
(the model organism uses it too); :func:`build_tiny_model` saves a random model with its tokenizer
and a stamp of the spec, so a changed spec is rebuilt.

>>> # build_tiny_model(TinySpec(family="qwen2", n_layers=2, n_heads=4, n_kv_heads=2), "models/tiny-qwen")
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import TinySpec
from ..io import atomic_dir, atomic_write_text
from .tokenizer import build_word_tokenizer

__all__ = ["TINY_STAMP", "build_tiny_model", "tiny_config", "tiny_stamp"]

TINY_STAMP = "tiny_spec.json"
TINY_BUILDER_VERSION = 2

# --------------------------------------------------------------------------------------------
# Tiny models of each family


def tiny_config(spec: TinySpec, tok):
    d_head = spec.d_head or spec.d_model // spec.n_heads
    common = dict(
        vocab_size=len(tok),
        hidden_size=spec.d_model,
        intermediate_size=spec.d_mlp,
        num_hidden_layers=spec.n_layers,
        num_attention_heads=spec.n_heads,
        num_key_value_heads=spec.n_kv_heads or spec.n_heads,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if spec.family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common, head_dim=d_head)
    if spec.family == "qwen2":
        from transformers import Qwen2Config

        if d_head * spec.n_heads != spec.d_model:
            raise ValueError("qwen2 has no head_dim setting: leave d_head unset (d_model // n_heads)")
        return Qwen2Config(**common, tie_word_embeddings=True)
    if spec.family == "gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(**common, head_dim=d_head, query_pre_attn_scalar=d_head, sliding_window=512)
    raise ValueError(f"no tiny builder for family '{spec.family}'")


FAMILY_ADDS_BOS = {"llama": True, "qwen2": False, "gemma3": True}


def build_tiny_model(spec: TinySpec, save_dir: str | Path) -> Path:
    """Build a tiny random model of ``spec.family`` (llama, qwen2, gemma3) with the project's
    word-level tokenizer, saved to ``save_dir`` (atomically, with a stamp of ``spec``)."""
    from transformers import AutoModelForCausalLM

    add_bos = spec.add_bos if spec.add_bos is not None else FAMILY_ADDS_BOS[spec.family]
    with atomic_dir(save_dir) as tmp:
        tok = build_word_tokenizer(save_dir=tmp, add_bos=add_bos)
        cfg = tiny_config(spec, tok)
        torch.manual_seed(spec.seed)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp)
        atomic_write_text(Path(tmp) / TINY_STAMP, tiny_stamp(spec))
    return Path(save_dir)


def tiny_stamp(spec: TinySpec) -> str:
    return json.dumps({"builder": TINY_BUILDER_VERSION, "spec": spec.model_dump()}, sort_keys=True)


