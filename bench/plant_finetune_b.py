"""Planted fine-tune (b), "new route" (issue 29), research: from a planted model, degrade the
Value Fetchers (their value rows scaled by --scale), then fine-tune only heads *outside* the
circuit in the last layer (--new, default 3.2 3.3) on entity tracking, every circuit head frozen.
The known answer: the gain is carried by the new heads, and cross-model patching of the base
circuit recovers none of it (the new heads sit in the last layer, so no circuit head's input
changes). Checks, on fresh held-out pairs through the planting hooks: the gain, the share that
patching the base circuit's heads (at their positions) recovers, and the share that patching the
new heads (at the last token) recovers.

    python bench/plant_finetune_b.py runs/H1 --scale 0.5 0.0 --steps 300
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
    ap.add_argument("--scale", type=float, nargs="+", default=[0.5, 0.0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--new", nargs="+", default=["3.2", "3.3"])
    ap.add_argument("--projections", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--attend", action="store_true", help="supervise the new heads to attend as Value Fetchers")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    recipe = P.PlantRecipe(**json.loads((a.model / "plant_log.json").read_text())["recipe"])
    tok = build_word_tokenizer()
    lay, held = P.fresh_pairs(tok, recipe.num_boxes, 1024, seed=778)
    des = recipe.designated()
    vf = des["value_fetcher"]
    new = [tuple(int(x) for x in s.split(".")) for s in a.new]
    d_head = recipe.d_model // recipe.n_heads
    circuit_nodes = {}
    for g, heads in des.items():
        for l, h in heads:
            circuit_nodes.setdefault(l, []).append((lay.position(P.GROUP_POSITION[g]), h))

    def acc(model, z=None, nodes=None):
        with torch.no_grad():
            if z is None:
                lg = model(input_ids=held.base_ids).logits[:, lay.last]
            else:
                take = P.node_mask(lay, recipe.n_layers, recipe.n_heads, nodes)
                lg = P.patched_logits(model, held.base_ids, z, take, d_head).logits[:, lay.last]
        return float((lg.argmax(-1) == held.answer).float().mean())

    planted = AutoModelForCausalLM.from_pretrained(a.model, attn_implementation="eager")
    print(json.dumps({"planted": acc(planted), "new": new}), flush=True)
    for s in a.scale:
        base = copy.deepcopy(planted)
        P.degrade_heads(base, vf, s)
        ft = copy.deepcopy(base)
        attention = {h: "value_fetcher" for h in new} if a.attend else None
        log = P.train_heads_only(ft, recipe, new, a.steps, lr=a.lr, projections=tuple(a.projections.split(",")),
                                 attention=attention)
        z_ft, _ = P.record_z(ft, held.base_ids, range(recipe.n_layers))
        b, f = acc(base), acc(ft)
        circ = acc(base, z_ft, circuit_nodes)
        newp = acc(base, z_ft, P.group_nodes(new, lay.last))
        gain = f - b
        share = (lambda x: round((x - b) / gain, 4) if gain > 0 else None)
        print(json.dumps({"scale": s, "degraded_base": b, "finetuned": f, "gain": round(gain, 4),
                          "base_with_ft_circuit": circ, "recovered_circuit": share(circ),
                          "base_with_ft_new_heads": newp, "recovered_new_heads": share(newp),
                          "ft_log_last": log[-1]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
