"""Naive vs fast path patching on a model of the organism's size, measured in one run.

Builds a random Llama like the CPU model organism (4 layers x 8 heads, d_model 128, d_mlp 512)
with the project's word-level tokenizer, makes 7-box path-patching pairs (~54-token prompts),
and runs the four steps of the circuit search twice from scratch: with ``method="fast"`` and
with the naive two-passes-per-sender oracle, feeding both the receivers chosen by the fast run.
Prints each method's CPU time (this process's, all threads: robust on a machine shared with
other jobs) and wall-clock time, the speed ratios, the peak memory of each sweep (the process's
resident set sampled every 2 ms from /proc, as the rise over its level when the sweep began --
tracemalloc does not see torch's tensor buffers), its analytic estimate
(:func:`entity_tracking.methods.path_patching.estimate_cost`), and the largest score difference (must be
below 1e-4)::

    python bench/bench_path_patching.py [--examples 64] [--threads 1] [--scale 4]

``--scale`` multiplies the random weight matrices so that heads have visible effects (scores of
order 0.01-0.1 rather than 1e-6), which makes the agreement check meaningful.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import threading
import time

import torch

from organism_sized import add_options, organism_sized

TOLERANCE = 1e-4
GOAL = 20.0


class PeakRSS:
    """Peak resident memory of this process within a ``with`` block, sampled every 2 ms."""

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # no /proc: the lifetime peak is the best available
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=64)
    add_options(ap)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--receivers", default="8,4,6", help="top heads passed on by steps 1-3 (default 8,4,6)")
    args = ap.parse_args(argv)
    lm = organism_sized(args)

    from entity_tracking import task as D
    from entity_tracking.methods import path_patching as PP

    pairs = D.make_path_patching_pairs(lm.tokenizer, args.examples, args.boxes, seed=0)
    enc = D.encode_pairs(lm.tokenizer, pairs, padding_side="right")
    n, seq = enc["base"]["input_ids"].shape
    k = dict(zip(("value_fetcher", "position_transmitter", "position_detector"),
                 (int(x) for x in args.receivers.split(","))))
    print(f"model: {lm.arch.describe()}; {n} examples x {seq} tokens; torch threads {torch.get_num_threads()}")
    estimates = {}
    for method in ("fast", "naive"):
        estimates[method] = PP.estimate_cost(lm.arch, n, seq, "float32", method, batch_size=args.batch_size,
                                             n_receivers={g: k[PP.STEPS[g].receivers_from] for g in PP.STEPS
                                                          if PP.STEPS[g].receivers_from})
        print(estimates[method])

    results: dict[str, dict] = {}
    receivers: dict[str, list] = {}
    for method in ("fast", "naive"):
        pp = PP.PathPatcher(lm, enc["base"], enc["source"], enc["target"], batch_size=args.batch_size,
                            progress=False, verbose=False)
        mem = PeakRSS().__enter__()
        t0, c0 = time.perf_counter(), time.process_time()
        scores, times = {}, {}
        if method == "fast":
            pp.prefetch()  # one clean and one corrupt caching run for all four steps
        for g, step in PP.STEPS.items():
            if method == "fast":
                receivers[g] = PP.top_heads(scores[step.receivers_from], k[step.receivers_from]) \
                    if step.receivers_from else []
            c = c0 if not times else time.process_time()  # the first step carries the caches
            scores[g] = PP.step_scores(lm, pp, g, receivers[g], method=method)
            times[g] = time.process_time() - c
        wall = time.perf_counter() - t0
        total = time.process_time() - c0
        mem.__exit__(None, None, None)
        rise = (mem.peak - mem.start) / 2**20
        results[method] = {"scores": scores, "times": times, "total": total, "wall": wall}
        print(f"{method:5s}: CPU {total:7.2f} s (" + ", ".join(f"{g} {t:.2f}" for g, t in times.items())
              + f"); wall {wall:.2f} s; peak memory +{rise:.0f} MiB over {mem.start / 2**20:.0f} MiB resident "
              f"(estimate {estimates[method].peak_bytes / 2**20:.0f} MiB)")

    diff = max(float((results["fast"]["scores"][g] - results["naive"]["scores"][g]).abs().max()) for g in PP.STEPS)
    biggest = max(float(results["naive"]["scores"][g].abs().max()) for g in PP.STEPS)
    ratio = results["naive"]["total"] / results["fast"]["total"]
    wall_ratio = results["naive"]["wall"] / results["fast"]["wall"]
    print(f"largest |fast - naive| score difference: {diff:.2e} (largest |score| {biggest:.3f}; tolerance {TOLERANCE:g})")
    print("per-step speed ratio: " + ", ".join(
        f"{g} {results['naive']['times'][g] / results['fast']['times'][g]:.1f}x" for g in PP.STEPS))
    print(f"speed ratio naive/fast: {ratio:.1f}x in CPU time, {wall_ratio:.1f}x in wall time (goal >= {GOAL:.0f}x)"
          + ("" if ratio >= GOAL else "   BELOW GOAL"))
    ok = diff < TOLERANCE
    if not ok:
        print("FAIL: fast and naive scores disagree")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
