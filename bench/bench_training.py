"""Training time of every model the default profile trains, measured in one run.

Builds, from scratch in a temporary results folder (the cache is bypassed), the default profile's
organism, its LoRA and full arithmetic fine-tunes with their replicate seeds, and the positive
control, and the ground-truth chapter's planted models, exactly as the data chapter does
(``organism.build_all``: the planting in a process of its own from the start, the base on one
thread beside it, then the fine-tunes in parallel, longest first, one per core with one thread
each). Prints each build's own time, the CPU, the wall-clock total against the CPU budget (20
minutes for the organism's models, 20 more for the planted ones, issue 29), and what each build
reached::

    python bench/bench_training.py [--workers N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S = 1200.0
PLANTED_BUDGET_S = 1200.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=None,
                    help="fine-tunes trained at once (default: $ENTITY_TRACKING_TRAIN_WORKERS or the CPU count)")
    ap.add_argument("--keep", type=Path, default=None, help="results folder to keep the builds in")
    args = ap.parse_args(argv)

    from entity_tracking import organism as O
    from entity_tracking.config import load_profile
    from entity_tracking.io import ResultsPaths, read_json
    from entity_tracking.load import model_sources
    from entity_tracking.organism.build import PLANTED, WORKERS_ENV
    from entity_tracking.organism.planted import planted_dirs

    profile = load_profile("default")
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-organism-"))
    paths = ResultsPaths(root)
    specs = [*profile.models, *(r for m in profile.models for r in O.replicates(m))]

    t = time.perf_counter()
    built = O.build_all(specs, paths, workers=args.workers, progress=False, planted=profile.ground_truth)
    wall = time.perf_counter() - t

    workers = args.workers or int(os.environ.get(WORKERS_ENV, "0")) or os.cpu_count()
    print(f"results: {root}   fine-tunes at once: {workers}")
    print(f"{'model':28s} {'seconds':>8s}  reached")
    for s in specs:
        model, adapter = model_sources(s, paths)
        rec = read_json(Path(adapter or model) / "recipe.json")
        if rec["kind"] == "organism":
            reached = f"stages ended at {rec['stage_end_steps']}, 7-box validation {rec['val_accuracy']:.3f}"
        else:
            first, last = rec["evals"][0], rec["evals"][-1]
            reached = (f"step {last['step']}: 7-box validation {first['val_acc_7']:.2f} -> {last['val_acc_7']:.2f}, "
                       f"arithmetic exact match {last['arith_acc']:.2f}")
        print(f"{s.name:28s} {built[s.name]['seconds']:8.1f}  {reached}")
    base = read_json(planted_dirs(profile.ground_truth, paths).base / "recipe.json")
    last = base["log"][-1]
    print(f"{PLANTED:28s} {built[PLANTED]['seconds']:8.1f}  base {base['train_seconds']:.0f} s, its trainer's last "
          f"evaluation: clean {last['clean']:.3f}, interchange {last['iia_position_detector']:.2f} / "
          f"{last['iia_position_transmitter']:.2f} / {last['iia_value_fetcher']:.2f}")
    budget = BUDGET_S + PLANTED_BUDGET_S
    print(f"CPU: {base['cpu']}")
    print(f"{'wall clock, all builds':28s} {wall:8.1f}   budget {budget:.0f} s ({100 * wall / budget:.0f}% used)"
          + ("" if wall <= budget else "   OVER BUDGET"))
    return 0 if wall <= budget else 1


if __name__ == "__main__":
    sys.exit(main())
