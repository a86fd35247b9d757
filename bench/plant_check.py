"""The planting's own checks on a research planted model (a ``bench/plant_siit.py --out`` directory),
through the book's kernel and on prompts made like the book's (issue 29's "done when" numbers):
:func:`entity_tracking.methods.ground_truth.planted_checks`, as the ground-truth chapter runs them
on the book's planted base. Writes ``ground_truth.json`` beside the model.

    python bench/plant_check.py runs/H2 --boxes 4
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from entity_tracking import task as D
from entity_tracking.config import ModelSpec
from entity_tracking.io import write_json
from entity_tracking.load import load_model
from entity_tracking.methods.ablation import compute_means
from entity_tracking.methods.ground_truth import planted_checks
from entity_tracking.methods.planting import GroundTruth
from entity_tracking.organism.plant import PlantRecipe
from entity_tracking.organism.planted import truth_json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--boxes", type=int, required=True)
    ap.add_argument("--contexts", type=int, default=100)
    ap.add_argument("--pairs", type=int, default=400)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    recipe = PlantRecipe(**json.loads((a.model / "plant_log.json").read_text())["recipe"])
    write_json(a.model / "ground_truth.json", truth_json(recipe, a.boxes))
    lm = load_model(ModelSpec(name="planted", local_path=str(a.model)), verbose=False)
    tok, n = lm.tokenizer, a.boxes
    prompts = D.make_eval_prompts(tok, a.contexts * n, num_boxes=n, seed=0)
    means = compute_means(lm, D.make_mean_reference_prompts(tok, 500, num_boxes=n, seed=1), progress=False)
    pairs = D.make_desiderata(tok, "positional", a.pairs, num_boxes=n, seed=202)
    out = planted_checks(lm, GroundTruth.load(a.model), prompts, means, pairs)
    print(json.dumps({k: out[k] for k in ("clean", "by_box", "context_kept", "interchange", "outside_kept", "sample")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
