"""A first probe of planting the paper's mechanism with SIIT (issue 29): warm-start from a built
organism base, train the behaviour loss plus the IIT loss of each designated group plus SIIT's
strict loss, and print the planting numbers the issue asks for, measured on held-out pairs.

One run: the designated heads (two per group by default: Position Detectors in layer 1 at the
query label, Position Transmitters in layer 2 and Value Fetchers in layer 3 at the last token),
``--steps`` AdamW steps on ``--batch`` pairs of the ``positional`` desideratum per loss
(``--boxes`` boxes), evaluated every ``--every`` steps: clean accuracy on fresh prompts,
interchange accuracy per group (the causal model's counterfactual is the argmax), and accuracy
with every head outside the circuit resample-ablated. Prints one JSON line per evaluation and
writes the planted model with its ``ground_truth.json`` under ``--out``. Not run by ``make
bench``: it trains. Its runs are logged in ``notes/organism.md``::

    python bench/planting_probe.py --base results/default/models/organism-base-<hash> --steps 300
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from entity_tracking import task as D
from entity_tracking.config import ModelSpec
from entity_tracking.intervene.patching import Session, last_logits, run
from entity_tracking.load import load_model
from entity_tracking.methods.planting import (GroundTruth, counterfactual_targets, iit_loss, interchange_logits,
                                              resample_ablated_logits, strict_loss)


def _truth(n_layers: int, n_heads: int) -> GroundTruth:
    top = n_layers - 1
    return GroundTruth({"position_detector": [(max(0, top - 2), 0), (max(0, top - 2), 1)],
                        "position_transmitter": [(max(0, top - 1), 0), (max(0, top - 1), 1)],
                        "value_fetcher": [(top, 0), (top, 1)]},
                       {"position_detector": "query_label", "position_transmitter": "last", "value_fetcher": "last"},
                       n_layers, n_heads)


@torch.no_grad()
def evaluate(lm, truth: GroundTruth, pairs, prompts) -> dict:
    enc = D.encode_prompts(lm.tokenizer, prompts)
    out = {"clean": float((last_logits(lm, enc).argmax(-1) == enc["target"]).float().mean())}
    for g, heads in truth.heads.items():
        tgt = counterfactual_targets(lm.tokenizer, pairs, truth.variable(g))
        out[f"iia_{g}"] = float((interchange_logits(lm, pairs, heads, truth.positions[g]).argmax(-1) == tgt).float().mean())
    logits, answers = resample_ablated_logits(lm, pairs, truth.outside())
    out["resample_ablated"] = float((logits.argmax(-1) == answers).float().mean())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--boxes", type=int, default=7)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--w-iit", type=float, default=1.0)
    ap.add_argument("--w-strict", type=float, default=0.5)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results/planting-probe"))
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    lm = load_model(ModelSpec(name="planted", local_path=str(args.base)), verbose=False)
    tok, arch = lm.tokenizer, lm.arch
    truth = _truth(arch.n_layers, arch.n_heads)
    train = D.make_desiderata(tok, "positional", 4000, num_boxes=args.boxes, seed=101)
    held = D.make_desiderata(tok, "positional", 400, num_boxes=args.boxes, seed=202)[:200]
    prompts = D.make_eval_prompts(tok, 504, num_boxes=args.boxes, seed=303)
    params = list(lm.hf.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    log = [{"step": 0, **evaluate(lm, truth, held, prompts)}]
    print(json.dumps(log[-1]), flush=True)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = rng.sample(train, args.batch)
        enc = D.encode_prompts(tok, [p["base"] for p in batch])
        logits = run(Session(lm, enc, batch_size=None, out_device=lm.device), grad=True).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), enc["target"])
        for g, heads in truth.heads.items():
            loss = loss + args.w_iit * iit_loss(lm, batch, heads, truth.positions[g], truth.variable(g))
        loss = loss + args.w_strict * strict_loss(lm, batch, truth.outside())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.every == 0 or step == args.steps:
            log.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(time.perf_counter() - t0, 1),
                        **evaluate(lm, truth, held, prompts)})
            print(json.dumps(log[-1]), flush=True)
    out = args.out / f"steps{args.steps}-lr{args.lr:g}-iit{args.w_iit:g}-strict{args.w_strict:g}"
    out.mkdir(parents=True, exist_ok=True)
    lm.hf.save_pretrained(out)
    tok.save_pretrained(str(out))
    truth.save(out)
    (out / "log.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "log": log}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
