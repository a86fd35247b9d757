"""The full arithmetic fine-tune's length, chosen on held-out problems that are held out.

Trains the default profile's full fine-tune from a cached base at several lengths and seeds (one
torch thread per run, ``--workers`` runs at a time), and prints each run's exact match on the
recipe's held-out problems, overall and per operand digit count, with the number of held-out
problems found in its training stream (0 since FINETUNE_VERSION 2). This is the experiment behind
``finetune.steps`` in ``params/default.yaml``; its runs are logged in ``notes/organism.md``::

    python bench/arithmetic_recipe.py --base results/default/models/organism-base-<hash> \\
        --steps 800 1000 --seeds 0 1 2 [--workers 2] [--out DIR] [--kind full]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def _one(base: str, steps: int, seed: int, kind: str, out: str) -> dict:
    import torch

    torch.set_num_threads(1)
    from entity_tracking.config import load_profile
    from entity_tracking.io import cpu_name
    from entity_tracking.organism.finetune import finetune, heldout_audit

    org = load_profile("default").base_model.organism
    field = "steps" if kind == "full" else "steps_lora"
    spec = org.finetune.model_copy(update={field: steps, "seed": seed})
    t = time.perf_counter()
    meta = finetune(base, spec, kind, Path(out) / f"{kind}-{steps}-seed{seed}", org=org, progress=False)
    last = meta["evals"][-1]
    return {"kind": kind, "steps": steps, "seed": seed, "seconds": round(time.perf_counter() - t, 1),
            "exact_match": last["arith_acc"], "by_digits": last.get("arith_acc_by_digits"),
            "val_acc_7": last.get("val_acc_7"), "found_in_training": heldout_audit(spec, kind, [seed])[0]["found in training"],
            "curve": [(e["step"], round(e["arith_acc"], 3)) for e in meta["evals"]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, type=Path, help="a cached base organism's directory")
    ap.add_argument("--steps", type=int, nargs="+", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--kind", choices=["full", "lora"], default="full")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="where the fine-tunes go (default: a temporary folder)")
    args = ap.parse_args(argv)
    if not (args.base / "recipe.json").is_file():
        raise SystemExit(f"--base {args.base}: no recipe.json there; point it at a built organism-base-<hash> folder")
    out = args.out or Path(tempfile.mkdtemp(prefix="arith-recipe-"))
    jobs = [(str(args.base), s, seed, args.kind, str(out)) for s in sorted(args.steps, reverse=True) for seed in args.seeds]
    with ProcessPoolExecutor(args.workers) as ex:
        rows = list(ex.map(_one, *zip(*jobs)))
    print(f"CPU: {cpu_name()}   base: {args.base.name}   runs at once: {args.workers}")
    print(f"{'kind':5s} {'steps':>5s} {'seed':>4s} {'seconds':>8s} {'exact':>6s}  by digits                 held-out in training")
    for r in rows:
        digits = " ".join(f"{d}:{v:.2f}" if v is not None else f"{d}:-" for d, v in (r["by_digits"] or {}).items())
        print(f"{r['kind']:5s} {r['steps']:5d} {r['seed']:4d} {r['seconds']:8.1f} {r['exact_match']:6.3f}  "
              f"{digits:25s} {r['found_in_training']}")
    (out / "arithmetic_recipe.json").write_text(json.dumps(rows, indent=1))
    print(f"rows: {out / 'arithmetic_recipe.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
