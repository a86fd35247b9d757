"""Model loading (minimal first version: the locally built tiny model; the full loader and the
architecture table arrive with the Models issue)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from .config import ModelSpec, TinySpec, find_repo_root
from .io import ResultsPaths, atomic_dir
from .tokenizer import build_word_tokenizer

__all__ = ["build_tiny_model", "model_dir", "load_tokenizer"]


def build_tiny_model(spec: TinySpec, save_dir: str | Path) -> Path:
    """Build a tiny random Llama model with the project's word-level tokenizer, saved to ``save_dir``."""
    with atomic_dir(save_dir) as tmp:
        tok = build_word_tokenizer(save_dir=tmp)
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=spec.d_model,
            intermediate_size=spec.d_mlp,
            num_hidden_layers=spec.n_layers,
            num_attention_heads=spec.n_heads,
            num_key_value_heads=spec.n_kv_heads or spec.n_heads,
            max_position_embeddings=256,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(spec.seed)
        LlamaForCausalLM(cfg).save_pretrained(tmp)
    return Path(save_dir)


def model_dir(spec: ModelSpec, paths: ResultsPaths) -> Path | str:
    """Local directory (built on first use) or hub id holding the model of ``spec``."""
    if spec.build == "tiny":
        d = paths.models / spec.name
        if not (d / "config.json").exists():
            build_tiny_model(spec.tiny, d)
        return d
    if spec.local_path is not None:
        p = Path(spec.local_path).expanduser()
        return p if p.is_absolute() else find_repo_root() / p
    if spec.hub_id is not None:
        return spec.hub_id
    raise NotImplementedError(f"model '{spec.name}': build '{spec.build}' is not available yet")


def load_tokenizer(spec: ModelSpec, paths: ResultsPaths):
    """The tokenizer of ``spec`` (its ``tokenizer`` override, else the model's own)."""
    src = spec.tokenizer or model_dir(spec, paths)
    return AutoTokenizer.from_pretrained(str(src))
