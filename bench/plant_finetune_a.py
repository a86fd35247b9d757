"""Planted fine-tune (a), "enhances" (issue 29), research: from a planted model, degrade the
Position Transmitters (their value rows scaled by --scale), then fine-tune those heads' query, key and value weights only
on entity tracking; the known answer is "same circuit, gain carried by the transmitters". Checks,
on fresh held-out pairs through the planting hooks: the gain, and the share of it that patching
the transmitters' outputs (at the last token) from the fine-tune into the degraded base recovers
(cross-model patching of those heads alone).

    python bench/plant_finetune_a.py runs/H2 --scale 0.3 --steps 300
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from entity_tracking.model.tokenizer import build_word_tokenizer
from entity_tracking.organism import plant as P


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--scale", type=float, nargs="+", default=[0.5, 0.3, 0.2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    recipe = P.PlantRecipe(**json.loads((a.model / "plant_log.json").read_text())["recipe"])
    tok = build_word_tokenizer()
    lay, held = P.fresh_pairs(tok, recipe.num_boxes, 1024, seed=777)
    pt = recipe.designated()["position_transmitter"]
    d_head = recipe.d_model // recipe.n_heads

    def acc(model, z=None, everywhere=False):
        with torch.no_grad():
            if z is None:
                lg = model(input_ids=held.base_ids).logits[:, lay.last]
            else:
                nodes = {l: [(p, h) for p in range(lay.length) for ll, h in pt if ll == l] for l, _ in pt} \
                    if everywhere else P.group_nodes(pt, lay.last)
                take = P.node_mask(lay, recipe.n_layers, recipe.n_heads, nodes)
                lg = P.patched_logits(model, held.base_ids, z, take, d_head).logits[:, lay.last]
        return float((lg.argmax(-1) == held.answer).float().mean())

    planted = AutoModelForCausalLM.from_pretrained(a.model, attn_implementation="eager")
    print(json.dumps({"planted": acc(planted)}), flush=True)
    for s in a.scale:
        base = copy.deepcopy(planted)
        P.degrade_heads(base, pt, s)
        ft = copy.deepcopy(base)
        log = P.train_heads_only(ft, recipe, pt, a.steps, lr=a.lr, projections=("q_proj", "k_proj", "v_proj"))
        z_ft, _ = P.record_z(ft, held.base_ids, sorted({l for l, _ in pt}))
        b, f, patched, patched_all = acc(base), acc(ft), acc(base, z_ft), acc(base, z_ft, everywhere=True)
        gain = f - b
        print(json.dumps({"scale": s, "degraded_base": b, "finetuned": f, "gain": round(gain, 4),
                          "base_with_ft_transmitters": patched,
                          "recovered_share": round((patched - b) / gain, 4) if gain > 0 else None,
                          "base_with_ft_transmitters_everywhere": patched_all,
                          "recovered_share_everywhere": round((patched_all - b) / gain, 4) if gain > 0 else None,
                          "ft_log_last": log[-1]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
