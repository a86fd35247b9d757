"""Helpers shared by test modules (import as ``from helpers import ...``; pytest puts tests/ on the path)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from entity_tracking.model.arch import arch_for


def sharpen(lm, scale: float = 4.0):
    """Scale the random weight matrices so heads have visible effects (init std 0.02 makes
    attention almost uniform and every effect ~1e-6)."""
    with torch.no_grad():
        for p in lm.hf.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return lm


def mha_twin(gqa_dir: Path, out: Path) -> Path:
    """The multi-head model computing the same function as a GQA one: each kv head's k/v rows
    repeated for the query heads it serves."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(gqa_dir)
    gqa = AutoModelForCausalLM.from_pretrained(gqa_dir)
    a = arch_for(gqa)
    cfg.num_key_value_heads = cfg.num_attention_heads
    twin = AutoModelForCausalLM.from_config(cfg)
    state = gqa.state_dict()
    for layer in range(a.n_layers):
        for site in ("k_proj", "v_proj"):
            for kind in ("weight", "bias"):
                key = f"{a.path(site, layer)}.{kind}"
                if key in state:
                    w = state[key].view(a.n_kv_heads, a.d_head, *state[key].shape[1:])
                    state[key] = w.repeat_interleave(a.group_size, dim=0).reshape(a.n_heads * a.d_head,
                                                                                    *state[key].shape[1:])
    twin.load_state_dict(state)
    twin.save_pretrained(out)
    for f in Path(gqa_dir).glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    return out
