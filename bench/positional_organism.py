"""Experiments towards a positional organism (issue 17): train a recipe with context resampling
and measure it with the binding chapter's context-ablation test.

One run = the recipe of ``--spec`` (OrganismSpec fields as JSON, ``positional`` among them)
trained, then measured on the data chapter's held-out 7-box prompts (profile data seed 0): clean
accuracy, accuracy with every head mean-ablated at every context position
(:func:`entity_tracking.methods.binding.context_ablation`, means over mean-reference prompts as the
chapters take them), retention, and both per queried box. Prints one JSON line and writes it,
with the training log, under ``--out``.

The curriculum prefix (kv, vk, filler) does not depend on ``positional``; ``--prefix-cache``
trains it once per prefix recipe and starts the paper-format stage from the cached model (with a
fresh optimizer, so not bit-identical to the recipe run end to end; ``--full`` runs that)::

    python bench/positional_organism.py --name p4-r1 --prefix-cache results/positional-bench/prefix \\
        --spec '{"final_max_steps": 600, "target_accuracy": 1.0, "positional": {}}'
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from entity_tracking.config import ModelSpec, OrganismSpec
from entity_tracking.load import load_model
from entity_tracking.model.arch import arch_for
from entity_tracking.methods import binding
from entity_tracking.methods.ablation import compute_means
from entity_tracking.organism import STAGES, resampled_context, train_organism
from entity_tracking.organism.build import base_fields
from entity_tracking.task.samplers import make_eval_prompts, make_mean_reference_prompts

#: Fields of OrganismSpec that only act in the paper-format stage.
FINAL_FIELDS = ("positional", "final_max_steps", "target_accuracy", "target_boxes")


def prefix_key(spec: OrganismSpec) -> str:
    d = {k: v for k, v in base_fields(spec).items() if k not in FINAL_FIELDS}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def report(rec: dict) -> None:
    """Training callback: one line per validation check (and per 100 steps), flushed to the log."""
    if "stage_acc" in rec or "val_acc_7" in rec or rec["step"] % 100 == 0:
        print(json.dumps(rec), flush=True)


def grown(prefix_model, spec: OrganismSpec):
    """A model of ``spec`` (more layers than ``prefix_model``) that computes what the prefix model
    computes: the prefix's layers first, then blocks that start as the identity (``residual_init``
    0 zeroes their writes to the residual stream), so the deeper model keeps the learned prefix and
    gains room for more hops. Module paths come from the architecture table."""
    if spec.residual_init != 0.0:
        raise ValueError("growing needs residual_init 0 (new blocks must start as the identity)")
    big = train_organism(spec, progress=False, max_total_steps=0).model
    small_arch, big_arch = arch_for(prefix_model), arch_for(big)
    if small_arch.n_layers >= big_arch.n_layers:
        raise ValueError("the grown model must have more layers than the prefix")
    sd = big.state_dict()
    for key, value in prefix_model.state_dict().items():
        if key not in sd or sd[key].shape != value.shape:
            raise ValueError(f"prefix weight {key} does not fit the grown model")
        sd[key] = value
    big.load_state_dict(sd)
    return big


def train(spec: OrganismSpec, out: Path, prefix_cache: Path | None, full: bool, grow_from: int | None = None,
          paper_warmup: int | None = None, init: Path | None = None) -> dict:
    """Train ``spec`` into ``out/model``; returns the training record."""
    rec: dict = {}
    t0 = time.perf_counter()
    if full or prefix_cache is None:
        res = train_organism(spec, progress=False, callback=report)
        rec["prefix_seconds"] = None
    else:
        pspec = spec.model_copy(update={"n_layers": grow_from}) if grow_from else spec
        pdir = prefix_cache / f"prefix-{prefix_key(pspec)}"
        if init is None and not (pdir / "config.json").is_file():
            pre = train_organism(pspec, progress=False, stages=STAGES[:-1], callback=report)
            pre.model.save_pretrained(pdir)
            (pdir / "prefix.json").write_text(json.dumps({"stage_steps": pre.stage_steps, "seconds": pre.seconds}))
        meta = json.loads((pdir / "prefix.json").read_text())
        rec["prefix_steps"], rec["prefix_seconds"] = meta["stage_steps"], round(meta["seconds"], 1)
        model = AutoModelForCausalLM.from_pretrained(init or pdir)
        if grow_from:
            model = grown(model, spec)
        # the optimizer starts afresh here: a warm-up keeps its first steps (~lr per weight) from
        # undoing the prefix
        cont = spec.model_copy(update={"warmup_steps": paper_warmup}) if paper_warmup is not None else spec
        res = train_organism(cont, progress=False, stages=STAGES[-1:], model=model, callback=report)
    rec["train_seconds"] = round(time.perf_counter() - t0, 1)
    rec["stage_steps"] = res.stage_steps
    rec["val_curve"] = [(h["step"], h[f"val_acc_{spec.target_boxes}"]) for h in res.history
                        if f"val_acc_{spec.target_boxes}" in h]
    res.model.save_pretrained(out / "model")
    res.tokenizer.save_pretrained(str(out / "model"))
    return rec


def measure(model_dir: Path, n: int, n_ref: int, boxes: int = 7) -> dict:
    """Clean and context-ablated accuracy on ``n`` held-out prompts, overall and per queried box."""
    lm = load_model(ModelSpec(name="positional-probe", local_path=str(model_dir)), verbose=False)
    ev = make_eval_prompts(lm.tokenizer, n, num_boxes=boxes, seed=0)
    ref = make_mean_reference_prompts(lm.tokenizer, n_ref, num_boxes=boxes, seed=0, n_tokens=ev[0]["n_tokens"])
    means = compute_means(lm, ref, progress=False)
    res = binding.context_ablation(lm, ev, means, progress=False)
    s = res.summary(n_resamples=200)
    q = torch.tensor([int(p["query_index"]) for p in ev])
    resampled = resampled_accuracy(lm, ev)
    per_box = {k: [round(float(res.evaluations[k].correct[q == b].float().mean()), 3) for b in range(boxes)]
               for k in ("clean", "context_ablated")}
    return {"clean": round(s["clean"].value, 3), "context_ablated": round(s["context_ablated"].value, 3),
            "retention": round(s["retention_context_ablated"].value, 3),
            "retention_interval": [round(s["retention_context_ablated"].low, 3),
                                   round(s["retention_context_ablated"].high, 3)],
            "label_kept": round(s["context_ablated_label_kept"].value, 3),
            "query_ablated": round(s["query_ablated"].value, 3), "resampled": resampled, "per_box": per_box}


@torch.no_grad()
def resampled_accuracy(lm, prompts) -> float:
    """Accuracy with the context's head outputs taken from another context's prompt (the training
    intervention, here as a diagnostic beside mean ablation): prompts come in groups of one
    context, so each row reads the row one group on (same query index, another context)."""
    enc = lm.tokenizer([p["text"] for p in prompts], return_tensors="pt", padding=True)
    ids = enc["input_ids"]
    if not bool(enc["attention_mask"].all()):
        raise ValueError("resampled_accuracy needs prompts of one length")
    k = len(prompts[0]["objects"])
    n_ctx = ids.shape[1] - 4  # everything before the query's "Box <label> contains the"
    n = (len(prompts) // k) * k
    src = (torch.arange(n) + k) % n  # the same query index, the next context
    targets = torch.tensor([lm.tokenizer(" " + p["answer"], add_special_tokens=False)["input_ids"][0] for p in prompts[:n]])
    with resampled_context(lm.hf, n_ctx, src):
        pred = lm.hf(input_ids=ids[:n]).logits[:, -1].argmax(-1)
    return round(float((pred == targets).float().mean()), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--spec", default="{}", help="OrganismSpec fields as JSON")
    ap.add_argument("--out", default="results/positional-bench")
    ap.add_argument("--prefix-cache", default=None, help="folder of cached curriculum prefixes")
    ap.add_argument("--full", action="store_true", help="train the recipe end to end (no prefix cache)")
    ap.add_argument("--grow-from", type=int, default=None,
                    help="start from the cached prefix of this many layers, grown to the spec's n_layers by identity blocks")
    ap.add_argument("--paper-warmup", type=int, default=None,
                    help="learning-rate warm-up steps of the paper-format stage when it starts from a cached prefix")
    ap.add_argument("--init", default=None,
                    help="continue the paper-format stage from this saved model (another run's model/) instead of the prefix")
    ap.add_argument("--measure-only", action="store_true", help="measure the model already in --out/<name>")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--n-ref", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = OrganismSpec(**json.loads(args.spec))
    out = Path(args.out) / args.name
    out.mkdir(parents=True, exist_ok=True)
    rec = {"name": args.name, "spec": json.loads(args.spec), "threads": args.threads}
    if not args.measure_only:
        rec["grow_from"], rec["paper_warmup"], rec["init"] = args.grow_from, args.paper_warmup, args.init
        rec.update(train(spec, out, Path(args.prefix_cache) if args.prefix_cache else None, args.full, args.grow_from,
                         args.paper_warmup, Path(args.init) if args.init else None))
    t = time.perf_counter()
    rec.update(measure(out / "model", args.n, args.n_ref))
    rec["measure_seconds"] = round(time.perf_counter() - t, 1)
    (out / "run.json").write_text(json.dumps(rec, indent=1))
    print(json.dumps({k: v for k, v in rec.items() if k != "val_curve"}))


if __name__ == "__main__":
    main()
