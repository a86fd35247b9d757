"""The circuit across fine-tuning: accuracy, faithfulness and CMAP gain at every checkpoint.

The paper compares a base model with finished fine-tunes; when the enhancement appears during
fine-tuning is one of its open questions. Every fine-tune of the model organism keeps
checkpoints (``checkpoints/step-XXXX``), so each one can be treated as a model of its own:
its entity-tracking accuracy, the faithfulness of the **base** model's circuit inside it (with
the checkpoint's own mean activations), and how much of its gain over the base model each
circuit group carries when its head outputs are patched into the base model (output CMAP).
A checkpoint of a LoRA fine-tune is the base model plus that checkpoint's adapter (merged by
the loader); a checkpoint of a full fine-tune is a complete model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

from .. import task as D
from ..config import ModelSpec, OrganismSpec
from ..intervene.patching import last_logits
from ..intervene.stats import Estimate, bootstrap, cluster_index, cluster_weights
from ..io import ResultsPaths, read_json
from ..load import load_model, model_sources
from ..organism.finetune import arithmetic_correct, heldout_audit, training_problems
from ..schema import GROUPS
from .ablation import Ablation, compute_means, context_ids, encode_for, evaluate
from .circuit import Circuit
from .cmap import OutputCMAP, heads_by_position

__all__ = ["SHARE_COLUMNS", "Checkpoint", "checkpoints", "checkpoint_row", "eval_accuracy",
           "exact_match_by_digits_table", "gain_by_answer", "heldout_audit_table", "replicate_curve", "seed_bootstrap"]

_STEP = re.compile(r"step-(\d+)$")


class Checkpoint:
    """One checkpoint of a fine-tune, loadable like any profile model through :attr:`spec`."""

    def __init__(self, model: str, step: int, spec: ModelSpec):
        self.model, self.step, self.spec = model, step, spec

    def __repr__(self) -> str:
        return f"Checkpoint({self.model!r}, step {self.step})"


def checkpoints(spec: ModelSpec, paths: ResultsPaths) -> list[Checkpoint]:
    """The checkpoints of a fine-tuned organism build, in step order (empty for other models)."""
    if spec.build not in ("organism-lora", "organism-full", "organism-control"):
        return []

    model, adapter = model_sources(spec, paths)
    folder = Path(adapter if spec.build == "organism-lora" else model) / "checkpoints"
    out = []
    for d in sorted(folder.glob("step-*")) if folder.is_dir() else []:
        m = _STEP.search(d.name)
        if not m:
            continue
        step = int(m.group(1))
        if spec.build == "organism-lora":
            ck = ModelSpec(name=f"{spec.name}.step-{step}", role="finetuned", local_path=str(model), adapter=str(d))
        else:
            ck = ModelSpec(name=f"{spec.name}.step-{step}", role="finetuned", local_path=str(d))
        out.append(Checkpoint(spec.name, step, ck))
    return sorted(out, key=lambda c: c.step)


def eval_accuracy(lm, prompts, *, batch_size: int = 32) -> float:
    """Accuracy of ``lm`` (argmax at the last token) on evaluation prompt records or an encoded batch."""

    batch = encode_for(lm, prompts)
    return float((last_logits(lm, batch, batch_size=batch_size).argmax(-1) == batch["target"]).float().mean())


#: The column of each group's CMAP gain share in a :func:`checkpoint_row`.
SHARE_COLUMNS: dict[str, str] = {g: f"CMAP share: {g}" for g in GROUPS}


def checkpoint_row(base, model, eval_records: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]],
                   circuit: Circuit, *, batch_size: int = 32, base_accuracy: Optional[float] = None,
                   base_memo: Optional[dict] = None) -> dict[str, Any]:
    """Accuracy, base-circuit faithfulness and per-group CMAP gain share of ``model`` (a loaded
    checkpoint) against the loaded ``base`` model on the evaluation prompts. ``base_accuracy``:
    the base model's :func:`eval_accuracy` on them when already known, so that a loop over
    checkpoints runs the base model once. ``base_memo``: a dict kept over the checkpoints of one
    base model on these prompts; the base's session, in which every group's output CMAP runs
    (:class:`~entity_tracking.methods.cmap.OutputCMAP`), is made once into it. The
    checkpoint runs once for its accuracy and every group's head outputs."""

    batch = D.encode_prompts(model.tokenizer, eval_records)
    target = batch["target"]
    memo = base_memo if base_memo is not None else {}
    keys = [circuit.positions[g] for g in GROUPS if circuit.groups[g]]
    patcher = OutputCMAP(base, model, batch, keys, batch_size=batch_size, session=memo.get("session"))
    memo.setdefault("session", patcher.session)
    acc = float((patcher.finetuned_logits.argmax(-1) == target).float().mean())
    base_acc = base_accuracy if base_accuracy is not None else eval_accuracy(base, batch, batch_size=batch_size)
    means = compute_means(model, reference, batch_size=batch_size, progress=False)
    full, circ = evaluate(model, eval_records, means, [Ablation(), Ablation(keep=circuit)], batch_size=batch_size,
                          progress=False)
    row: dict[str, Any] = {"accuracy": acc, "base accuracy": base_acc,
                           "faithfulness": circ.accuracy / full.accuracy if full.accuracy > 0 else float("nan")}
    gain = acc - base_acc
    for g in GROUPS:
        if not circuit.groups[g]:
            row[SHARE_COLUMNS[g]] = float("nan")
            continue
        logits = patcher.logits(heads_by_position(circuit, [g]))
        patched = float((logits.argmax(-1) == target).float().mean())
        row[SHARE_COLUMNS[g]] = (patched - base_acc) / gain if abs(gain) > 1e-9 else float("nan")
    return row


def seed_bootstrap(vectors: torch.Tensor, statistic: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, *,
                   clusters: Optional[Sequence[int] | torch.Tensor] = None,
                   n_resamples: int = 1000, seed: int = 0, level: float = 0.95):
    """Two-level percentile bootstrap over training seeds and examples.

    ``vectors [n_seeds, k, n]``: per-example correctness of ``k`` models for each training seed,
    on the same ``n`` examples. Each resample draws the seeds with replacement and, independently,
    the examples with replacement (paired across models and seeds), applies ``statistic``
    (accuracies ``[k, R] -> [R]``; default the first model's accuracy) per drawn seed and averages
    over the drawn seeds. The interval thus holds both the seed-to-seed spread of fine-tuning and
    the sampling error of the prompts; with one seed it is :func:`~entity_tracking.methods.ablation.bootstrap`.
    ``clusters [n]`` (the prompts' ``context_id``): resample contexts instead of prompts, keeping
    every query of a drawn context (the same contexts for every seed and model), as
    :func:`~entity_tracking.intervene.stats.bootstrap` does; the estimate's ``n_clusters`` says how many.

    >>> v = torch.tensor([[[1., 1., 0., 1.]], [[1., 0., 0., 1.]], [[1., 1., 1., 1.]]])
    >>> round(seed_bootstrap(v).value, 3)
    0.75
    """

    v = torch.as_tensor(vectors).float()
    if v.dim() != 3:
        raise ValueError(f"seed_bootstrap needs vectors [n_seeds, k, n], got shape {tuple(v.shape)}")
    S, k, n = v.shape
    stat = statistic or (lambda acc: acc[0])
    point = float(torch.stack([stat(v[s].mean(-1, keepdim=True))[0] for s in range(S)]).mean())
    gen = torch.Generator().manual_seed(seed)
    seeds = torch.randint(S, (n_resamples, S), generator=gen)
    member, n_clusters = cluster_index(clusters, n)
    if n_clusters:
        w = cluster_weights(member, n_clusters, n_resamples, gen)  # [R, n]
        acc = torch.stack([(v * w[r]).sum(-1) / w[r].sum() for r in range(n_resamples)], -1)  # [S, k, R]
    else:
        idx = torch.randint(n, (n_resamples, n), generator=gen)
        acc = torch.stack([v[:, :, idx[r]].mean(-1) for r in range(n_resamples)], -1)  # [S, k, R]
    per_seed = torch.stack([stat(acc[s]) for s in range(S)])  # [S, R]
    stats = per_seed.gather(0, seeds.T).mean(0)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2])
    lo, hi = (float(x) for x in torch.nanquantile(stats, q))
    return Estimate(point, lo, hi, level, n, n_clusters)


def replicate_curve(base, specs: Sequence[ModelSpec], paths: ResultsPaths, eval_records: Sequence[Mapping[str, Any]],
                    problems: Sequence[tuple[str, str]], *, batch_size: int = 32, n_resamples: int = 1000) -> list[dict]:
    """Entity-tracking accuracy and arithmetic exact match at every checkpoint of every seed of one
    fine-tune (``specs``: the profile's model and its :func:`~entity_tracking.organism.replicates`),
    each with a :func:`seed_bootstrap` interval (over contexts when the records carry ``context_id``);
    step 0 is the loaded ``base`` model, and ``gain`` is the paired change of accuracy over it.
    ``problems``: held-out arithmetic ``(question, answer)`` pairs, the same for every seed; every row
    says how many of them occur in the training streams of the seeds
    (``problems_in_training``, replayed by :func:`~entity_tracking.organism.finetune.training_problems`;
    0 for the recipe's own held-out set). One row per step."""

    clusters = context_ids(eval_records)
    n_contexts = int(torch.unique(clusters).numel()) if clusters is not None else 0
    held = [D.problem_key(*D.parse_problem(q)) for q, _ in problems]
    in_training: Optional[int] = 0  # None: a model whose training stream is not ours to replay
    for spec in specs:
        if spec.build not in ("organism-lora", "organism-full"):
            in_training = None
            break
        stream = training_problems((spec.organism or OrganismSpec()).finetune,
                                   "lora" if spec.build == "organism-lora" else "full")
        in_training += D.overlap((D.problem_key(r["a"], r["op"], r["b"]) for r in stream), held).count
    batch = D.encode_prompts(base.tokenizer, eval_records)
    target = batch["target"]

    def measure(lm) -> tuple[torch.Tensor, torch.Tensor]:
        et = (last_logits(lm, batch, batch_size=batch_size).argmax(-1) == target).float()
        return et, arithmetic_correct(lm.hf, lm.tokenizer, problems).float()

    base_et, base_ar = measure(base)
    # step 0 is the base, shared by every seed: its interval is over prompts and problems only
    per_step: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {0: [(base_et, base_ar)]}
    for spec in specs:
        for ck in checkpoints(spec, paths):
            lm = load_model(ck.spec, paths, verbose=False)
            per_step.setdefault(ck.step, []).append(measure(lm))
            del lm
    rows = []
    for step in sorted(per_step):
        got = per_step[step]
        et = torch.stack([torch.stack([e, base_et]) for e, _ in got])  # [S, 2, n]
        ar = torch.stack([a[None] for _, a in got])  # [S, 1, m]
        acc = seed_bootstrap(et, clusters=clusters, n_resamples=n_resamples)
        gain = seed_bootstrap(et, lambda a: a[0] - a[1], clusters=clusters, n_resamples=n_resamples)
        arith = seed_bootstrap(ar, n_resamples=n_resamples)
        rows.append({"step": step, "seeds": len(specs) if step == 0 else len(got), "n_prompts": len(eval_records),
                     "n_contexts": n_contexts, "n_problems": len(problems), "problems_in_training": in_training,
                     **{f"accuracy{x}": getattr(acc, y) for x, y in (("", "value"), ("_low", "low"), ("_high", "high"))},
                     **{f"gain{x}": getattr(gain, y) for x, y in (("", "value"), ("_low", "low"), ("_high", "high"))},
                     **{f"arithmetic{x}": getattr(arith, y) for x, y in (("", "value"), ("_low", "low"), ("_high", "high"))}})
    return rows


def gain_by_answer(finetuned: torch.Tensor, base: torch.Tensor, records: Sequence[Mapping[str, Any]],
                   trained_objects: Iterable[str], *, n_resamples: int = 1000) -> list[dict]:
    """A fine-tune's accuracy gain over the base (``finetuned``, ``base``: per-prompt correctness
    ``[n]`` on ``records``), split by whether the prompt's answer is one of the objects the
    fine-tune was trained on: a gain on answers it never saw is a gain in tracking, not in
    knowing those words. Paired bootstrap intervals; one row per split (and all prompts)."""

    seen = torch.tensor([r["answer"] in set(trained_objects) for r in records])
    ids = context_ids(records)
    rows = []
    for label, mask in (("answer seen in fine-tuning", seen), ("answer never seen in fine-tuning", ~seen),
                        ("all prompts", torch.ones_like(seen))):
        if not bool(mask.any()):
            continue
        pair = torch.stack([finetuned[mask].float(), base[mask].float()])
        cl = None if ids is None else ids[mask]
        acc = bootstrap(pair, clusters=cl, n_resamples=n_resamples)
        gain = bootstrap(pair, lambda a: a[0] - a[1], clusters=cl, n_resamples=n_resamples)
        rows.append({"prompts": label, "n": int(mask.sum()), "fine-tuned": acc.value,
                     "base": float(pair[1].mean()), "gain": gain.value, "gain_low": gain.low, "gain_high": gain.high})
    return rows


def exact_match_by_digits_table(specs: Sequence[ModelSpec], paths: ResultsPaths) -> list[dict[str, Any]]:
    """The final arithmetic exact match of every seed of a fine-tune (``specs``: the profile's model
    and its :func:`~entity_tracking.organism.replicates`) per operand digit count, as its training log
    (``recipe.json``, ``arith_acc_by_digits`` at the last checkpoint) recorded it on the recipe's
    held-out problems. One row per seed: ``fine-tune``, ``seed``, ``step``, ``all``, then one column
    per digit count (``"1 digit"``, ``"2 digits"``, ...)."""
    rows = []
    for spec in specs:
        model, adapter = model_sources(spec, paths)
        log_file = Path(adapter or model) / "recipe.json"
        if not log_file.is_file():
            raise FileNotFoundError(f"{spec.name}: no training log at {log_file}; build the fine-tune first")
        last = read_json(log_file)["evals"][-1]
        by = last.get("arith_acc_by_digits")
        if by is None:
            raise ValueError(f"{spec.name}: its training log {log_file} has no arith_acc_by_digits "
                             "(a fine-tune from before FINETUNE_VERSION 2); rebuild it")
        rows.append({"fine-tune": spec.name, "seed": (spec.organism or OrganismSpec()).finetune.seed,
                     "step": last["step"], "all": last["arith_acc"],
                     **{f"{d} digit{'s' if d != '1' else ''}": v for d, v in by.items()}})
    return rows


def heldout_audit_table(spec: ModelSpec) -> list[dict[str, Any]]:
    """The held-out audit of an arithmetic fine-tune of the organism (``organism-lora`` or
    ``organism-full``): for its seed and each replicate seed, how many of the recipe's held-out
    problems occur in that seed's training stream
    (:func:`~entity_tracking.organism.finetune.heldout_audit`; it must read 0). One row per seed."""
    if spec.build not in ("organism-lora", "organism-full"):
        raise ValueError(f"{spec.name}: build {spec.build!r} is not an arithmetic fine-tune of the organism; "
                         "only organism-lora and organism-full have a training stream to audit")
    kind = "lora" if spec.build == "organism-lora" else "full"
    return [{"fine-tune": spec.name, **{k: v for k, v in row.items() if k != "fine-tune"}}
            for row in heldout_audit((spec.organism or OrganismSpec()).finetune, kind)]
