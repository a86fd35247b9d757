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
not forced; the runs behind the recipe are in ``notes/organism.md``.

**Held out means held out.** A recipe has one set of held-out problems
(:func:`heldout_problems`), the same for every seed, and every seed's training stream
(:func:`training_problems`, which :func:`finetune` trains on) is drawn from the same generator
with every held-out problem filtered out, by problem: ``3 + 4`` is also ``4 + 3``
(:func:`entity_tracking.task.problem_key`). :func:`heldout_audit` replays the streams and counts
the held-out problems found in them; the fine-tuning chapter shows it (it reads 0). Exact match is
logged per operand digit count as well (``arith_acc_by_digits``): with 1-3-digit operands there are
only 155 one-digit problems of ``+`` and ``-``, so a recipe can learn those by heart and not the rest.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import torch

from ..config import ControlSpec, FinetuneSpec, OrganismSpec
from ..io import atomic_dir, write_json
from ..task.arithmetic import HELDOUT_SIZE, exact_match_by_digits, heldout_arithmetic, make_arithmetic, problem_key
from ..task.splits import overlap
from ..task.vocab import OBJECTS
from .curriculum import STAGES, VAL_SALT, Batch, make_batch, make_batch_paper_eval
from .train import first_query_accuracy

__all__ = [
    "FINETUNE_VERSION",
    "HELDOUT_SIZE",
    "arithmetic_correct",
    "arithmetic_pairs",
    "control_batches",
    "control_finetune",
    "control_objects",
    "finetune",
    "heldout_audit",
    "heldout_problems",
    "heldout_records",
    "qa_batch",
    "training_problems",
]

# 2: the held-out problems are one set per recipe and never occur in any seed's training stream
# (version 1 drew both from one generator: about half of the held-out problems were trained on)
FINETUNE_VERSION = 2
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def arithmetic_pairs(n: int, max_digits: int = 4, seed: int = 0, ops: Sequence[str] = ("+", "-")) -> list[tuple[str, str]]:
    """``n`` Goat-style question/answer pairs (``What is 123 + 4567 ?``, ``4690``) from
    :func:`entity_tracking.task.make_arithmetic`; digits are one token each."""
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
def arithmetic_correct(model, tokenizer, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
    """``[len(pairs)]`` booleans: exact match of each answer under greedy decoding (computed by
    teacher forcing: greedy decoding reproduces the answer iff every answer token is the argmax)."""
    was = model.training
    model.eval()
    ids, labels = qa_batch(tokenizer, [[p] for p in pairs])
    logits = model(input_ids=ids).logits
    pred = logits[:, :-1].argmax(-1)
    tgt = labels[:, 1:]
    ok = ((pred == tgt) | (tgt == -100)).all(dim=1)
    model.train(was)
    return ok


def arithmetic_accuracy(model, tokenizer, pairs: Sequence[tuple[str, str]]) -> float:
    """Exact-match accuracy of :func:`arithmetic_correct`."""
    return float(arithmetic_correct(model, tokenizer, pairs).float().mean())


def _val_entity_accuracy(model, tokenizer, org: OrganismSpec, num_boxes: int, n: int = 504) -> float:
    """Entity-tracking accuracy on ``n`` validation prompts (a stream apart from the test prompts)."""
    rng = random.Random(org.seed * 1_000_003 + VAL_SALT + num_boxes)
    batch = make_batch_paper_eval(rng, tokenizer.get_vocab(), max(1, n // num_boxes), num_boxes)
    return first_query_accuracy(model, batch)


def _train(
    base: str | Path,
    kind: Literal["lora", "full"],
    *,
    lr: float,
    steps: int,
    warmup_steps: int,
    checkpoint_every: int,
    seed: int,
    batch_at: Callable[[Any, int], tuple[torch.Tensor, torch.Tensor]],
    evaluate: Callable[[Any, Any, int], dict],
    out_dir: str | Path,
    desc: str,
    lora: FinetuneSpec | None = None,
    progress: bool = True,
    meta: dict | None = None,
) -> dict:
    """The fine-tuning loop every build here shares: AdamW (no weight decay) with a linear warm-up
    and decay, gradients clipped at 1, ``batch_at(tokenizer, step) -> (input_ids, labels)``, a
    checkpoint and ``evaluate(model, tokenizer, step)`` every ``checkpoint_every`` steps and at the
    end, everything saved atomically to ``out_dir`` with ``recipe.json`` (``meta`` + the log)."""
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(base))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if kind == "lora":
        lora = lora or FinetuneSpec()
        cfg = LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                         target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
    elif kind != "full":
        raise ValueError(f"kind must be 'lora' or 'full', not {kind!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (steps - step) / max(1, steps - warmup_steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    history: list[dict] = []
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        ckdir = tmp / "checkpoints"
        evals = [{"step": 0, **evaluate(model, tok, 0)}]
        model.train()
        bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
        for step in bar:
            ids, labels = batch_at(tok, step)
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            history.append({"step": step + 1, "loss": round(loss.item(), 4)})
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
                model.save_pretrained(ckdir / f"step-{step + 1:04d}")
                if kind == "full":
                    tok.save_pretrained(str(ckdir / f"step-{step + 1:04d}"))
                evals.append({"step": step + 1, **evaluate(model, tok, step + 1)})
        model.eval()
        model.save_pretrained(tmp)
        tok.save_pretrained(str(tmp))
        meta = {
            **(meta or {}),
            "base_dir": str(Path(base).resolve()),
            "finetune_version": FINETUNE_VERSION,
            "evals": evals,
            "history": history,
            "train_seconds": round(time.perf_counter() - t0, 2),
            "torch_threads": torch.get_num_threads(),
        }
        write_json(tmp / "recipe.json", meta)
    return meta


def heldout_records(spec: FinetuneSpec, n: int = HELDOUT_SIZE) -> list[dict[str, Any]]:
    """The first ``n`` held-out arithmetic problems of ``spec``'s recipe as
    :func:`~entity_tracking.task.make_arithmetic` records (``a``, ``op``, ``b``, ``question``,
    ``answer``): the same for every seed, and never in any training stream (the first
    :data:`HELDOUT_SIZE` are filtered out of every seed's stream, :func:`training_problems`, and
    out of the base organism's pretraining arithmetic; see
    :func:`entity_tracking.task.heldout_arithmetic`)."""
    return heldout_arithmetic(spec.max_digits, spec.ops, n)


def heldout_problems(spec: FinetuneSpec, n: int = HELDOUT_SIZE) -> list[tuple[str, str]]:
    """The held-out problems of :func:`heldout_records` as ``(question, answer)`` pairs: what every
    seed's training log scores, and the axis on which the fine-tuning chapter compares seeds."""
    return [(r["question"], r["answer"]) for r in heldout_records(spec, n)]


def training_problems(spec: FinetuneSpec, kind: Literal["lora", "full"]) -> list[dict[str, Any]]:
    """The arithmetic problems the ``kind`` fine-tune of ``spec`` trains on, in the order it trains
    on them (:func:`finetune` calls this; nothing is trained here): ``steps x batch_size x
    problems_per_sequence`` records of :func:`~entity_tracking.task.make_arithmetic` from the seed's
    own stream, drawn until that many remain once every problem of the held-out set is removed
    (by :func:`~entity_tracking.task.problem_key`, so the commuted ``b + a`` goes too), then shuffled
    (the generator cycles the operations in turn). Deterministic in ``spec``."""
    n = spec.steps_of(kind) * spec.batch_size * spec.problems_per_sequence
    held = {problem_key(r["a"], r["op"], r["b"]) for r in heldout_records(spec)}
    draw = n + n // 8 + 64
    while True:
        drawn = make_arithmetic(draw, spec.max_digits, seed=spec.seed * 7919 + 17, ops=list(spec.ops))
        pool = [r for r in drawn if problem_key(r["a"], r["op"], r["b"]) not in held]
        if len(pool) >= n:
            break
        if draw > 64 * n + 4096:
            raise ValueError(f"training_problems: {len(pool)} of {draw} problems with max_digits={spec.max_digits} and "
                             f"ops={list(spec.ops)} are outside the {len(held)} held-out ones, {n} needed: the held-out "
                             "set covers the problem space; raise max_digits")
        draw *= 2
    pool = pool[:n]
    random.Random(spec.seed).shuffle(pool)
    return pool


def heldout_audit(spec: FinetuneSpec, kind: Literal["lora", "full"], seeds: Sequence[int] | None = None) -> list[dict]:
    """How many held-out problems of ``spec``'s recipe occur in the training stream of its ``kind``
    fine-tune, for each seed (``seeds``: default the recipe's own and its replicates), by
    :func:`~entity_tracking.task.problem_key`, replaying :func:`training_problems`. One row per seed;
    ``found in training`` must be 0."""
    held = heldout_records(spec)
    rows = []
    for seed in seeds if seeds is not None else [spec.seed, *spec.replicate_seeds]:
        stream = training_problems(spec.model_copy(update={"seed": seed}), kind)
        o = overlap((problem_key(r["a"], r["op"], r["b"]) for r in stream),
                    (problem_key(r["a"], r["op"], r["b"]) for r in held))
        rows.append({"fine-tune": kind, "seed": seed, "training problems": o.n_train, "held-out problems": o.n_eval,
                     "found in training": o.count})
    return rows


def _evaluator(org: OrganismSpec, spec: FinetuneSpec) -> Callable[[Any, Any, int], dict]:
    """Arithmetic exact match on the recipe's held-out problems (:func:`heldout_problems`, the same for
    every seed), overall and per operand digit count, and 3- and 7-box entity-tracking accuracy on the
    organism's validation prompts: what every fine-tune logs at its checkpoints."""
    test_pairs = heldout_problems(spec)

    def evaluate(model, tok, step: int) -> dict:
        ok = arithmetic_correct(model, tok, test_pairs)
        rec: dict[str, Any] = {"arith_acc": float(ok.float().mean()),
                               "arith_acc_by_digits": exact_match_by_digits(ok.tolist(), test_pairs, spec.max_digits)}
        for nb in sorted({3, org.target_boxes}):
            rec[f"val_acc_{nb}"] = _val_entity_accuracy(model, tok, org, nb)
        return rec

    return evaluate


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
    org = org or OrganismSpec()
    steps = spec.steps_of(kind)
    per_step = spec.batch_size * spec.problems_per_sequence
    pool = [(r["question"], r["answer"]) for r in training_problems(spec, kind)]

    def batch_at(tok, step: int):
        chunk = pool[step * per_step : (step + 1) * per_step]
        return qa_batch(tok, [chunk[i : i + spec.problems_per_sequence]
                              for i in range(0, per_step, spec.problems_per_sequence)])

    return _train(base, kind, lr=spec.lr_lora if kind == "lora" else spec.lr_full, steps=steps,
                  warmup_steps=spec.warmup_steps, checkpoint_every=spec.checkpoint_every, seed=spec.seed,
                  batch_at=batch_at, evaluate=_evaluator(org, spec),
                  out_dir=out_dir, desc=f"finetune-{kind}", lora=spec, progress=progress,
                  meta={"kind": f"organism-{kind}", "finetune": spec.model_dump(mode="json"), **(extra_meta or {})})


def control_objects(spec: ControlSpec) -> tuple[str, ...]:
    """The objects the positive control is trained on: every second one of
    :data:`entity_tracking.task.vocab.OBJECTS` (``objects: half``) or all of them."""
    return OBJECTS[0::2] if spec.objects == "half" else OBJECTS


def control_batches(spec: ControlSpec, vocab: dict[str, int]) -> Iterator[Batch]:
    """The positive control's training batches, in the order :func:`control_finetune` trains on them
    (it calls this; nothing is trained here): paper-format contexts of ``spec.min_boxes..max_boxes``
    boxes over :func:`control_objects`, from the control's own seeded stream. Endless."""
    rng = random.Random(spec.seed * 1_000_003 + 0xC0)
    objects = control_objects(spec)
    while True:
        yield make_batch(rng, vocab, STAGES[-1], spec.batch_size, (spec.min_boxes, spec.max_boxes),
                         spec.queries_per_context, objects)


def control_finetune(
    base: str | Path,
    spec: ControlSpec,
    out_dir: str | Path,
    org: OrganismSpec | None = None,
    progress: bool = True,
    extra_meta: dict | None = None,
) -> dict:
    """The positive control (ours): fine-tune every weight of the model in ``base`` on
    entity tracking itself (the paper's format, ``spec.min_boxes..max_boxes`` boxes, several
    queries per context, the loss on the answers only, objects from :func:`control_objects`),
    with checkpoints like the arithmetic fine-tunes. It exists to show what the book's methods
    report when a fine-tune *does* improve entity tracking; it is never one of the paper's models.

    >>> # meta = control_finetune(base_dir, ControlSpec(steps=20), "models/organism-control")
    """
    org = org or OrganismSpec()
    stream = None

    def batch_at(tok, step: int):
        nonlocal stream
        stream = stream or control_batches(spec, tok.get_vocab())
        b = next(stream)
        return b.input_ids, b.labels

    ft = org.finetune
    return _train(base, "full", lr=spec.lr, steps=spec.steps, warmup_steps=spec.warmup_steps,
                  checkpoint_every=spec.checkpoint_every, seed=spec.seed, batch_at=batch_at,
                  evaluate=_evaluator(org, ft), out_dir=out_dir, desc="finetune-control",
                  progress=progress, meta={"kind": "organism-control", "control": spec.model_dump(mode="json"),
                                           **(extra_meta or {})})
