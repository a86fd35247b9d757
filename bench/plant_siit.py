"""Research runs of the SIIT planting (issue 29): ``--field value`` for any PlantRecipe field;
prints one JSON line per evaluation and saves the model under --out. Logged in notes/organism.md."""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from pathlib import Path

import torch

from entity_tracking.organism.plant import PlantRecipe, plant


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    for f in dataclasses.fields(PlantRecipe):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--save-at", type=int, nargs="*", default=[], help="also save the model at these steps")
    ap.add_argument("--stages", choices=["4", "7"], default=None,
                    help="run a whole planting curriculum (plant.STAGES, ending on 4 boxes, or plant.STAGES_7)")
    ap.add_argument("--init", type=Path, default=None, help="continue a saved model (fresh optimizer)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    recipe = PlantRecipe(**{f.name: getattr(a, f.name) for f in dataclasses.fields(PlantRecipe)})
    if a.stages:
        from entity_tracking.organism import plant as P
        head = {"recipe": dataclasses.asdict(dataclasses.replace(P.PLANTED, seed=a.seed)),
                "stages": list(P.STAGES_7 if a.stages == "7" else P.STAGES)}
    else:
        head = {"recipe": dataclasses.asdict(recipe)}
    print(json.dumps({**head, "cpu": platform.processor() or platform.machine()}), flush=True)
    def save(step, model):
        if step in a.save_at and a.out:
            model.save_pretrained(a.out / f"step{step}")
    init = None
    if a.init:
        from transformers import AutoModelForCausalLM
        init = AutoModelForCausalLM.from_pretrained(a.init, attn_implementation="eager")
    if a.stages:
        from entity_tracking.organism.plant import PLANTED, STAGES, STAGES_7, plant_stages
        STAGES = STAGES_7 if a.stages == "7" else STAGES  # noqa: N806
        recipe = dataclasses.replace(PLANTED, seed=a.seed)
        model, tok, log = plant_stages(recipe, STAGES, progress=False, every=a.every,
                                           callback=lambda r: print(json.dumps(r), flush=True))
        recipe = dataclasses.replace(recipe, **STAGES[-1])
    else:
        model, tok, log = plant(recipe, progress=False, every=a.every, model=init, on_eval=save,
                                callback=lambda r: print(json.dumps(r), flush=True))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(a.out)
        tok.save_pretrained(str(a.out))
        (a.out / "plant_log.json").write_text(json.dumps({"recipe": dataclasses.asdict(recipe), "log": log}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
