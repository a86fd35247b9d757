"""Arithmetic fine-tuning of the model organism: a Goat-style LoRA and a FLoat-style full fine-tune.

The paper's fine-tuned models never saw entity-tracking data: Goat-7B is Llama-7B with a LoRA
adapter (rank 64 on q, k, v and o_proj) trained on synthetic arithmetic instructions, with the
loss on the answer tokens only; FLoat-7B is the same data with every weight trained. This module
does the same to the organism of :mod:`entity_tracking.organism`: question/answer pairs
(``What is 123 + 4567 ?`` → ``4690``, several per sequence), a causal-LM loss masked to the answer
tokens (and the period that closes each answer), AdamW with a linear warm-up and decay, and a
checkpoint every ``checkpoint_every`` steps under ``<out>/checkpoints/step-XXXX`` for the
fine-tuning-dynamics chapter. The LoRA build saves a PEFT adapter that ``PeftModel.from_pretrained``
loads over the base directory; the full build saves a complete model. Each build writes
``recipe.json`` with the recipe hash and, at every checkpoint, the arithmetic exact-match accuracy
and the 7-box entity-tracking accuracy on the organism's validation prompts: the training log of
the question "does arithmetic fine-tuning improve entity tracking?". Whether it does is measured,
not forced; see :data:`entity_tracking.organism.RESULTS_NOTE`.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Literal, Sequence

import torch

from .config import FinetuneSpec, OrganismSpec
from .io import atomic_dir, write_json

__all__ = [
    "FINETUNE_VERSION",
    "arithmetic_pairs",
    "ensure_finetune",
    "finetune",
    "qa_batch",
]

FINETUNE_VERSION = 1
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def arithmetic_pairs(n: int, max_digits: int = 4, seed: int = 0, ops: Sequence[str] = ("+", "-")) -> list[tuple[str, str]]:
    """``n`` Goat-style question/answer pairs (``What is 123 + 4567 ?``, ``4690``) from
    :func:`entity_tracking.data.make_arithmetic`; digits are one token each."""
    from .data import make_arithmetic

    return [(r["question"], r["answer"]) for r in make_arithmetic(n, max_digits, seed=seed, ops=list(ops))]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def qa_batch(tokenizer, rows: Sequence[Sequence[tuple[str, str]]], end: str = ".") -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels for rows of question/answer pairs: ``BOS q1 a1 . q2 a2 . ...``.

    Labels are -100 everywhere except on the answer tokens and the ``end`` token that closes
    each answer: the loss mask of instruction tuning. Right-padded with the pad token.
    """
    bos = tokenizer.bos_token_id
    end_ids = _ids(tokenizer, " " + end) if end else []
    seqs, labs = [], []
    for row in rows:
        ids = [bos] if bos is not None else []
        lab = [-100] * len(ids)
        for q, a in row:
            qi, ai = _ids(tokenizer, q), _ids(tokenizer, " " + a) + end_ids
            ids += qi + ai
            lab += [-100] * len(qi) + ai
        seqs.append(ids)
        labs.append(lab)
    n = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    labels = torch.full((len(seqs), n), -100, dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labs)):
        input_ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(l)] = torch.tensor(l)
    return input_ids, labels


@torch.no_grad()
def arithmetic_accuracy(model, tokenizer, pairs: Sequence[tuple[str, str]]) -> float:
    """Exact match of the answer under greedy decoding (computed by teacher forcing: greedy
    decoding reproduces the answer iff every answer token is the argmax)."""
    was = model.training
    model.eval()
    ids, labels = qa_batch(tokenizer, [[p] for p in pairs])
    logits = model(input_ids=ids).logits
    pred = logits[:, :-1].argmax(-1)
    tgt = labels[:, 1:]
    ok = ((pred == tgt) | (tgt == -100)).all(dim=1)
    model.train(was)
    return float(ok.float().mean())


def _val_entity_accuracy(model, tokenizer, org: OrganismSpec, num_boxes: int, n: int = 504) -> float:
    """Entity-tracking accuracy on ``n`` validation prompts (a stream apart from the test prompts)."""
    from .organism import _VAL_SALT, _first_query_accuracy, make_batch_paper_eval

    rng = random.Random(org.seed * 1_000_003 + _VAL_SALT + num_boxes)
    batch = make_batch_paper_eval(rng, tokenizer.get_vocab(), max(1, n // num_boxes), num_boxes)
    return _first_query_accuracy(model, batch)


def finetune(
    base: str | Path,
    spec: FinetuneSpec,
    kind: Literal["lora", "full"],
    out_dir: str | Path,
    org: OrganismSpec | None = None,
    progress: bool = True,
    extra_meta: dict | None = None,
) -> dict:
    """Fine-tune the model in ``base`` on arithmetic and save it to ``out_dir`` (atomically),
    with checkpoints; returns the metadata written to ``out_dir/recipe.json``."""
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(base))
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if kind == "lora":
        cfg = LoraConfig(
            r=spec.lora_r,
            lora_alpha=spec.lora_alpha,
            lora_dropout=spec.lora_dropout,
            target_modules=LORA_TARGETS,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, cfg)
        lr = spec.lr_lora
    elif kind == "full":
        lr = spec.lr_full
    else:
        raise ValueError(f"kind must be 'lora' or 'full', not {kind!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        return max(0.0, (spec.steps - step) / max(1, spec.steps - spec.warmup_steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    per_step = spec.batch_size * spec.problems_per_sequence
    pool = arithmetic_pairs(spec.steps * per_step, spec.max_digits, seed=spec.seed * 7919 + 17, ops=spec.ops)
    random.Random(spec.seed).shuffle(pool)  # make_arithmetic cycles the operations in turn
    test_pairs = arithmetic_pairs(200, spec.max_digits, seed=spec.seed * 7919 + 99991, ops=spec.ops)
    history: list[dict] = []
    org = org or OrganismSpec()

    def evaluate(step: int) -> dict:
        rec = {"step": step, "arith_acc": arithmetic_accuracy(model, tok, test_pairs)}
        for nb in sorted({3, org.target_boxes}):
            rec[f"val_acc_{nb}"] = _val_entity_accuracy(model, tok, org, nb)
        return rec

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        ckdir = tmp / "checkpoints"
        evals = [evaluate(0)]
        model.train()
        bar = tqdm(range(spec.steps), desc=f"finetune-{kind}", disable=not progress, leave=False)
        for step in bar:
            chunk = pool[step * per_step : (step + 1) * per_step]
            rows = [chunk[i : i + spec.problems_per_sequence] for i in range(0, per_step, spec.problems_per_sequence)]
            ids, labels = qa_batch(tok, rows)
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            history.append({"step": step + 1, "loss": round(loss.item(), 4)})
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if (step + 1) % spec.checkpoint_every == 0 or step + 1 == spec.steps:
                model.save_pretrained(ckdir / f"step-{step + 1:04d}")
                if kind == "full":
                    tok.save_pretrained(str(ckdir / f"step-{step + 1:04d}"))
                evals.append(evaluate(step + 1))
        model.eval()
        model.save_pretrained(tmp)
        tok.save_pretrained(str(tmp))
        meta = {
            "kind": f"organism-{kind}",
            "base_dir": str(Path(base).resolve()),
            "finetune": spec.model_dump(mode="json"),
            "finetune_version": FINETUNE_VERSION,
            "evals": evals,
            "history": history,
            "train_seconds": round(time.perf_counter() - t0, 2),
            "torch_threads": torch.get_num_threads(),
            **(extra_meta or {}),
        }
        write_json(tmp / "recipe.json", meta)
    return meta


def ensure_finetune(org: OrganismSpec, kind: Literal["lora", "full"], base: Path, out_dir: Path, progress: bool = True) -> Path:
    """The fine-tune of ``kind`` of the organism in ``base``, built in ``out_dir`` on first use and
    reused while its recipe hash (base recipe + fine-tune recipe) matches."""
    from .organism import _cached, recipe_hash, train_threads

    h = recipe_hash(org, f"organism-{kind}")
    if not _cached(out_dir, h):
        with train_threads():
            finetune(base, org.finetune, kind, out_dir, org=org, progress=progress,
                     extra_meta={"hash": h, "base_hash": recipe_hash(org)})
    return out_dir
