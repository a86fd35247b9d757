"""DCM over every position against DCM from the base prompts' cached prefix, measured in one run.

Builds a random Llama like the CPU model organism (4 layers x 8 heads, d_model 128, d_mlp 512)
with the project's word-level tokenizer and 7-box ``positional`` desideratum pairs, then, for a
group of heads at the last token and one at the query label, learns a mask
(:func:`entity_tracking.methods.dcm.train_mask`, the book's settings: 2 epochs, batches of 32, eval every
4 steps) and scores three head selections on fresh-style pairs
(:func:`~entity_tracking.methods.dcm.desideratum_accuracy`, as the semantics do), each twice: running
every position (``cached=False``) and only the tokens from the earliest patch position on
(a cached :class:`~entity_tracking.intervene.patching.Session` of the base prompts). Prints the CPU time of each (this process's: robust on a
machine shared with other jobs), the speed ratios full/prefix, and checks that masks, accuracies
and per-pair answers are the same::

    python bench/bench_dcm.py [--pairs 400] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from organism_sized import add_options, organism_sized


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=400, help="train pairs (eval and test: half as many each)")
    add_options(ap)
    args = ap.parse_args(argv)
    lm = organism_sized(args)

    from entity_tracking import task as D
    from entity_tracking.intervene.patching import Session
    from entity_tracking.methods import dcm

    n = args.pairs
    recs = D.make_desiderata(lm.tokenizer, "positional", 2 * n, num_boxes=args.boxes, seed=0)
    enc = D.encode_pairs(lm.tokenizer, recs, padding_side="right")
    with torch.no_grad():  # targets the patched model reaches now and then: masks have something to learn
        enc["target"] = dcm.masked_logits(lm, enc["base"], dcm.source_head_outputs(lm, enc["source"], [(3, 1)], "last"),
                                          [(3, 1)], "last", torch.zeros(1)).argmax(-1)
    split = {name: {"base": dcm.take_rows(enc["base"], rows), "source": dcm.take_rows(enc["source"], rows),
                    "target": enc["target"][rows]}
             for name, rows in (("train", slice(0, n)), ("eval", slice(n, n + n // 2)), ("test", slice(n + n // 2, 2 * n)))}
    groups = {"last": [(3, 1), (3, 5), (2, 0), (2, 6), (1, 2)], "query_label": [(0, 1), (1, 7), (0, 6)]}
    selections = [("last", [(3, 1), (2, 0)]), ("last", [(3, 5)]), ("query_label", [(0, 1), (1, 7)])]
    print(f"model: {lm.arch.describe()}; {n} train pairs x {enc['base']['input_ids'].shape[1]} tokens; "
          f"torch threads {torch.get_num_threads()}")

    times, got = {}, {}
    for fast in (False, True):
        c0 = time.process_time()
        masks = [dcm.train_mask(lm, heads, pos, split["train"], split["eval"], split["test"], epochs=2,
                                batch_size=32, eval_every=4, progress=False, cached=fast).to_json()
                 for pos, heads in groups.items()]
        c1 = time.process_time()
        session = Session(lm, enc["base"], cached=fast, desc="desideratum patching")
        scored = [dcm.desideratum_accuracy(lm, heads, pos, enc, session=session) for pos, heads in selections]
        c2 = time.process_time()
        times[fast] = (c1 - c0, c2 - c1)
        got[fast] = (masks, scored)
        print(f"{'prefix' if fast else 'full  '}: masks CPU {c1 - c0:6.1f} s, semantics CPU {c2 - c1:6.1f} s "
              f"({len(selections)} selections on {2 * n} pairs)")
    same = got[False] == got[True]
    full, fast = times[False], times[True]
    print(f"speed ratio full/prefix: masks {full[0] / fast[0]:.1f}x, semantics {full[1] / fast[1]:.1f}x, "
          f"together {sum(full) / sum(fast):.1f}x in CPU time; masks, accuracies and answers identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
