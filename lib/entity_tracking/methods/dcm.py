"""Desiderata-based Component Masking (DCM): which heads of a group encode what.

**The method** (Davies et al. 2023; paper-methods §4). A *desideratum* pairs a base prompt
with a source prompt and names the answer the model should give if some heads carry one kind
of information -- the *position* of the queried box, the *value* of its object, the *label*
asked for (:mod:`entity_tracking.task`). DCM learns, for the heads of one circuit group, a
mask ``m`` with one entry per head: at the group's position each head's output becomes
``m * base + (1 - m) * source`` (``m = 1`` keeps the base run's value, ``m = 0`` patches in the
source's, read at the *source's own* position for that group). The mask is trained to make the
desideratum's target likely while patching few heads,

    loss = -mean_batch(logit[target]) + lambda * sum(1 - m),

with Adam. The paper's form keeps ``m`` as free parameters clamped to ``[0, 1]`` after every
step (``relaxation="clamp"``, initialised at ones); ``relaxation="sigmoid"`` optimises logits
``m = sigmoid(l)`` instead. During training the mask is **rounded** and evaluated on a held-out
eval split every few steps, the best rounded mask is kept (highest eval accuracy; ties go to the
mask that patches more heads, as in the reference code), and its accuracy on the test split is
the result. Heads whose rounded mask is 0 are *selected*: patching them alone from source to
base makes the model follow the desideratum.

The **per-model semantics** (§4) then patch a selected set of heads from source to base in any
model of the same architecture and report the share of samples whose answer is the target.
As in the reference code, each of ``n_resamples`` runs draws ``sample_size`` *fresh* pairs from
the desideratum generator (:func:`fresh_pairs`, with the data manifest's vocabulary and a seed
of its own, so never the stored train/eval/test pairs) and the result is the mean and std over
the runs; ``semantics_pairs="bootstrap"`` resamples the stored test split instead
(:func:`desideratum_accuracy`).

Masks of several models are stored in one file, ``{model: {"group/desideratum": mask}}``,
written by :func:`write_masks` and read back by :func:`read_selections`.

Every forward pass goes through the intervention kernel (:func:`entity_tracking.intervene.patching.run`)
with one :class:`~entity_tracking.intervene.patching.Blend` write per layer. Gradients flow through
the nnsight trace (``grad=True``): the blend is written by *replacing* the o_proj input (not an
in-place write into the model's tensor), the model's weights stay frozen, and the loss is
differentiated after the trace from the saved logits.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .. import task as D
from ..intervene.patching import (
    Blend,
    HeadPatch,
    Session,
    accuracy,
    as_batch,
    check_positions,
    heads_by_layer,
    run,
)
from ..io import read_json, write_json
from ..schema import GROUPS, Head, position_column
from .verdicts import DCM_MARGIN, DCM_SHARE_FLOOR

__all__ = [
    "CORE_DESIDERATA", "DCMError", "DCMResult", "better_mask", "blend_writes", "desideratum_accuracy",
    "encode_desideratum", "fresh_pairs", "fresh_seed", "functionality", "learn_masks", "manifest_vocabulary",
    "masked_logits", "read_selections", "select_heads", "semantics", "source_head_outputs", "take_rows",
    "train_mask", "write_masks",
]


class DCMError(ValueError):
    """Bad input to DCM (no heads, mismatched batches, a position the prompt lacks)."""


def _pos(batch: Mapping[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    name = position_column(key)
    if name not in batch:
        raise DCMError(f"{what} batch has no '{name}'")
    return check_positions(batch[name], batch["input_ids"].shape[1], f"{what} {key} position",
                           batch.get("attention_mask"))[:, 0]


def _ordered(heads: Sequence[Head]) -> list[Head]:
    """``heads`` in :func:`heads_by_layer` order (by layer, then as given)."""
    return [(l, h) for l, hs in heads_by_layer(heads).items() for h in hs]


def source_head_outputs(lm, source: Mapping[str, torch.Tensor], heads: Sequence[Head], position: str,
                        *, batch_size: int = 32) -> dict[int, torch.Tensor]:
    """The source run's outputs of ``heads`` at the source's own ``position``:
    ``{layer: [batch, n_heads_in_layer, d_head]}`` (heads in the order of :func:`heads_by_layer`)."""
    src = as_batch(source)
    pos = _pos(src, position, "source")
    layers = heads_by_layer(heads)
    cache = run(Session(lm, src, batch_size=batch_size, desc="caching source heads"), reads=[("z", l) for l in layers],
                positions=pos, logits=None).cache
    return {l: cache["z", l][:, 0, hs] for l, hs in layers.items()}


def select_heads(source_z: Mapping[int, torch.Tensor], of: Sequence[Head], heads: Sequence[Head]) -> dict[int, torch.Tensor]:
    """The outputs of ``heads`` taken out of ``source_z``, the :func:`source_head_outputs` of the
    heads ``of`` (a superset recorded in one source run): ``{layer: [batch, n_heads_in_layer,
    d_head]}`` in :func:`heads_by_layer` order, as :func:`source_head_outputs` of ``heads`` returns them."""
    index = {(l, h): i for l, hs in heads_by_layer(of).items() for i, h in enumerate(hs)}
    missing = [tuple(h) for h in heads if (int(h[0]), int(h[1])) not in index]
    if missing:
        raise DCMError(f"heads {missing} are not among the source run's heads")
    return {l: source_z[l][:, [index[(l, h)] for h in hs]] for l, hs in heads_by_layer(heads).items()}


def masked_logits(lm, base: Mapping[str, torch.Tensor], source_z: Mapping[int, torch.Tensor],
                  heads: Sequence[Head], position: str, mask: torch.Tensor,
                  session: Optional[Session] = None) -> torch.Tensor:
    """Last-position logits ``[batch, vocab]`` of the base run with each of ``heads`` (in
    :func:`heads_by_layer` order, matching ``mask [n_heads]``) set to ``m*base + (1-m)*source`` at
    the base's ``position`` (:func:`blend_writes` through the kernel). Differentiable in
    ``mask``; one forward pass, no chunking. ``session``: a
    :class:`~entity_tracking.intervene.patching.Session` of these base prompts to run it in (its
    runs may be faster: the same numbers).

    >>> m = torch.ones(len(heads), requires_grad=True)  # ones keep every head: the base run itself
    >>> logits = masked_logits(lm, pairs["base"], source_head_outputs(lm, pairs["source"], heads, "last"), heads, "last", m)
    >>> torch.allclose(logits, run(lm, batch=pairs["base"]).logits, atol=1e-5)
    True
    """
    session = session or Session(lm, base, batch_size=None, out_device=lm.device)
    return run(session, blend_writes(base, source_z, heads, position, mask), grad=True).logits


def blend_writes(base: Mapping[str, torch.Tensor], source_z: Mapping[int, torch.Tensor], heads: Sequence[Head],
                 position: str, mask: torch.Tensor) -> list[Blend]:
    """One :class:`~entity_tracking.intervene.patching.Blend` per layer of ``heads`` (in
    :func:`heads_by_layer` order, matching ``mask [n_heads]``) at the base's ``position``, blending
    towards ``source_z`` (``{layer: [batch, n_heads_in_layer, d_head]}``)."""
    b = as_batch(base)
    layers = heads_by_layer(heads)
    n = sum(len(v) for v in layers.values())
    if mask.shape != (n,):
        raise DCMError(f"mask must have one entry per head ({n}), got shape {tuple(mask.shape)}")
    pos = _pos(b, position, "base")
    writes, offset = [], 0
    for layer, hs in layers.items():
        writes.append(Blend("z", layer, hs, source_z[layer][:, None], pos, mask[offset: offset + len(hs)]))
        offset += len(hs)
    return writes


@dataclass
class DCMResult:
    """A trained mask. ``mask`` is the best rounded mask (1 keep, 0 patch) over ``heads``."""

    heads: list[Head]
    mask: list[int]
    position: str
    lam: float
    seed: int
    relaxation: str
    eval_accuracy: float
    test_accuracy: float
    best_step: int
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def selected(self) -> list[Head]:
        return [h for h, m in zip(self.heads, self.mask) if m == 0]

    def to_json(self) -> dict[str, Any]:
        return {
            "heads": [list(h) for h in self.heads], "mask": self.mask, "selected": [list(h) for h in self.selected],
            "position": self.position, "lambda": self.lam, "seed": self.seed, "relaxation": self.relaxation,
            "eval_accuracy": self.eval_accuracy, "test_accuracy": self.test_accuracy, "best_step": self.best_step,
            "history": self.history,
        }


def take_rows(batch: Mapping[str, torch.Tensor], idx) -> dict[str, torch.Tensor]:
    """The rows ``idx`` (indices or a slice) of every per-example tensor of an encoded batch."""
    n = batch["input_ids"].shape[0]
    return {k: (v[idx] if isinstance(v, torch.Tensor) and v.shape[:1] == (n,) else v) for k, v in batch.items()}


def _rounded_accuracy(session: Session, pairs, src_z, heads, position, mask_values) -> float:
    """The accuracy of the rounded mask on ``pairs``, run in ``session`` (of their base prompts)."""
    hard = (mask_values >= 0.5).float()
    logits = run(session, blend_writes(pairs["base"], src_z, heads, position, hard)).logits
    n = pairs["base"]["input_ids"].shape[0]
    return int((logits.argmax(-1).cpu() == pairs["target"]).sum()) / max(n, 1)


def better_mask(accuracy: float, n_selected: int, best_accuracy: float, best_n_selected: int) -> bool:
    """Whether a rounded mask with eval ``accuracy`` selecting ``n_selected`` heads replaces the
    best so far: higher eval accuracy wins, and at equal accuracy the mask that selects **more**
    heads wins (as in the reference code); a full tie keeps the earlier mask."""
    return (accuracy, n_selected) > (best_accuracy, best_n_selected)


def train_mask(
    lm,
    heads: Sequence[Head],
    position: str,
    train: Mapping[str, Any],
    eval: Mapping[str, Any],
    test: Mapping[str, Any],
    *,
    lam: float = 0.01,
    lr: float = 0.1,
    epochs: int = 2,
    batch_size: int = 32,
    eval_every: int = 4,
    seed: int = 0,
    relaxation: Literal["clamp", "sigmoid"] = "clamp",
    progress: bool = True,
    source_z: Optional[Mapping[str, Mapping[int, torch.Tensor]]] = None,
    sessions: Optional[Mapping[str, Session]] = None,
    cached: bool = True,
    eval_batch_size: Optional[int] = None,
) -> DCMResult:
    """Learn a DCM mask over ``heads`` (all acting at ``position``) for one desideratum.

    ``train``/``eval``/``test`` are :func:`entity_tracking.task.encode_pairs` batches
    (``{"base", "source", "target"}``). The mask is trained on ``train``; every ``eval_every``
    steps (and at the last) its rounding is scored on ``eval`` and kept if :func:`better_mask`
    (higher eval accuracy, ties to more selected heads). Returns that mask, its eval accuracy and
    its accuracy on ``test`` (``test`` plays no part in the choice). ``source_z``: per split
    (``"train"``, ``"eval"``, ``"test"``) the source run's outputs of ``heads`` as
    :func:`source_head_outputs` returns them, when already computed (:func:`learn_masks` runs each
    source once for every lambda, seed and group at one position).

    Every forward pass runs in a :class:`~entity_tracking.intervene.patching.Session` of the split's
    base prompts (``sessions``, per split, when already made; ``cached=False`` makes them run every
    position, the oracle). ``eval_batch_size``: rows per forward pass when a rounded mask is
    scored (default ``batch_size``; no gradient, the same answers in fewer passes).
    """
    heads = [h for l, hs in heads_by_layer(heads).items() for h in [(l, x) for x in hs]]
    if not heads:
        raise DCMError("DCM needs at least one head")
    if relaxation not in ("clamp", "sigmoid"):
        raise DCMError(f"relaxation must be 'clamp' or 'sigmoid', got {relaxation!r}")
    splits = {"train": train, "eval": eval, "test": test}
    eval_batch_size = eval_batch_size or batch_size
    src = dict(source_z) if source_z is not None else \
        {k: source_head_outputs(lm, v["source"], heads, position, batch_size=batch_size) for k, v in splits.items()}
    if sessions is None:
        sessions = {k: Session(lm, v["base"], batch_size=eval_batch_size, cached=cached, out_device=lm.device)
                    for k, v in splits.items()}
    gen = torch.Generator().manual_seed(seed)
    if relaxation == "clamp":
        param = torch.ones(len(heads), requires_grad=True)
    else:
        param = torch.full((len(heads),), 3.0, requires_grad=True)  # sigmoid(3) ~ 0.95: start near "keep"

    def current() -> torch.Tensor:
        return param if relaxation == "clamp" else torch.sigmoid(param)

    opt = torch.optim.Adam([param], lr=lr)
    n = train["base"]["input_ids"].shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    best = (-1.0, -1, [1] * len(heads), 0)  # (eval acc, n selected, mask, step)
    scored: dict[tuple[int, ...], float] = {}  # eval accuracy of each rounded mask met so far
    history: list[dict[str, float]] = []
    it = range(total)
    if progress:
        it = tqdm(it, desc=f"DCM ({len(heads)} heads, lambda {lam})", leave=False)
    step = 0
    order = torch.randperm(n, generator=gen)
    for step in it:
        if step % steps_per_epoch == 0:
            order = torch.randperm(n, generator=gen)
        idx = order[(step % steps_per_epoch) * batch_size: (step % steps_per_epoch + 1) * batch_size]
        m = current()
        rows = sessions["train"].rows(idx)
        logits = masked_logits(lm, rows.batch, {l: v[idx] for l, v in src["train"].items()}, heads, position, m, rows)
        target = train["target"][idx].to(logits.device)
        loss = -logits.gather(1, target[:, None]).mean() + lam * (1 - m).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if relaxation == "clamp":
            with torch.no_grad():
                param.clamp_(0.0, 1.0)
        if (step + 1) % eval_every == 0 or step == total - 1:
            mv = current().detach()
            hard = [int(x >= 0.5) for x in mv.tolist()]
            if tuple(hard) not in scored:  # the rounded mask often stays put between evaluations
                scored[tuple(hard)] = _rounded_accuracy(sessions["eval"], eval, src["eval"], heads, position, mv)
            acc = scored[tuple(hard)]
            n_sel = hard.count(0)
            history.append({"step": step + 1, "loss": float(loss.detach()), "eval_accuracy": acc, "n_selected": n_sel})
            if better_mask(acc, n_sel, best[0], best[1]):
                best = (acc, n_sel, hard, step + 1)
    mask = torch.tensor(best[2], dtype=torch.float32)
    test_acc = _rounded_accuracy(sessions["test"], test, src["test"], heads, position, mask)
    return DCMResult(heads, best[2], position, lam, seed, relaxation, best[0], test_acc, best[3], history)


def desideratum_accuracy(
    lm,
    heads: Sequence[Head],
    position: str,
    pairs: Mapping[str, Any],
    *,
    mode: Literal["fresh", "bootstrap"] = "bootstrap",
    n_resamples: int = 10,
    sample_size: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 32,
    source_z: Optional[Mapping[int, torch.Tensor]] = None,
    session: Optional[Session] = None,
) -> dict[str, Any]:
    """Patch ``heads`` from source to base (each at its group ``position``, the source read at its
    own position) and report the share of samples whose answer is the target. ``source_z``: the
    source run's outputs of ``heads`` as :func:`source_head_outputs` returns them, when already
    computed (:func:`semantics` shares one source run between selections). ``session``: a
    :class:`~entity_tracking.intervene.patching.Session` of the base prompts to run them in.

    Returns ``{"mean", "std", "runs": [...], "correct": [n] (0/1 per sample), "accuracy"}``
    (``accuracy``: over all samples). The ``n_resamples`` ``runs`` are

    * ``mode="bootstrap"``: subsets of ``sample_size`` samples of ``pairs`` drawn with
      replacement (all ``n`` samples when ``sample_size`` is None), seeded by ``seed``;
    * ``mode="fresh"``: ``pairs`` are ``n_resamples`` independent draws of ``sample_size``
      pairs each, concatenated in draw order (:func:`fresh_pairs`); run ``i`` is the accuracy on
      draw ``i`` (the reference code's protocol). ``sample_size`` None means ``n / n_resamples``.
    """
    if mode not in ("fresh", "bootstrap"):
        raise DCMError(f"mode must be 'fresh' or 'bootstrap', got {mode!r}")
    if n_resamples < 1:
        raise DCMError(f"n_resamples must be at least 1, got {n_resamples}")
    base, source = as_batch(pairs["base"]), as_batch(pairs["source"])
    target = pairs["target"]
    if base["input_ids"].shape[0] != source["input_ids"].shape[0]:
        raise DCMError("base and source batches differ in size")
    n = base["input_ids"].shape[0]
    if mode == "fresh":
        k = sample_size or n // n_resamples
        if k < 1 or k * n_resamples != n:
            raise DCMError(f"fresh mode needs {n_resamples} draws of {sample_size} pairs concatenated, "
                           f"got {n} pairs")
    patches: list[HeadPatch] = []
    if heads:
        src_z = source_z if source_z is not None else source_head_outputs(lm, source, heads, position,
                                                                          batch_size=batch_size)
        pos = _pos(base, position, "base")
        for layer, hs in heads_by_layer(heads).items():
            patches.append(HeadPatch("z", layer, hs, src_z[layer][:, None], pos))
    session = session or Session(lm, base, batch_size=batch_size, desc="desideratum patching")
    logits = run(session, patches).logits
    correct = (logits.argmax(-1) == target).float()
    if mode == "fresh":
        runs = [float(correct[i * k:(i + 1) * k].mean()) for i in range(n_resamples)]
    else:
        k = sample_size or n
        rng = random.Random(seed)
        runs = [float(correct[[rng.randrange(n) for _ in range(k)]].mean()) for _ in range(n_resamples)]
    mean = sum(runs) / len(runs)
    std = (sum((r - mean) ** 2 for r in runs) / max(len(runs) - 1, 1)) ** 0.5
    return {"mean": mean, "std": std, "runs": runs, "correct": correct.tolist(), "accuracy": accuracy(logits, target)}


# --------------------------------------------------------------------------------------------
# Fresh desideratum pairs, drawn as the reference code draws them for the semantics


def manifest_vocabulary(where, tokenizer):
    """The :class:`~entity_tracking.task.Vocabulary` recorded in the data manifest of ``where``
    (the objects and labels the profile's data were built with), for ``tokenizer``. Raises a
    :class:`~entity_tracking.task.DataError` if one of its objects is not one token for it."""

    man = D.load_manifest(where)
    k = int(man["num_boxes"])
    voc = man["vocabulary"]
    return D.build_vocabulary(tokenizer, voc["objects"], voc["labels"], num_boxes=k, min_objects=2 * k + 1)


def fresh_seed(data_seed: int, name: str, draw: int, seed: int = 0) -> int:
    """The generator seed of fresh draw ``draw`` of desideratum ``name``: a 62-bit hash of the data
    seed, the desideratum, the draw and ``seed``, never equal to ``data_seed`` (the seed of the
    stored pairs), so fresh pairs are new."""
    key = f"dcm-fresh-pairs:{data_seed}:{name}:{draw}:{seed}".encode()
    out = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 2
    return out + 1 if out == int(data_seed) else out


def fresh_pairs(where, tokenizer, name: str, n: int, draw: int, seed: int = 0, *,
                vocab=None) -> list[dict[str, Any]]:
    """``n`` new (base, source, target) records of desideratum ``name``, generated by
    :func:`entity_tracking.task.make_desiderata` with the manifest's vocabulary and number of
    boxes and the seed :func:`fresh_seed` derives from the data seed, ``name``, ``draw`` and
    ``seed``. The same arguments give the same records; another ``draw`` gives other pairs.

    Every record is used (the generator's 50/25/25 split labels are meaningless here and are
    replaced by ``"fresh"``; ``draw`` is recorded). ``vocab`` (from :func:`manifest_vocabulary`)
    saves rebuilding the vocabulary on every call."""

    if n < 1:
        raise DCMError(f"a fresh draw needs at least one pair, got n={n}")
    man = D.load_manifest(where)
    vocab = vocab if vocab is not None else manifest_vocabulary(where, tokenizer)
    s = fresh_seed(int(man["seed"]), name, draw, seed)
    recs = D.make_desiderata(tokenizer, name, max(n, len(D.SPLITS) + 1), int(man["num_boxes"]), s, vocab)[:n]
    for r in recs:
        r["split"], r["draw"] = "fresh", draw
    return recs


# --------------------------------------------------------------------------------------------
# Masks of several models in one file


def write_masks(path, masks: Mapping[str, Mapping[tuple[str, str], DCMResult]]):
    """Write ``{model: {(group, desideratum): DCMResult}}`` atomically as JSON
    ``{model: {"group/desideratum": DCMResult.to_json()}}``; read it with :func:`read_selections`."""

    out: dict[str, dict[str, Any]] = {}
    for model, results in masks.items():
        out[str(model)] = {}
        for key, res in results.items():
            group, desid = key
            if "/" in group or "/" in desid:
                raise DCMError(f"group and desideratum names must not contain '/': {key}")
            out[str(model)][f"{group}/{desid}"] = res.to_json()
    return write_json(path, out)


def models_with_masks(path) -> list[str]:
    """The models a :func:`write_masks` file holds masks for (the DCM chapter leaves out the models
    that do not do the task)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DCMError(f"{path} is not a file of DCM masks: rerun the DCM chapter")
    return list(data)


def read_selections(path, model_name: str) -> dict[tuple[str, str], list[Head]]:
    """The heads DCM selected for ``model_name`` in a :func:`write_masks` file:
    ``{(group, desideratum): [(layer, head), ...]}``. Raises :class:`DCMError` naming the model
    and the models the file holds when it has none for ``model_name``."""

    data = read_json(path)
    if not isinstance(data, dict) or model_name not in data:
        present = sorted(data) if isinstance(data, dict) else []
        hint = ""
        if present and all("/" in k for k in present):
            hint = "; it looks like a single-model file of an older version: rerun the DCM chapter"
        raise DCMError(f"{path} has no DCM masks for model '{model_name}' (models present: {present}){hint}")
    out: dict[tuple[str, str], list[Head]] = {}
    for key, res in data[model_name].items():
        group, sep, desid = key.partition("/")
        if not sep or not isinstance(res, dict) or "selected" not in res:
            raise DCMError(f"{path}: entry '{key}' of model '{model_name}' is not a 'group/desideratum' mask")
        out[(group, desid)] = [(int(l), int(h)) for l, h in res["selected"]]
    return out


# --------------------------------------------------------------------------------------------
# The chapter's runs: a mask for every group x core desideratum, then the semantics in every model

#: The desiderata a mask is learned for, in every group (paper-methods §4).
CORE_DESIDERATA: tuple[str, ...] = ("positional", "object_value", "box_label_value")


def encode_desideratum(tokenizer, where, name: str, split: Optional[str] = None) -> dict[str, Any]:
    """Load one desideratum's pairs (one split, or all) and encode them for ``tokenizer``."""

    recs = D.load_desiderata(where, name, split)
    if not recs:
        raise DCMError(f"desideratum '{name}' has no {split or ''} pairs")
    return D.encode_pairs(tokenizer, recs, padding_side="right")


def _heads_at(circuit, groups: Iterable[str]) -> dict[str, list[Head]]:
    """Every head of ``groups`` by the position its group acts at, each once, in :func:`heads_by_layer` order."""
    out: dict[str, list[Head]] = defaultdict(list)
    for g in groups:
        out[circuit.positions[g]] += [(int(l), int(h)) for l, h in circuit.groups[g]]
    return {p: _ordered(list(dict.fromkeys(hs))) for p, hs in out.items()}


def _grouped(items: Sequence[Any], key: Callable[[Any], Any]) -> list[tuple[Any, list[Any]]]:
    """``items`` grouped by ``key``, groups in the order their first item comes (items in order)."""
    out: dict[Any, list[Any]] = {}
    for it in items:
        out.setdefault(key(it), []).append(it)
    return list(out.items())


def learn_masks(lm, circuit, where, spec, groups: Sequence[str] | None = None,
                desiderata: Sequence[str] = CORE_DESIDERATA, *,
                cached: bool = True) -> dict[tuple[str, str], DCMResult]:
    """Learn a mask for every (group, desideratum) on ``lm``, trying every lambda and seed of
    ``spec`` (:class:`~entity_tracking.config.DCMSpec`) and keeping the best on the eval split.
    Groups without heads are skipped. The base prompts' sessions of each (desideratum, split),
    and the source runs of each position there, are made once for every group, lambda and seed
    (``cached=False``: every forward pass runs every position, the oracle)."""
    out: dict[tuple[str, str], DCMResult] = {}
    splits = {d: {s: encode_desideratum(lm.tokenizer, where, d, s) for s in ("train", "eval", "test")} for d in desiderata}
    jobs = [(g, d) for g in (groups or GROUPS) for d in desiderata if circuit.groups[g]]
    union = _heads_at(circuit, [g for g, _ in jobs])

    bar = tqdm(total=len(jobs), desc="DCM masks")
    # the jobs of one desideratum together: its base prompts' sessions, and the source runs of each
    # position, are made once and dropped before the next's; the masks come out in the jobs' order
    for d, same in _grouped(jobs, lambda job: job[1]):
        whole = {s: Session(lm, b["base"], batch_size=spec.eval_batch_size, cached=cached, out_device=lm.device)
                 for s, b in splits[d].items()}
        sources: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
        for g, _ in same:
            pos = circuit.positions[g]
            if pos not in sources:
                sources[pos] = {s: source_head_outputs(lm, b["source"], union[pos], pos, batch_size=spec.eval_batch_size)
                                for s, b in splits[d].items()}
            own = {s: select_heads(z, union[pos], circuit.groups[g]) for s, z in sources[pos].items()}

            best: Optional[DCMResult] = None
            for lam in spec.lambdas:
                for seed in spec.seeds:
                    res = train_mask(lm, circuit.groups[g], pos, splits[d]["train"], splits[d]["eval"],
                                     splits[d]["test"], lam=lam, lr=spec.lr, epochs=spec.epochs,
                                     batch_size=spec.batch_size, eval_every=spec.eval_every, seed=seed,
                                     relaxation=spec.relaxation, progress=False, source_z=own, sessions=whole,
                                     eval_batch_size=spec.eval_batch_size)
                    if best is None or better_mask(res.eval_accuracy, len(res.selected), best.eval_accuracy,
                                                   len(best.selected)):
                        best = res
            out[(g, d)] = best
            bar.update()
    bar.close()
    return {job: out[job] for job in jobs}


def semantics(models: Iterable[tuple[str, Any]], selections: Mapping[tuple[str, str], Sequence[Head]],
              positions: Mapping[str, str], where, spec,
              desiderata: Mapping[tuple[str, str], Sequence[str]] | None = None, *,
              base: Optional[str] = None, cached: bool = True) -> list[dict[str, Any]]:
    """Per-model semantics: for every (group, desideratum) selection, patch those heads from source
    to base in every model and report the share of samples giving the target (percent, mean and
    std over ``spec.n_resamples`` runs of ``spec.sample_size`` pairs).

    ``spec.semantics_pairs`` says where the pairs come from: ``"fresh"`` (the reference code's
    protocol) draws new pairs for every run with :func:`fresh_pairs` (generated once per
    desideratum and draw, with the first model's tokenizer, and shared by every model, each
    encoding them with its own tokenizer); ``"bootstrap"`` resamples the stored test split.

    ``models`` yields ``(name, LoadedModel)`` pairs (a generator may load one model at a time).
    ``desiderata`` optionally maps a selection key to the desiderata whose pairs evaluate it
    (default: the key's own), e.g. the Transmitters' positional heads on the extra variants.
    With ``spec.extra_models == "base"`` (the paper reports the extra variants for Llama-7B
    only) a key's desiderata other than its own are evaluated in the model named ``base`` only;
    ``"all"`` evaluates them in every model.

    The selections evaluated on one desideratum share one session of its base prompts, and those
    at one position one source run (``cached=False``: every position is run, the oracle); they
    are run together, and the rows come out in the order of ``selections``.
    """
    mode = getattr(spec, "semantics_pairs", "bootstrap")
    if mode not in ("fresh", "bootstrap"):
        raise DCMError(f"semantics_pairs must be 'fresh' or 'bootstrap', got {mode!r}")
    fresh: dict[tuple[str, int], list[dict[str, Any]]] = {}  # (desideratum, draw) -> records, across models
    vocab = None

    def fresh_records(tokenizer, desid: str) -> list[dict[str, Any]]:
        nonlocal vocab
        missing = [i for i in range(spec.n_resamples) if (desid, i) not in fresh]
        if missing and vocab is None:
            vocab = manifest_vocabulary(where, tokenizer)
        for i in tqdm(missing, desc=f"fresh {desid} pairs", leave=False, disable=not missing):
            fresh[desid, i] = fresh_pairs(where, tokenizer, desid, spec.sample_size, i, vocab=vocab)
        return [r for i in range(spec.n_resamples) for r in fresh[desid, i]]

    # one source run per (desideratum, position) serves every selection evaluated on it: it records
    # the union of their heads, and each selection takes its own heads' slices
    jobs = [(key, heads, eval_desid) for key, heads in selections.items()
            for eval_desid in (desiderata or {}).get(key, [key[1]])]
    union: dict[tuple[str, str], list[Head]] = defaultdict(list)
    for (group, _), heads, eval_desid in jobs:
        union[eval_desid, positions[group]] += [(int(l), int(h)) for l, h in heads]
    union = {k: _ordered(list(dict.fromkeys(hs))) for k, hs in union.items()}

    extra_in = getattr(spec, "extra_models", "all")
    if extra_in not in ("base", "all"):
        raise DCMError(f"extra_models must be 'base' or 'all', got {extra_in!r}")
    if extra_in == "base" and base is None and any(key[1] != d for key, _, d in jobs):
        raise DCMError("extra_models='base' evaluates the extra desiderata in the base model only: name it (base=...)")

    rows = []
    for name, lm in models:
        mine = [(i, job) for i, job in enumerate(jobs) if extra_in == "all" or name == base or job[0][1] == job[2]]
        done: dict[int, dict[str, Any]] = {}
        bar = tqdm(total=len(mine), desc=f"semantics ({name})", leave=False)
        for eval_desid, same in _grouped(mine, lambda job: job[1][2]):
            if mode == "fresh":
                pairs = D.encode_pairs(lm.tokenizer, fresh_records(lm.tokenizer, eval_desid), padding_side="right")
            else:
                pairs = encode_desideratum(lm.tokenizer, where, eval_desid, "test")
            runs = sum(1 for _, (_, heads, _) in same if heads) + any(not heads for _, (_, heads, _) in same)
            whole = Session(lm, pairs["base"], batch_size=spec.eval_batch_size, desc="desideratum patching",
                            cached=cached and runs > 1)  # a single run gains nothing from a cache
            sources: dict[str, dict[int, torch.Tensor]] = {}
            unpatched = None
            for i, ((group, _), heads, _) in same:
                pos = positions[group]
                if heads and pos not in sources:
                    sources[pos] = source_head_outputs(lm, pairs["source"], union[eval_desid, pos], pos,
                                                       batch_size=spec.eval_batch_size)
                if heads or unpatched is None:  # nothing to patch: the model as it is, run once
                    src = select_heads(sources[pos], union[eval_desid, pos], heads) if heads else None
                    r = desideratum_accuracy(lm, list(heads), pos, pairs, mode=mode, n_resamples=spec.n_resamples,
                                             sample_size=spec.sample_size, seed=0, batch_size=spec.eval_batch_size,
                                             source_z=src, session=whole)
                    if not heads:
                        unpatched = r
                done[i] = r if heads else unpatched
                bar.update()
            del whole, sources
        bar.close()
        for i, ((group, desid), heads, eval_desid) in mine:
            r = done[i]
            rows.append({"group": group, "desideratum": eval_desid, "selected_for": desid, "model": name,
                         "n_heads": len(heads), "mean": 100 * r["mean"], "std": 100 * r["std"],
                         "pairs": mode, "n_runs": len(r["runs"])})
    return rows


def share_interval(row: Mapping[str, Any]) -> tuple[float, float]:
    """An approximate 95% interval ``(low, high)`` (percent) of a :func:`semantics` row's share.
    Fresh draws are independent samples, so the mean of ``n_runs`` has standard error
    ``std / sqrt(n_runs)``; bootstrap runs resample one test split, whose standard error their
    ``std`` estimates directly."""
    n = max(int(row.get("n_runs", 1)), 1)
    se = row["std"] / math.sqrt(n) if row.get("pairs", "bootstrap") == "fresh" else row["std"]
    return row["mean"] - 1.96 * se, row["mean"] + 1.96 * se


def functionality(rows: Sequence[Mapping[str, Any]], margin: float = float(DCM_MARGIN),
                  floor: float = float(DCM_SHARE_FLOOR)) -> dict[str, dict[str, str]]:
    """What each group encodes in each model, read off :func:`semantics` rows of the core
    desiderata: ``"position"`` when the positional share's 95% interval (:func:`share_interval`)
    lies at or above ``floor`` percent and above the object-value share's interval, and the
    positional share beats it by more than ``margin`` points; ``"value"`` for the reverse;
    ``"neither"`` otherwise (the paper's groups reach 37-66% on what they encode, and about 13%
    on what they do not; thresholds and reasons in :mod:`entity_tracking.methods.verdicts`)."""
    table: dict[str, dict[str, dict[str, Mapping[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["desideratum"] == r["selected_for"] and r["desideratum"] in ("positional", "object_value"):
            table[r["model"]][r["group"]][r["desideratum"]] = r
    none = {"mean": 0.0, "std": 0.0, "n_runs": 1}
    out: dict[str, dict[str, str]] = {}
    for model, groups in table.items():
        out[model] = {}
        for g, d in groups.items():
            pos, val = d.get("positional", none), d.get("object_value", none)
            (pl, ph), (vl, vh) = share_interval(pos), share_interval(val)
            if pl >= floor and pl > vh and pos["mean"] > val["mean"] + margin:
                out[model][g] = "position"
            elif vl >= floor and vl > ph and val["mean"] > pos["mean"] + margin:
                out[model][g] = "value"
            else:
                out[model][g] = "neither"
    return out
