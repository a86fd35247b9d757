"""The CPU model organism: a small Llama taught entity tracking from scratch by a staged curriculum.

The paper studies Llama-7B, which tracks entities in 66% of 7-box prompts. A CPU cannot run it, so
the default profile studies a *model organism*: a 4-layer, 8-head ``LlamaForCausalLM`` (about
1M parameters) trained here, on synthetic text, in a few minutes. Trained directly on the paper's
format (``The apple is in Box F, the cup is in Box B. Box F contains the`` → ``apple``), such a model
sits at chance for thousands of steps: the object comes *before* its label, so the answer must be
moved onto the label position by one head and read from there by a later one (V-composition),
which gradient descent does not find quickly. A curriculum finds it (see
``shared/reference/organism-notes.md``):

1. ``kv``     ``F apple B cup . F`` → ``apple``: key before value, a plain induction lookup;
2. ``vk``     ``apple F cup B . F`` → ``apple``: value before key, the same lookup reversed;
3. ``filler`` ``the apple Box F , the cup Box B . Box F contains the`` → ``apple``: filler tokens
   and the paper's full query;
4. ``paper``  the paper's format itself.

A deeper model (4 layers) with the usual initialisation stays at chance even on stage 1 for
750+ steps at lr 3e-4 or 1e-3 (measured here), whereas 2 layers solve it in 200 steps. Starting every
block as the identity (``residual_init=0``: ``o_proj`` and ``down_proj`` zero-initialised, so at
step 0 the network is a bigram model and each block joins as its gradient grows) removes that
plateau: 4 layers × 8 heads then master stage 1 in ~500 steps at lr 1e-3 and the whole curriculum
in ~900. Each context is followed by several queries (with replacement, so the last one cannot be guessed by
elimination) and only the answer tokens carry loss. A stage advances when its own format reaches
``mastery`` accuracy (checked every few steps), never after a fixed count: deeper models need
different times. Training uses 2–4 boxes only, and the last stage stops as soon as 7-box accuracy
on a *validation* set (seeded apart from the held-out test prompts) reaches ``target_accuracy``:
the organism then tracks entities like Llama-7B, well but not perfectly, and leaves fine-tuning room
to improve it. 7-box accuracy jumps by tens of points within a few steps, so it is checked every
step once it nears the target. A share of the batches (``arithmetic_fraction``) is multi-digit
addition and subtraction, so that arithmetic fine-tuning (:mod:`entity_tracking.finetune`) starts
from a model that has seen digits.

The result is saved with ``save_pretrained`` beside the project's word-level tokenizer, so
``AutoModelForCausalLM``/``AutoTokenizer`` load it like any hub model, with ``recipe.json`` holding
the recipe, its hash (config + seed + recipe version) and the training log. :func:`ensure_built`
reuses a build whose hash matches and otherwise trains one (deterministic given the seed and the
thread count). Measured results and what was tried are in the lab notebook ``notes/organism.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from .config import ModelSpec, OrganismSpec
from .io import ResultsPaths, atomic_dir, read_json, write_json
from .tokenizer import build_word_tokenizer
from .vocab import LABELS, OBJECTS

__all__ = [
    "RECIPE_VERSION",
    "STAGES",
    "Batch",
    "base_dir",
    "build_all",
    "ensure_built",
    "ensure_base",
    "entity_accuracy",
    "make_batch",
    "make_arithmetic_batch",
    "paper_prompts",
    "prompt_accuracy",
    "recipe_hash",
    "replicates",
    "train_organism",
    "train_threads",
]

log = logging.getLogger(__name__)

RECIPE_VERSION = 1
STAGES = ("kv", "vk", "filler", "paper")

# Seeds of the organism's own data streams, kept apart from the data chapter's held-out prompts
# (which use the profile's data seed through entity_tracking.data): validation prompts come from
# a stream salted with _VAL_SALT, so they are disjoint from the test prompts by construction of
# the generator state (a coincidence of a whole 7-box context has probability ~1e-20).
_TRAIN_SALT = 0x5EED
_VAL_SALT = 0xE7A1


# ---------------------------------------------------------------------------------------------
# Synthetic text
# ---------------------------------------------------------------------------------------------


def _context_words(fmt: str, objs: Sequence[str], labels: Sequence[str]) -> list[str]:
    words: list[str] = []
    for i, (o, l) in enumerate(zip(objs, labels)):
        if fmt == "kv":
            words += [l, o]
        elif fmt == "vk":
            words += [o, l]
        elif fmt == "filler":
            words += ([","] if i else []) + ["the", o, "Box", l]
        elif fmt == "paper":
            words += ([",", "the"] if i else ["The"]) + [o, "is", "in", "Box", l]
        else:
            raise ValueError(f"unknown format {fmt!r}; one of {STAGES}")
    return words


def _query_words(fmt: str, label: str) -> list[str]:
    if fmt in ("kv", "vk"):
        return [".", label]
    return [".", "Box", label, "contains", "the"]


def paper_prompts(n_contexts: int, num_boxes: int, seed: int, objects: Sequence[str] = OBJECTS):
    """The paper's prompts (§1.1), ``num_boxes`` per context with the query at each box in turn:
    a list of ``(prompt_text, answer_word, query_index)``. The organism's private generator for its
    validation set (the book's evaluation prompts come from :mod:`entity_tracking.data`)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_contexts):
        objs = rng.sample(list(objects), num_boxes)
        labels = rng.sample(list(LABELS), num_boxes)
        ctx = " ".join(_context_words("paper", objs, labels))
        for q in range(num_boxes):
            out.append((f"{ctx} . Box {labels[q]} contains the", objs[q], q))
    return out


@dataclass
class Batch:
    """Token ids (right-padded) and labels (-100 except on supervised answer tokens)."""

    input_ids: torch.Tensor
    labels: torch.Tensor


def _pad(seqs: list[list[int]], labs: list[list[int]], pad_id: int) -> Batch:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    lab = torch.full((len(seqs), n), -100, dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labs)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(l)] = torch.tensor(l)
    return Batch(ids, lab)


def make_batch(
    rng: random.Random,
    vocab: dict[str, int],
    fmt: str,
    batch_size: int,
    boxes: tuple[int, int],
    queries: int,
    objects: Sequence[str] = OBJECTS,
) -> Batch:
    """One batch of entity-tracking sequences in format ``fmt``: BOS, a context of
    ``boxes[0]..boxes[1]`` distinct (object, label) pairs, then ``queries`` queries drawn with
    replacement, each followed by its answer; only the answers are supervised. ``labels`` are
    aligned with ``input_ids`` (HF shifts them)."""
    bos, pad = vocab["<s>"], vocab["<pad>"]
    seqs, labs = [], []
    for _ in range(batch_size):
        n = rng.randint(*boxes)
        objs = rng.sample(list(objects), n)
        labels = rng.sample(list(LABELS), n)
        ids = [bos] + [vocab[w] for w in _context_words(fmt, objs, labels)]
        lab = [-100] * len(ids)
        for _ in range(queries):
            q = rng.randrange(n)
            qw = [vocab[w] for w in _query_words(fmt, labels[q])]
            ids += qw + [vocab[objs[q]]]
            lab += [-100] * len(qw) + [vocab[objs[q]]]
        seqs.append(ids)
        labs.append(lab)
    return _pad(seqs, labs, pad)


def _arith_problem(rng: random.Random, max_digits: int) -> tuple[list[str], list[str]]:
    a = rng.randrange(10 ** rng.randint(1, max_digits))
    b = rng.randrange(10 ** rng.randint(1, max_digits))
    if rng.random() < 0.5:
        return [*str(a), "+", *str(b), "="], [*str(a + b)]
    a, b = max(a, b), min(a, b)
    return [*str(a), "-", *str(b), "="], [*str(a - b)]


def make_arithmetic_batch(
    rng: random.Random, vocab: dict[str, int], batch_size: int, max_digits: int = 3, problems: int = 5
) -> Batch:
    """Pretraining arithmetic, ``123 + 45 = 168 . 70 - 7 = 63 .``: the answer digits and the
    closing period are supervised."""
    bos, pad = vocab["<s>"], vocab["<pad>"]
    seqs, labs = [], []
    for _ in range(batch_size):
        ids, lab = [bos], [-100]
        for _ in range(problems):
            q, a = _arith_problem(rng, max_digits)
            qi = [vocab[w] for w in q]
            ai = [vocab[w] for w in a + ["."]]
            ids += qi + ai
            lab += [-100] * len(qi) + ai
        seqs.append(ids)
        labs.append(lab)
    return _pad(seqs, labs, pad)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _first_query_accuracy(model, batch: Batch, chunk: int = 256) -> float:
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
    """Accuracy on the data chapter's held-out prompts (:func:`entity_tracking.data.make_eval_prompts`
    with ``seed``, the profile's data seed): ``n_prompts`` prompts with ``num_boxes`` boxes."""
    from .data import make_eval_prompts

    recs = make_eval_prompts(tokenizer, n_prompts, num_boxes=num_boxes, seed=seed)
    return prompt_accuracy(model, tokenizer, [r["text"] for r in recs], [r["answer"] for r in recs])


# ---------------------------------------------------------------------------------------------
# Recipe, hash, cache
# ---------------------------------------------------------------------------------------------


THREADS_ENV = "ENTITY_TRACKING_TRAIN_THREADS"


@contextlib.contextmanager
def train_threads(n: int | None = None):
    """Run training with ``n`` torch threads (default ``$ENTITY_TRACKING_TRAIN_THREADS`` or 1),
    restoring the previous count afterwards. The organism's matrices are tiny (d=128): on the
    project's shared 2-core machine one thread ran 0.33 s/step and two threads 1.5 s/step. The
    thread count does not change the result here (same stage steps and accuracy with 1 and 2)."""
    n = n or int(os.environ.get(THREADS_ENV, "1"))
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(old)


def _base_fields(spec: OrganismSpec) -> dict:
    d = spec.model_dump(mode="json")
    d.pop("finetune", None)
    d.pop("control", None)
    return d


def recipe_hash(spec: OrganismSpec, kind: str = "organism") -> str:
    """SHA-256 (first 16 hex digits) of the recipe: the base fields, the recipe version and, for a
    fine-tune (``kind`` ``organism-lora``/``organism-full``/``organism-control``), its own fields
    as well (the arithmetic recipe without its replicate seeds, or the control's recipe)."""
    payload = {"version": RECIPE_VERSION, "base": _base_fields(spec)}
    if kind == "organism-control":
        from .finetune import FINETUNE_VERSION

        payload.update(kind=kind, control=spec.control.model_dump(mode="json"), ft_version=FINETUNE_VERSION)
    elif kind != "organism":
        from .finetune import FINETUNE_VERSION

        payload.update(kind=kind, finetune=spec.finetune.model_dump(mode="json", exclude={"replicate_seeds"}),
                       ft_version=FINETUNE_VERSION)
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def base_dir(spec: OrganismSpec, paths: ResultsPaths) -> Path:
    """Where the base organism of this recipe lives: ``models/organism-base-<hash>``, shared by
    the base model and its fine-tunes."""
    return paths.models / f"organism-base-{recipe_hash(spec)}"


def _cached(d: Path, h: str) -> bool:
    f = d / "recipe.json"
    if not f.is_file():
        return False
    try:
        return read_json(f).get("hash") == h
    except (OSError, ValueError):
        return False


def _build_model(spec: OrganismSpec, vocab_size: int, tok):
    from transformers import LlamaForCausalLM

    from .arch import arch_for
    from .config import TinySpec
    from .models import _tiny_config

    if vocab_size != len(tok):
        raise ValueError(f"vocab_size {vocab_size} does not match the tokenizer's {len(tok)}")
    cfg = _tiny_config(TinySpec(family="llama", n_layers=spec.n_layers, n_heads=spec.n_heads,
                                n_kv_heads=spec.n_kv_heads, d_model=spec.d_model, d_mlp=spec.d_mlp), tok)
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(cfg)
    if spec.residual_init != 1.0:
        # Blocks whose writes to the residual stream start small (or zero) leave a deep model
        # close to a shallow one at first, which learns the lookup like a 2-layer model does.
        arch = arch_for(model)
        with torch.no_grad():
            for layer in range(arch.n_layers):
                arch.module(model, "o_proj", layer).weight.mul_(spec.residual_init)
                arch.module(model, "mlp_out_proj", layer).weight.mul_(spec.residual_init)
    return model


@dataclass
class TrainResult:
    model: object
    tokenizer: object
    history: list[dict] = field(default_factory=list)
    stage_steps: dict = field(default_factory=dict)
    val_accuracy: float = float("nan")
    reached_target: bool = False
    seconds: float = 0.0


def train_organism(
    spec: OrganismSpec,
    progress: bool = True,
    stages: Sequence[str] = STAGES,
    max_total_steps: int | None = None,
    callback: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train the organism of ``spec`` from scratch (see the module docstring); returns the model
    (in eval mode), the tokenizer and the log. ``stages``/``max_total_steps`` shorten the recipe
    for tests."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    tok = build_word_tokenizer()
    vocab = tok.get_vocab()
    model = _build_model(spec, len(tok), tok)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, spec.warmup_steps)))
    rng = random.Random(spec.seed * 1_000_003 + _TRAIN_SALT)
    torch.manual_seed(spec.seed)
    boxes = (spec.min_boxes, spec.max_boxes)

    # fixed validation sets, disjoint stream from the training data and from the test prompts
    vrng = random.Random(spec.seed * 1_000_003 + _VAL_SALT)
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
        while True:
            if step >= limit:
                break
            if step - stage_start >= (spec.final_max_steps if final else spec.stage_max_steps):
                break
            if rng.random() < spec.arithmetic_fraction:
                batch = make_arithmetic_batch(rng, vocab, spec.batch_size)
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
            if step >= next_check:
                if final:
                    val_acc = _first_query_accuracy(model, tgt_val)
                    rec[f"val_acc_{spec.target_boxes}"] = val_acc
                    # check every step near the target: accuracy jumps within a few steps
                    gap = spec.target_accuracy - val_acc
                    next_check = step + (1 if gap < 0.4 else 3)
                    bar.set_postfix(stage=fmt, loss=f"{loss.item():.3f}", acc7=f"{val_acc:.2f}")
                    if val_acc >= spec.target_accuracy:
                        reached = True
                        history.append(rec)
                        if callback:
                            callback(rec)
                        break
                else:
                    acc = _first_query_accuracy(model, mastery_val[fmt])
                    rec["stage_acc"] = acc
                    next_check = step + 25
                    bar.set_postfix(stage=fmt, loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
                    if acc >= spec.mastery:
                        history.append(rec)
                        if callback:
                            callback(rec)
                        break
            if True:  # every step: the loss curve is part of the record
                history.append(rec)
                if callback:
                    callback(rec)
        stage_steps[fmt] = step
        if final and not reached:
            log.warning("organism: 7-box validation accuracy %.3f did not reach %.2f in %d steps",
                        val_acc, spec.target_accuracy, spec.final_max_steps)
    bar.close()
    model.eval()
    return TrainResult(model, tok, history, stage_steps, val_acc, reached, time.perf_counter() - t0)


def make_batch_paper_eval(rng: random.Random, vocab: dict[str, int], n_contexts: int, num_boxes: int) -> Batch:
    """Paper-format prompts with the query at every box in turn (as the test set), as a Batch
    whose single supervised token is the answer."""
    bos, pad = vocab["<s>"], vocab["<pad>"]
    seqs, labs = [], []
    for _ in range(n_contexts):
        objs = rng.sample(list(OBJECTS), num_boxes)
        labels = rng.sample(list(LABELS), num_boxes)
        ctx = [bos] + [vocab[w] for w in _context_words("paper", objs, labels)]
        for q in range(num_boxes):
            ids = ctx + [vocab[w] for w in _query_words("paper", labels[q])] + [vocab[objs[q]]]
            seqs.append(ids)
            labs.append([-100] * (len(ids) - 1) + [ids[-1]])
    return _pad(seqs, labs, pad)


def ensure_base(spec: OrganismSpec, paths: ResultsPaths, progress: bool = True) -> Path:
    """The base organism's directory, trained and saved on first use, reused while its recipe
    hash matches."""
    h = recipe_hash(spec)
    d = base_dir(spec, paths)
    if _cached(d, h):
        return d
    with train_threads() as n_threads:
        res = train_organism(spec, progress=progress)
    with atomic_dir(d) as tmp:
        res.model.save_pretrained(tmp)
        res.tokenizer.save_pretrained(str(tmp))
        write_json(
            tmp / "recipe.json",
            {
                "kind": "organism",
                "hash": h,
                "recipe_version": RECIPE_VERSION,
                "recipe": _base_fields(spec),
                "stage_end_steps": res.stage_steps,
                "val_accuracy": res.val_accuracy,
                "reached_target": res.reached_target,
                "train_seconds": round(res.seconds, 2),
                "torch_threads": n_threads,
                "history": res.history,
            },
        )
    return d


def ensure_built(spec: ModelSpec, paths: ResultsPaths, progress: bool = True) -> tuple[Path, Path | None]:
    """Build (or reuse) the organism model of ``spec``; returns ``(model_dir, adapter_dir)``.

    ``organism``: the base, adapter ``None``. ``organism-lora``: the base directory and the
    directory of the Goat-style LoRA adapter (``models/<name>``, with ``checkpoints/step-XXXX``).
    ``organism-full``: the FLoat-style fully fine-tuned model (``models/<name>``), adapter ``None``.
    ``organism-control``: the positive control, fully fine-tuned on entity tracking, likewise.
    """
    org = spec.organism or OrganismSpec()
    if spec.build == "organism":
        return ensure_base(org, paths, progress), None
    from .finetune import ensure_finetune

    if spec.build == "organism-lora":
        base = ensure_base(org, paths, progress)
        return base, ensure_finetune(org, "lora", base, paths.models / spec.name, progress)
    if spec.build == "organism-full":
        base = ensure_base(org, paths, progress)
        return ensure_finetune(org, "full", base, paths.models / spec.name, progress), None
    if spec.build == "organism-control":
        base = ensure_base(org, paths, progress)
        return ensure_finetune(org, "control", base, paths.models / spec.name, progress), None
    raise ValueError(f"model '{spec.name}': build {spec.build!r} is not an organism build")


WORKERS_ENV = "ENTITY_TRACKING_TRAIN_WORKERS"


def replicates(spec: ModelSpec) -> list[ModelSpec]:
    """The replicate fine-tunes of an arithmetic fine-tune ``spec`` (``organism-lora`` or
    ``organism-full``): the same recipe with each of ``finetune.replicate_seeds`` as its seed,
    named ``<name>-seed<s>``; empty for every other model. The fine-tuning chapter puts intervals
    over seeds on the premise with them; every other chapter studies the profile's own seed."""
    if spec.build not in ("organism-lora", "organism-full"):
        return []
    org = spec.organism or OrganismSpec()
    out = []
    for s in org.finetune.replicate_seeds:
        if s == org.finetune.seed:
            continue
        variant = org.model_copy(update={"finetune": org.finetune.model_copy(update={"seed": s})})
        out.append(spec.model_copy(update={"name": f"{spec.name}-seed{s}", "organism": variant,
                                           "label": f"{spec.display} (seed {s})"}))
    return out


def _build_one(spec: ModelSpec, root: str) -> tuple[str, float]:
    """Child-process entry of :func:`build_all` (one torch thread, no progress bars)."""
    t = time.perf_counter()
    with train_threads(1):
        ensure_built(spec, ResultsPaths(Path(root)), progress=False)
    return spec.name, time.perf_counter() - t


def build_all(specs: Iterable[ModelSpec], paths: ResultsPaths, workers: int | None = None,
              progress: bool = True) -> dict[str, dict]:
    """Build (or reuse) every organism model of ``specs``: each base first, then the fine-tunes,
    ``workers`` at a time in separate processes with one thread each (default
    ``$ENTITY_TRACKING_TRAIN_WORKERS`` or the number of CPU cores): independent runs, one per core.
    Returns ``{name: {"seconds": wall time, "cached": bool}}``; a build is deterministic given its
    recipe whatever the number of workers. Other models (hub, local, tiny) are left alone.

    >>> # times = build_all(profile.models, ResultsPaths(root / "results" / "default"))
    """
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    from tqdm.auto import tqdm

    specs = [s for s in specs if s.build is not None and s.build.startswith("organism")]
    out: dict[str, dict] = {}
    todo = []
    for s in specs:
        kind = s.build
        org = s.organism or OrganismSpec()
        if s.build == "organism":
            target = base_dir(org, paths)
        else:
            target = paths.models / s.name
        cached = _cached(target, recipe_hash(org, kind)) and _cached(base_dir(org, paths), recipe_hash(org))
        if cached:
            out[s.name] = {"seconds": 0.0, "cached": True}
            continue
        t = time.perf_counter()
        if not _cached(base_dir(org, paths), recipe_hash(org)):  # bases first, in this process
            with train_threads(1):
                ensure_base(org, paths, progress=progress)
        if s.build == "organism":
            out[s.name] = {"seconds": time.perf_counter() - t, "cached": False}
        else:
            todo.append(s)
    workers = max(1, min(len(todo), workers or int(os.environ.get(WORKERS_ENV, "0")) or os.cpu_count() or 1))
    if len(todo) == 1 or workers == 1:
        for s in tqdm(todo, desc="fine-tunes", disable=not progress):
            name, sec = _build_one(s, str(paths.root))
            out[name] = {"seconds": sec, "cached": False}
    elif todo:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_build_one, s, str(paths.root)) for s in todo]
            for f in tqdm(futures, desc=f"fine-tunes ({workers} at a time)", disable=not progress):
                name, sec = f.result()
                out[name] = {"seconds": sec, "cached": False}
    return out

