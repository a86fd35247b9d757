"""Training the organism from scratch, and the accuracy checks its training loop uses.

>>> # result = train_organism(OrganismSpec(), progress=False); result.val_accuracy
"""


from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from ..config import OrganismSpec, TinySpec
from ..model.arch import arch_for
from ..model.tiny import tiny_config
from ..model.tokenizer import build_word_tokenizer
from ..task.arithmetic import heldout_keys
from ..task.samplers import make_eval_prompts
from .curriculum import (
    STAGES,
    TRAIN_SALT,
    VAL_SALT,
    Batch,
    context_length,
    make_arithmetic_batch,
    make_batch,
    make_batch_paper_eval,
)
from .resample import derangement, resampled_context

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def first_query_accuracy(model, batch: Batch, chunk: int = 256) -> float:
    """Accuracy of the first supervised token of every row (the first query's answer), argmax
    over the whole vocabulary, computed from the prefix only."""
    was = model.training
    model.eval()
    first = (batch.labels != -100).float().argmax(dim=1)  # position of the first answer
    correct = 0
    for s in range(0, len(first), chunk):
        ids = batch.input_ids[s : s + chunk]
        pos = first[s : s + chunk]
        width = int(pos.max())
        logits = model(input_ids=ids[:, :width]).logits
        pred = logits[torch.arange(len(pos)), pos - 1].argmax(-1)
        correct += int((pred == batch.labels[s : s + chunk][torch.arange(len(pos)), pos]).sum())
    model.train(was)
    return correct / len(first)


@torch.no_grad()
def prompt_accuracy(model, tokenizer, prompts: Iterable[str], answers: Iterable[str], batch_size: int = 128) -> float:
    """Share of prompts whose next-token argmax over the whole vocabulary is the first token of
    `` answer`` (the paper's metric). Works with right padding and any tokenizer."""
    prompts, answers = list(prompts), list(answers)
    was = model.training
    model.eval()
    correct = 0
    pad_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        for s in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[s : s + batch_size], return_tensors="pt", padding=True)
            last = enc["attention_mask"].sum(1) - 1
            logits = model(**enc).logits
            pred = logits[torch.arange(len(last)), last].argmax(-1)
            for p, a in zip(pred.tolist(), answers[s : s + batch_size]):
                target = tokenizer(" " + a, add_special_tokens=False)["input_ids"][0]
                correct += int(p == target)
    finally:
        tokenizer.padding_side = pad_side
        model.train(was)
    return correct / max(len(prompts), 1)


def entity_accuracy(model, tokenizer, num_boxes: int = 7, n_prompts: int = 500, seed: int = 0) -> float:
    """Accuracy on the data chapter's held-out prompts (:func:`entity_tracking.task.make_eval_prompts`
    with ``seed``, the profile's data seed): ``n_prompts`` prompts with ``num_boxes`` boxes."""
    recs = make_eval_prompts(tokenizer, n_prompts, num_boxes=num_boxes, seed=seed)
    return prompt_accuracy(model, tokenizer, [r["text"] for r in recs], [r["answer"] for r in recs])


# ---------------------------------------------------------------------------------------------
# Recipe, hash, cache
# ---------------------------------------------------------------------------------------------


THREADS_ENV = "ENTITY_TRACKING_TRAIN_THREADS"


@contextlib.contextmanager
def train_threads(n: int | None = None):
    """Run training with ``n`` torch threads (default ``$ENTITY_TRACKING_TRAIN_THREADS`` or 1),
    restoring the previous count afterwards. The organism's matrices are tiny (d=128): with two
    cores to itself the base trains 1.65 times faster on two threads than on one, but on cores
    shared with other jobs one thread ran 0.33 s/step and two 1.5 s/step; so the fine-tunes train
    one per core with one thread each. The same thread count gives the same weights bit for bit
    on one machine; another count changes the reduction order (logits differ by ~1e-5 after 120
    steps), which is why the base's count is part of its recipe (``OrganismSpec.train_threads``).
    Another CPU's kernels change it too (notes/organism.md): the recipe does not pin the weights
    across machines."""
    n = n or int(os.environ.get(THREADS_ENV, "1"))
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(old)


def _build_model(spec: OrganismSpec, vocab_size: int, tok):
    from transformers import LlamaForCausalLM


    if vocab_size != len(tok):
        raise ValueError(f"vocab_size {vocab_size} does not match the tokenizer's {len(tok)}")
    cfg = tiny_config(TinySpec(family="llama", n_layers=spec.n_layers, n_heads=spec.n_heads,
                                n_kv_heads=spec.n_kv_heads, d_model=spec.d_model, d_mlp=spec.d_mlp), tok)
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(cfg)
    if spec.residual_init != 1.0:
        scale_block_writes(model, spec.residual_init)
    return model


def scale_block_writes(model, scale: float) -> None:
    """Scale every block's writes to the residual stream (``o_proj``, the MLP's down projection)
    by ``scale`` in place. Blocks whose writes start small (or zero) leave a deep model close to a
    shallow one at first, which learns the lookup like a 2-layer model does."""
    arch = arch_for(model)
    with torch.no_grad():
        for layer in range(arch.n_layers):
            arch.module(model, "o_proj", layer).weight.mul_(scale)
            arch.module(model, "mlp_out_proj", layer).weight.mul_(scale)


@dataclass
class TrainResult:
    model: object
    tokenizer: object
    history: list[dict] = field(default_factory=list)
    stage_steps: dict = field(default_factory=dict)
    val_accuracy: float = float("nan")
    reached_target: bool = False
    seconds: float = 0.0


def answer_consistency(clean_logits: torch.Tensor, resampled_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean KL(p_resampled || p_clean) over the supervised answer positions, the resampled side
    held fixed: the loss that pulls the clean run's answers towards those the model gives when
    only positional information is left in the context. Logits ``[batch, pos, vocab]``, labels
    ``[batch, pos]`` as for the LM loss (position ``t`` predicts label ``t+1``)."""
    mask = labels[:, 1:] != -100
    target = torch.log_softmax(resampled_logits[:, :-1][mask].detach(), -1)
    pred = torch.log_softmax(clean_logits[:, :-1][mask], -1)
    return torch.nn.functional.kl_div(pred, target, log_target=True, reduction="batchmean")


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def positional_step(model, spec: OrganismSpec, rng: random.Random, vocab: dict[str, int], fmt: str) -> torch.Tensor:
    """The loss of one entity-tracking batch of the paper-format stage under ``spec.positional``:
    one box count for the whole batch, its context resampled (:mod:`.resample`) with probability
    ``resample`` (from the batch mean with probability ``mean_share``), plus the consistency loss
    when its weight is positive."""
    pos = spec.positional
    n = rng.randint(pos.min_boxes, pos.max_boxes)
    batch = make_batch(rng, vocab, fmt, spec.batch_size, (n, n), spec.queries_per_context,
                       ordinal_share=pos.ordinal_share)
    if rng.random() >= pos.resample:
        return model(input_ids=batch.input_ids, labels=batch.labels).loss
    source = None if rng.random() < pos.mean_share else derangement(spec.batch_size, rng)
    with resampled_context(model, context_length(fmt, n), source):
        logits = model(input_ids=batch.input_ids).logits
    loss = _lm_loss(logits, batch.labels)
    if pos.consistency > 0:
        clean = model(input_ids=batch.input_ids).logits
        loss = loss + pos.consistency * answer_consistency(clean, logits, batch.labels)
    return loss


def pretraining_exclusions(spec: OrganismSpec) -> frozenset:
    """The arithmetic problems the base never pretrains on: the held-out problems of its
    fine-tuning recipe (:func:`entity_tracking.task.heldout_keys` of ``spec.finetune``), by
    :func:`~entity_tracking.task.problem_key`, so that a fine-tune's exact match on them measures
    arithmetic learned, not recalled."""
    return heldout_keys(spec.finetune.max_digits, spec.finetune.ops)


def train_organism(
    spec: OrganismSpec,
    progress: bool = True,
    stages: Sequence[str] = STAGES,
    max_total_steps: int | None = None,
    callback: Callable[[dict], None] | None = None,
    model=None,
) -> TrainResult:
    """Train the organism of ``spec`` from scratch (see the module docstring); returns the model
    (in eval mode), the tokenizer and the log. ``stages``/``max_total_steps`` shorten the recipe
    for tests. ``model`` continues training a model of ``spec``'s shape (e.g. one that went
    through the first stages already, for experiments on the last) instead of a fresh one; the
    optimizer starts afresh.

    With ``spec.positional`` set, the paper-format stage draws one box count per batch in
    ``positional.min_boxes..max_boxes`` and resamples the context (:func:`positional_step`); the
    earlier stages and the arithmetic batches are those of the default recipe."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    tok = build_word_tokenizer()
    vocab = tok.get_vocab()
    model = _build_model(spec, len(tok), tok) if model is None else model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, spec.warmup_steps)))
    rng = random.Random(spec.seed * 1_000_003 + TRAIN_SALT)
    torch.manual_seed(spec.seed)
    # the fine-tunes' held-out arithmetic problems are never pretrained on either
    held_out = pretraining_exclusions(spec)
    boxes = (spec.min_boxes, spec.max_boxes)

    # fixed validation sets, disjoint stream from the training data and from the test prompts
    vrng = random.Random(spec.seed * 1_000_003 + VAL_SALT)
    mastery_val = {f: make_batch(vrng, vocab, f, 200, (spec.max_boxes, spec.max_boxes), 1) for f in stages}
    n_ctx = max(1, 280 // spec.target_boxes)
    tgt_val = make_batch_paper_eval(vrng, vocab, n_ctx, spec.target_boxes)

    history: list[dict] = []
    stage_steps: dict[str, int] = {}
    step = 0
    val_acc = float("nan")
    reached = False
    limit = max_total_steps if max_total_steps is not None else len(stages) * spec.stage_max_steps + spec.final_max_steps
    bar = tqdm(total=limit, desc="organism", disable=not progress, leave=False)
    for si, fmt in enumerate(stages):
        final = fmt == "paper"
        stage_start = step
        next_check = step + (1 if final else 25)
        if final and spec.positional is not None:
            next_check = step + spec.positional.val_every
        while True:
            if step >= limit:
                break
            if step - stage_start >= (spec.final_max_steps if final else spec.stage_max_steps):
                break
            if rng.random() < spec.arithmetic_fraction:
                batch = make_arithmetic_batch(rng, vocab, spec.batch_size, exclude=held_out)
                loss = model(input_ids=batch.input_ids, labels=batch.labels).loss
            elif final and spec.positional is not None:
                loss = positional_step(model, spec, rng, vocab, fmt)
            else:
                batch = make_batch(rng, vocab, fmt, spec.batch_size, boxes, spec.queries_per_context)
                loss = model(input_ids=batch.input_ids, labels=batch.labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            rec = {"step": step, "stage": fmt, "loss": round(loss.item(), 4)}
            done = False  # the stage's goal is met: record this step, then stop
            if step >= next_check:
                if final:
                    val_acc = first_query_accuracy(model, tgt_val)
                    rec[f"val_acc_{spec.target_boxes}"] = val_acc
                    # check every step near the target: accuracy jumps within a few steps
                    gap = spec.target_accuracy - val_acc
                    next_check = step + (1 if gap < 0.4 else 3)
                    if spec.positional is not None:
                        next_check = step + spec.positional.val_every
                    bar.set_postfix(stage=fmt, loss=f"{loss.item():.3f}", acc7=f"{val_acc:.2f}")
                    reached = done = val_acc >= spec.target_accuracy
                else:
                    acc = first_query_accuracy(model, mastery_val[fmt])
                    rec["stage_acc"] = acc
                    next_check = step + 25
                    bar.set_postfix(stage=fmt, loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
                    done = acc >= spec.mastery
            history.append(rec)  # every step: the loss curve is part of the record
            if callback:
                callback(rec)
            if done:
                break
        stage_steps[fmt] = step
        if final and not reached:
            log.warning("organism: 7-box validation accuracy %.3f did not reach %.2f in %d steps",
                        val_acc, spec.target_accuracy, spec.final_max_steps)
    bar.close()
    model.eval()
    return TrainResult(model, tok, history, stage_steps, val_acc, reached, time.perf_counter() - t0)


