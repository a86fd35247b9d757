"""The planting's own checks on a planted model, through the book's kernel and on the book's own
data (issue 29's "done when" numbers): clean accuracy per queried box, the context-ablation test
of the binding chapter (every head mean-ablated at every context position), interchange accuracy
of each designated group against the causal model's counterfactual, and accuracy with every head
outside the circuit resample-ablated. Writes ``ground_truth.json`` beside the model.

    python bench/plant_check.py runs/H2 --boxes 4
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from entity_tracking import task as D
from entity_tracking.config import ModelSpec
from entity_tracking.load import load_model
from entity_tracking.methods.ablation import compute_means
from entity_tracking.methods.binding import accuracy_by_box, context_ablation
from entity_tracking.methods.planting import (GroundTruth, counterfactual_targets, interchange_logits,
                                              resample_ablated_logits)
from entity_tracking.organism.plant import GROUP_POSITION, PlantRecipe


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--boxes", type=int, required=True)
    ap.add_argument("--contexts", type=int, default=100)
    ap.add_argument("--pairs", type=int, default=400)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    log = json.loads((a.model / "plant_log.json").read_text())
    recipe = PlantRecipe(**log["recipe"])
    lm = load_model(ModelSpec(name="planted", local_path=str(a.model)), verbose=False)
    tok, n = lm.tokenizer, a.boxes
    truth = GroundTruth(recipe.designated(), dict(GROUP_POSITION), lm.arch.n_layers, lm.arch.n_heads,
                        meta={"scaffold": {"position_code": [[0, 0]]}, "num_boxes": n,
                              "note": "head 0.0 is trained to attend uniformly to BOS and the segment starts: "
                                      "an ordinal code that is the same in every prompt of one layout (not a circuit node)"})
    truth.save(a.model)
    prompts = D.make_eval_prompts(tok, a.contexts * n, num_boxes=n, seed=0)
    out: dict = {"boxes": n, "n_prompts": len(prompts)}
    out["by_box"] = [b.as_dict() for b in accuracy_by_box(lm, prompts, progress=False)]
    means = compute_means(lm, D.make_mean_reference_prompts(tok, 500, num_boxes=n, seed=1), progress=False)
    summ = context_ablation(lm, prompts, means, progress=False).summary()
    out["clean"] = summ["clean"].as_dict()
    out["context_ablated"] = summ["context_ablated"].as_dict()
    out["retention_context_ablated"] = summ["retention_context_ablated"].as_dict()
    pairs = D.make_desiderata(tok, "positional", a.pairs, num_boxes=n, seed=202)
    with torch.no_grad():
        for g, heads in truth.heads.items():
            tgt = counterfactual_targets(tok, pairs, truth.variable(g))
            pred = interchange_logits(lm, pairs, heads, truth.positions[g]).argmax(-1)
            out[f"iia_{g}"] = round(float((pred == tgt).float().mean()), 4)
        logits, answers = resample_ablated_logits(lm, pairs, truth.outside())
        out["resample_ablated_outside"] = round(float((logits.argmax(-1) == answers).float().mean()), 4)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
