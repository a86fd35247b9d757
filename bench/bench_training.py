"""Training time of the model organism and its two arithmetic fine-tunes, measured in one run.

Builds the default profile's organism recipe from scratch in a temporary results folder (the
cache is bypassed), then the Goat-style LoRA and the FLoat-style full fine-tune, and prints each
wall-clock time and the total against the 10-minute CPU budget, with the accuracies reached::

    python bench/bench_training.py [--threads N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


BUDGET_S = 600.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads for training (default: the library's, $ENTITY_TRACKING_TRAIN_THREADS or 1)")
    ap.add_argument("--keep", type=Path, default=None, help="results folder to keep the builds in")
    args = ap.parse_args(argv)
    if args.threads:
        os.environ["ENTITY_TRACKING_TRAIN_THREADS"] = str(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from entity_tracking import organism as O
    from entity_tracking.config import ModelSpec, OrganismSpec
    from entity_tracking.finetune import ensure_finetune
    from entity_tracking.io import ResultsPaths, read_json

    org = OrganismSpec()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-organism-"))
    paths = ResultsPaths(root)
    times: dict[str, float] = {}

    t = time.perf_counter()
    base, _ = O.ensure_built(ModelSpec(name="organism", build="organism", organism=org), paths, progress=False)
    times["base (organism)"] = time.perf_counter() - t
    for kind in ("lora", "full"):
        t = time.perf_counter()
        ensure_finetune(org, kind, base, paths.models / f"organism-{kind}", progress=False)
        times[f"fine-tune (organism-{kind})"] = time.perf_counter() - t

    total = sum(times.values())
    print(f"training threads: {read_json(base / 'recipe.json')['torch_threads']}   results: {root}")
    for k, v in times.items():
        print(f"{k:32s} {v:7.1f} s")
    print(f"{'total':32s} {total:7.1f} s   budget {BUDGET_S:.0f} s ({100 * total / BUDGET_S:.0f}% used)"
          + ("" if total <= BUDGET_S else "   OVER BUDGET"))

    rec = read_json(base / "recipe.json")
    model, tok = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    accs = {n: O.entity_accuracy(model, tok, n, 500, seed=0) for n in (3, 7)}
    print(f"base: stages ended at steps {rec['stage_end_steps']}, 7-box validation {rec['val_accuracy']:.3f}, "
          f"held-out 3-box {accs[3]:.3f}, 7-box {accs[7]:.3f}")
    for kind in ("lora", "full"):
        ev = read_json(paths.models / f"organism-{kind}" / "recipe.json")["evals"]
        print(f"organism-{kind}: " + ", ".join(
            f"step {e['step']}: arith {e['arith_acc']:.2f} / 7-box {e['val_acc_7']:.2f}" for e in ev))
    return 0 if total <= BUDGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
