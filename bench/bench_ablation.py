"""Mean ablation with and without running each setting once, on a model of the organism's size.

Builds a random Llama like the CPU model organism (4 layers x 8 heads, d_model 128, d_mlp 512)
with the project's word-level tokenizer, 7-box evaluation prompts labelled with the model's own
answers (so that F(M) = 1 and ablations lose accuracy, as in a model that does the task), and
runs, for one model, the mean-ablation calls the circuit and faithfulness chapters make: F(M),
minimality of a candidate circuit, necessity of its Value Fetchers, faithfulness of three
circuits, completeness and the shortfall by position. Twice: as before (every setting of every
call run, :func:`entity_tracking.methods.ablation.evaluate` without deduplication or memo) and as the
book runs them now (equal settings run once, one memo per model). Prints the rows each way runs,
the CPU time of each (this process's: robust on a machine shared with other jobs), the speed
ratio old/new, and checks that every evaluation is the same::

    python bench/bench_ablation.py [--examples 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from organism_sized import add_options, organism_sized


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=200, help="evaluation prompts (the book: 500)")
    add_options(ap)
    args = ap.parse_args(argv)
    lm = organism_sized(args)

    from entity_tracking.intervene import patching as P
    from entity_tracking.methods import ablation as A
    from entity_tracking import task as D
    from entity_tracking.methods.circuit import Circuit

    records = D.make_eval_prompts(lm.tokenizer, args.examples, num_boxes=args.boxes, seed=0)
    batch = A.encode_for(lm, records)
    batch["target"] = A.mean_ablated_logits(lm, batch, None).argmax(-1)  # F(M) = 1
    reference = D.make_mean_reference_prompts(lm.tokenizer, 100, num_boxes=args.boxes, seed=1,
                                              n_tokens=records[0]["n_tokens"])
    means = A.compute_means(lm, reference, progress=False)
    candidates = Circuit("organism-sized", {"value_fetcher": [(3, 1), (3, 5), (2, 0), (2, 6), (1, 2)],
                                            "position_transmitter": [(1, 4), (0, 3)],
                                            "position_detector": [(0, 1), (1, 7), (0, 6)],
                                            "structure_reader": [(0, 2), (0, 5)]})
    others = [Circuit(f"variant {i}", {g: hs[: max(1, len(hs) - i)] for g, hs in candidates.groups.items()})
              for i in (1, 2)]
    kw = dict(batch_size=32, progress=False)

    def book(memo) -> list:
        """The circuit and faithfulness chapters' mean-ablation calls for one model."""
        out = [A.model_accuracy(lm, batch, memo=memo, **kw)]
        m = A.minimality(lm, {k: v[: len(v) // 2] for k, v in batch.items()}, means, candidates, memo=memo, **kw)
        out += [m.circuit_accuracy] + [e for h in m.heads for e in (h.before, h.after)]
        n = A.necessity(lm, batch, means, m.pruned, "value_fetcher", n_random=10, memo=memo, **kw)
        out += [n.full, n.ablated, *n.random_any, *n.random_outside]
        for c in (candidates, *others):
            f = A.faithfulness(lm, batch, means, c, n_random=10, memo=memo, **kw)
            out += [f.full, f.circuit_eval, f.ablated, *f.random]
        comp = A.completeness(lm, batch, means, candidates, n_draws=10, memo=memo, **kw)
        out += [e for d in [*comp.draws, *comp.groups.values()] for e in (d.circuit_minus, d.model_minus)]
        out += [r["evaluation"] for r in A.shortfall_by_position(lm, batch, means, candidates, memo=memo, **kw)]
        return out

    rows = {"old": 0, "new": 0}
    real_run, real_key = P._execute, A.setting_key

    def counting(which):  # every forward pass the kernel schedules (reference runs included)
        def run(lm_, b, *a, **k):
            rows[which] += int(b["input_ids"].shape[0])
            return real_run(lm_, b, *a, **k)
        return run

    times, results = {}, {}
    for which in ("old", "new"):
        P._execute = counting(which)
        if which == "old":  # every setting its own key: nothing deduplicated, nothing remembered
            A.setting_key = lambda arch, ablation: ("every setting run", id(ablation))
        c0 = time.process_time()
        results[which] = book(None if which == "old" else {})
        times[which] = time.process_time() - c0
        P._execute, A.setting_key = real_run, real_key
        print(f"{which}: {rows[which]} rows (setting x prompt) run, CPU {times[which]:.1f} s")
    same = all(torch.equal(a.predicted, b.predicted) for a, b in zip(results["old"], results["new"]))
    print(f"{len(results['new'])} evaluations on {args.examples} prompts; model {lm.arch.describe()}; "
          f"torch threads {torch.get_num_threads()}")
    print(f"speed ratio old/new: {times['old'] / times['new']:.2f}x in CPU time "
          f"({rows['old'] / rows['new']:.2f}x fewer rows); evaluations identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
