"""Mean ablation and the three circuit metrics: faithfulness, completeness, minimality.

**Mean ablation** (paper-methods §1.3, §3) removes what a head contributes on one prompt while
keeping what it contributes on *every* prompt of the task. A head's output -- its slice of the
``o_proj`` input, ``[batch, pos, n_heads, d_head]`` (see :mod:`entity_tracking.model.arch`) -- is
replaced by its average over reference prompts, taken separately at every absolute token
position. The reference prompts are random contexts whose query label is absent from the
context, so the mean carries the shape of the task ("a box label sits here, a query sits
there") but no answer. Averaging per position only makes sense if the reference and evaluation
prompts line up token by token, so all of them must share one length (the dataset guarantees
it; this module checks it). Means are computed per model -- a fine-tuned model is ablated with
its own means -- and stored as :class:`MeanActivations` ``[n_layers, pos, n_heads, d_head]``.

**Circuit performance** F(C) is the accuracy (argmax over the whole vocabulary at the last token
equals the target) when everything outside the circuit is mean-ablated: at every position other
than the three *vital* ones all heads are ablated, and at a vital position every head that is
not in the circuit group acting there is ablated (Value Fetchers and Position Transmitters at
the last token, Position Detectors at the query label, Structure Readers at the query label's
earlier occurrence in the context). F(M) is the model's own accuracy, nothing ablated, and
F(∅) the accuracy with every head ablated everywhere. **Faithfulness** is F(C)/F(M): how much
of the model's behaviour the circuit alone recovers; a random circuit of the same group sizes is
the baseline. Its converse, :func:`outside_at_positions`, leaves the non-vital positions intact
and ablates only the heads outside the circuit at the vital ones; one position at a time
(:func:`shortfall_by_position`), it shows where a circuit misses heads the model needs.
**Necessity** asks, for one group, the opposite question: mean-ablate its heads at every position
and compare the accuracy lost with that lost to as many random heads -- drawn from the whole model,
and from the heads outside the circuit (in a small model, random heads drawn from all of them
often *are* circuit heads). **Completeness** (Wang et al. 2022) asks whether the circuit holds
*all* the mechanism: remove a subset K of the circuit from both the circuit and the full model and compare,
|F(C\\K) - F(M\\K)|, where F(M\\K) mean-ablates only K's heads at their group's position; a circuit
missing redundant backup heads would collapse under C\\K while M\\K is carried by the backups.
**Minimality** asks whether every head is needed: for head v, K is the top share of its group
ranked by how much v matters once each other head is gone (a pairwise-ablation drop), and v is
kept if F(C\\K)/F(C\\(K∪{v})) - 1 reaches a threshold (paper §2, 1%).

**Sites.** Everything here is a set of *sites* ``(layer, head, position)``: a circuit keeps the
sites of its groups (each group's heads at that group's position) and ablates the rest; K removes
its own sites. ``C\\K`` is therefore "C's sites minus K's sites" (:class:`Ablation` with
``keep=C, ablate=K``), which matches ``M\\K`` exactly even where a head sits in two groups at one
position -- unlike :meth:`Circuit.without`, which removes group entries. A group at the special
position :data:`ALL_POSITIONS` acts at every token, which is how :func:`full_circuit` spells the
full model: its F(C) *is* F(M), its faithfulness exactly 1. Every function here reads the groups a
circuit holds (:attr:`Circuit.group_names`), so a circuit extended with groups of ours
(:data:`~entity_tracking.schema.EXTENSION_GROUPS`) is ablated by the same rule as the paper's.
A position key may also name *several* positions per prompt: a batch entry ``<key>_position`` of
shape ``[batch, n]`` (``-1``-padded) puts the group's heads at all of them, which is how
:mod:`entity_tracking.methods.binding` ablates every context position at once.

**Uncertainty.** Every evaluation keeps its per-example correctness vector and the prompts'
``context_id`` (:class:`Evaluation`), so every number gets a percentile bootstrap interval by
resampling the evaluation *contexts*, each with all its queries (:func:`bootstrap` with
``clusters``; prompts without a ``context_id`` are resampled one by one); paired numbers (a ratio,
a difference) resample the same contexts for both sides. A circuit's baseline is a paired number
too: ``faithfulness_over_random`` (:meth:`FaithfulnessResult.summary`) is its faithfulness minus
that of random circuits of its group sizes on the same resampled contexts, the draws resampled too.

**Running it.** All settings to evaluate are flattened into ``(setting, prompt)`` rows, each a run
of the prompt with one :class:`~entity_tracking.intervene.patching.Mean` write per layer holding a
boolean keep-mask ``[batch, pos, n_heads]`` built by tensor ops, and handed together to the
intervention kernel's session (:meth:`entity_tracking.intervene.patching.Session.predict_rows`),
which decides how to run them fast. A setting is run once however often it is asked for, and a
``memo`` carries results between calls.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..intervene.patching import Mean, Session, run
from ..intervene.stats import Estimate, Evaluation, bootstrap, context_ids, draws_mean, ratio, shared_clusters
from ..io import atomic_path
from ..schema import EXTENSION_GROUPS, GROUP_LABELS, GROUPS, Head, position_column
from ..task.encoding import encode_prompts
from .circuit import Circuit

__all__ = [
    "ALL_POSITIONS",
    "Ablation",
    "AblationError",
    "CompletenessDraw",
    "CompletenessResult",
    "Estimate",
    "Evaluation",
    "FaithfulnessResult",
    "HeadMinimality",
    "MeanActivations",
    "MinimalityResult",
    "NecessityResult",
    "bootstrap",
    "circuit_performance",
    "completeness",
    "compute_means",
    "context_ids",
    "draws_mean",
    "empty_circuit",
    "encode_for",
    "evaluate",
    "faithfulness",
    "full_circuit",
    "furthest_short",
    "keep_mask",
    "mean_ablated_logits",
    "minimality",
    "necessity",
    "outside_at_positions",
    "pruner",
    "random_circuit",
    "random_circuits",
    "setting_key",
    "shared_clusters",
    "shortfall_by_position",
]

#: A circuit position meaning "every token" (see :func:`full_circuit`).
ALL_POSITIONS = "all"


class AblationError(ValueError):
    """Inputs that mean ablation cannot use: mismatched lengths, models, heads or positions."""


def _progress(it: Iterable, progress: bool, **kw) -> Iterable:
    if not progress:
        return it
    return tqdm(it, **kw)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def encode_for(lm, prompts: Sequence[Mapping[str, Any]] | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch dict for ``lm``: prompt records are encoded with ``lm``'s tokenizer
    (:func:`entity_tracking.task.encode_prompts`); an already encoded batch (a mapping with
    ``input_ids``) is returned as is, so callers may override e.g. ``target``."""
    if isinstance(prompts, Mapping):
        if "input_ids" not in prompts:
            raise AblationError("an encoded batch needs 'input_ids' (see entity_tracking.task.encode_prompts)")
        return dict(prompts)
    return encode_prompts(lm.tokenizer, list(prompts))


def _n_examples(batch: Mapping[str, torch.Tensor]) -> int:
    return int(batch["input_ids"].shape[0])


def _lengths(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if "length" in batch:
        return batch["length"]
    return batch.get("attention_mask", torch.ones_like(batch["input_ids"])).sum(-1)


# --------------------------------------------------------------------------------------------
# Means
# --------------------------------------------------------------------------------------------


@dataclass
class MeanActivations:
    """Per-position mean of every head's output over the mean-reference prompts of one model.

    Attributes:
        model: name of the model they were computed on (``lm.name``).
        means: ``[n_layers, pos, n_heads, d_head]`` float32 on the CPU.
        n_prompts: how many reference prompts were averaged.
    """

    model: str
    means: torch.Tensor
    n_prompts: int

    @property
    def seq_len(self) -> int:
        return int(self.means.shape[1])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.means.shape)

    def check_fits(self, lm, *, check_model: bool = True) -> None:
        """Raise :class:`AblationError` unless these means belong to ``lm``: same geometry and,
        with ``check_model``, computed on the model of the same name."""
        a = lm.arch
        want = (a.n_layers, a.n_heads, a.d_head)
        got = (self.means.shape[0], self.means.shape[2], self.means.shape[3])
        if want != got:
            raise AblationError(
                f"means of '{self.model}' have (layers, heads, d_head) = {got} but model '{lm.name}' has {want}"
            )
        if check_model and self.model != lm.name:
            raise AblationError(
                f"means were computed on model '{self.model}' but are applied to '{lm.name}'; the paper ablates "
                f"every model with its own means (compute_means(lm, ...)); pass check_model=False to override"
            )

    def save(self, path: str | os.PathLike) -> Path:

        with atomic_path(path) as tmp:
            torch.save({"model": self.model, "means": self.means, "n_prompts": self.n_prompts}, tmp)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MeanActivations":
        obj = torch.load(path, map_location="cpu", weights_only=True)
        return cls(obj["model"], obj["means"], int(obj["n_prompts"]))


def compute_means(lm, prompts, *, batch_size: int = 32, progress: bool = True) -> MeanActivations:
    """Average every head's output per absolute position over ``prompts`` on model ``lm``.

    Args:
        lm: a :class:`~entity_tracking.load.LoadedModel`.
        prompts: mean-reference prompt records (:func:`entity_tracking.task.make_mean_reference_prompts`) or an
            encoded batch; all must tokenize to the same length.
        batch_size: prompts per trace.

    Returns:
        :class:`MeanActivations` with ``means`` ``[n_layers, pos, n_heads, d_head]``.
    """
    batch = encode_for(lm, prompts)
    n = _n_examples(batch)
    lengths = _lengths(batch)
    counts = Counter(int(x) for x in lengths)
    if len(counts) != 1 or int(batch["input_ids"].shape[1]) != int(lengths[0]):
        raise AblationError(
            "mean-reference prompts must all have one token length (means are taken per absolute position); "
            f"got lengths {dict(sorted(counts.items()))} -- build them with "
            "task.make_mean_reference_prompts(..., n_tokens=<eval length>) and the same num_boxes"
        )
    a = lm.arch
    seq = int(lengths[0])
    total = torch.zeros(a.n_layers, seq, a.n_heads, a.d_head, dtype=torch.float64)
    starts = range(0, n, batch_size)
    for s in _progress(starts, progress, desc=f"means ({lm.name})", total=len(starts)):
        chunk = {"input_ids": batch["input_ids"][s: s + batch_size]}
        z = run(Session(lm, chunk, batch_size=None, out_device=lm.device),
                reads=[("z", layer) for layer in range(a.n_layers)], logits=None).cache
        total += torch.stack([z["z", layer].float().sum(0).cpu() for layer in range(a.n_layers)]).double()
    return MeanActivations(model=lm.name, means=(total / n).float(), n_prompts=n)


# --------------------------------------------------------------------------------------------
# Circuits as site sets
# --------------------------------------------------------------------------------------------


def every_head(arch) -> list[Head]:
    return [(layer, h) for layer in range(arch.n_layers) for h in range(arch.n_heads)]


def full_circuit(arch, model: str = "") -> Circuit:
    """Every head in every group, each group at :data:`ALL_POSITIONS`: nothing is ablated, so
    its circuit performance is the full model's accuracy F(M)."""
    heads = every_head(arch)
    return Circuit(model, {g: list(heads) for g in GROUPS}, positions={g: ALL_POSITIONS for g in GROUPS},
                   meta={"kind": "full"})


def empty_circuit(model: str = "") -> Circuit:
    """No heads: evaluated as a circuit, every head is ablated at every position."""
    return Circuit(model, {g: [] for g in GROUPS}, meta={"kind": "empty"})


def outside_at_positions(arch, circuit: Circuit, positions: Optional[Iterable[str]] = None) -> Circuit:
    """The heads *not* in ``circuit`` at each of its group positions (or only ``positions``), as
    a circuit to ablate: ``Ablation(ablate=outside_at_positions(arch, C))`` is F(C) with every
    other position left intact, the converse of the paper's F(C), which also ablates every head at
    every non-vital position. Evaluated one position at a time, it says at which vital position a
    circuit misses heads the model needs. Each position's heads go into the first group acting
    there; groups at :data:`ALL_POSITIONS` have no outside."""
    keys = [p for p in dict.fromkeys(circuit.positions[g] for g in circuit.group_names) if p != ALL_POSITIONS]
    if positions is not None:
        wanted = list(positions)
        unknown = [p for p in wanted if p not in keys]
        if unknown:
            raise AblationError(f"positions {unknown} are not positions of circuit '{circuit.model}' ({keys})")
        keys = [p for p in keys if p in wanted]
    heads = every_head(arch)
    groups: dict[str, list[Head]] = {g: [] for g in circuit.group_names}
    for pos in keys:
        inside = {tuple(h) for g in circuit.group_names if circuit.positions[g] == pos for h in circuit.groups[g]}
        first = next(g for g in circuit.group_names if circuit.positions[g] == pos)
        groups[first] = [h for h in heads if h not in inside]
    return Circuit(circuit.model, groups, dict(circuit.positions), meta={"kind": "outside", "positions": keys})


def shortfall_by_position(lm, prompts, means: MeanActivations, circuit: Circuit, *, batch_size: int = 32,
                          progress: bool = True, memo: Optional[dict] = None) -> list[dict[str, Any]]:
    """Where ``circuit`` falls short in ``lm``: rows ``{"setting", "heads_ablated", "evaluation"}``
    for F(M), the paper's F(C), the heads outside the circuit ablated at each of its positions
    alone (``setting`` = the position key; everything else intact), and at all of them
    (``"all vital positions"``). ``heads_ablated`` is ``None`` for F(M) and F(C). ``memo``: see
    :func:`evaluate` (F(M) and F(C) are usually known from :func:`faithfulness`)."""
    keys = [p for p in dict.fromkeys(circuit.positions[g] for g in circuit.group_names) if p != ALL_POSITIONS]
    outside = {k: outside_at_positions(lm.arch, circuit, [k]) for k in keys}
    outside["all vital positions"] = outside_at_positions(lm.arch, circuit)
    settings = [("F(M)", None, Ablation(label="F(M)")), ("F(C)", None, Ablation(keep=circuit, label="F(C)"))]
    settings += [(k, o.n_heads, Ablation(ablate=o, label=f"outside at {k}")) for k, o in outside.items()]
    evs = evaluate(lm, prompts, means, [a for _, _, a in settings], batch_size=batch_size, progress=progress, memo=memo)
    return [{"setting": k, "heads_ablated": n, "evaluation": e} for (k, n, _), e in zip(settings, evs)]


def furthest_short(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The row of :func:`shortfall_by_position` whose single position costs most: the lowest
    accuracy among the rows that ablate the heads outside the circuit at one position (not F(M),
    F(C) or all vital positions at once). The first such row on a tie."""
    single = [r for r in rows if r["heads_ablated"] is not None and r["setting"] != "all vital positions"]
    if not single:
        raise AblationError("no row ablates a single position: pass the rows of shortfall_by_position")
    return min(single, key=lambda r: r["evaluation"].accuracy)


def _sites(circuit: Circuit) -> list[tuple[str, Head]]:
    """Unique ``(position, (layer, head))`` sites of ``circuit``, in group order."""
    seen: dict[tuple[str, Head], None] = {}
    for g in circuit.group_names:
        for h in circuit.groups[g]:
            seen.setdefault((circuit.positions[g], tuple(h)), None)
    return list(seen)


def _circuit_of_sites(template: Circuit, sites: Iterable[tuple[str, Head]], model: str = "") -> Circuit:
    """A circuit with ``template``'s positions holding ``sites``, each in the first group of
    ``template`` that has it (so K drawn from C reads like C)."""
    groups: dict[str, list[Head]] = {g: [] for g in template.group_names}
    for pos, head in sites:
        for g in template.group_names:
            if template.positions[g] == pos and head in template.groups[g]:
                groups[g].append(head)
                break
        else:
            raise AblationError(f"site {head} at '{pos}' is not in circuit '{template.model}'")
    return Circuit(model or template.model, groups, dict(template.positions))


@dataclass(frozen=True)
class Ablation:
    """One ablation setting: keep ``keep``'s sites (``None``: every site) minus ``ablate``'s
    sites (``None``: none); every other site is mean-ablated.

    * F(M): ``Ablation()``; F(C): ``Ablation(keep=C)``; F(∅): ``Ablation(keep=empty_circuit())``;
    * F(M\\K): ``Ablation(ablate=K)``; F(C\\K): ``Ablation(keep=C, ablate=K)``.
    """

    keep: Optional[Circuit] = None
    ablate: Optional[Circuit] = None
    label: str = ""

    def ablates_nothing(self, arch) -> bool:
        """True if no site of a model with ``arch``'s geometry is ablated."""
        if self.ablate is not None and self.ablate.n_heads > 0:
            return False
        if self.keep is None:
            return True
        everywhere = {tuple(h) for g in self.keep.group_names if self.keep.positions[g] == ALL_POSITIONS
                      for h in self.keep.groups[g]}
        return len(everywhere) == arch.n_layers * arch.n_heads and all(
            0 <= layer < arch.n_layers and 0 <= h < arch.n_heads for layer, h in everywhere)


def _check_circuit(arch, circuit: Circuit, batch: Mapping[str, torch.Tensor], what: str) -> None:
    seq = int(batch["input_ids"].shape[1])
    for g in circuit.group_names:
        for layer, head in circuit.groups[g]:
            if not (0 <= layer < arch.n_layers and 0 <= head < arch.n_heads):
                raise AblationError(
                    f"{what} '{circuit.model}' group {g} has head ({layer}, {head}), outside this model's "
                    f"{arch.n_layers} layers x {arch.n_heads} heads"
                )
        pos = circuit.positions[g]
        if not circuit.groups[g] or pos == ALL_POSITIONS:
            continue
        key = position_column(pos)
        if key not in batch:
            raise AblationError(
                f"{what} '{circuit.model}' group {g} acts at '{pos}', but the batch has no '{key}' "
                f"(positions: {sorted(k for k in batch if k.endswith('_position'))})"
            )
        p = torch.as_tensor(batch[key])
        if p.dim() not in (1, 2) or p.shape[0] != batch["input_ids"].shape[0]:
            raise AblationError(f"batch['{key}'] must be [batch] or [batch, n] positions, got shape {tuple(p.shape)}")
        if bool((p >= seq).any()) or bool((p < -1).any()):
            bad = int(p[(p >= seq) | (p < -1)][0])
            raise AblationError(f"batch['{key}'] holds position {bad}, out of range for prompts of {seq} tokens "
                                f"(-1 marks an absent position)")


def _position_keys(ablations: Sequence[Ablation]) -> list[str]:
    keys = [ALL_POSITIONS]
    for ab in ablations:
        for c in (ab.keep, ab.ablate):
            if c is None:
                continue
            for g in c.group_names:
                p = c.positions[g]
                if c.groups[g] and p not in keys:
                    keys.append(p)
    return keys


def _site_table(arch, ablations: Sequence[Ablation], keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``keep_heads``, ``ablate_heads``: bool ``[n_settings, n_keys, n_layers, n_heads]``."""
    shape = (len(ablations), len(keys), arch.n_layers, arch.n_heads)
    keep = torch.zeros(shape, dtype=torch.bool)
    abl = torch.zeros(shape, dtype=torch.bool)
    for i, ab in enumerate(ablations):
        if ab.keep is None:
            keep[i, 0] = True
        for table, c in ((keep, ab.keep), (abl, ab.ablate)):
            if c is None:
                continue
            for g in c.group_names:
                if c.groups[g]:
                    idx = torch.tensor(c.groups[g], dtype=torch.long)
                    table[i, keys.index(c.positions[g]), idx[:, 0], idx[:, 1]] = True
    return keep, abl


def _onehots(batch: Mapping[str, torch.Tensor], keys: list[str], rows: torch.Tensor, seq: int) -> torch.Tensor:
    """``[n_keys, n_rows, seq]`` float: 1 where row ``r`` has position key ``k`` (all ones for
    :data:`ALL_POSITIONS`; nothing where a position is ``-1``, i.e. absent). A key's batch entry
    is ``[batch]`` (one position per prompt) or ``[batch, n]`` (several, ``-1``-padded)."""
    out = torch.zeros(len(keys), len(rows), seq)
    out[0] = 1.0
    for k, key in enumerate(keys[1:], 1):
        pos = torch.as_tensor(batch[position_column(key)])[rows]
        if pos.dim() == 1:
            pos = pos[:, None]
        ok = pos >= 0
        r = torch.arange(len(rows))[:, None].expand_as(pos)
        out[k, r[ok], pos[ok]] = 1.0
    return out


def _row_masks(arch, batch, ablations, keys, tables, cfg: torch.Tensor, ex: torch.Tensor, seq: int) -> torch.Tensor:
    keep_h, abl_h = tables
    onehot = _onehots(batch, keys, ex, seq)  # [K, R, S]
    keep = torch.einsum("krs,rklh->lrsh", onehot, keep_h[cfg].float()) > 0
    if abl_h.any():
        keep &= ~(torch.einsum("krs,rklh->lrsh", onehot, abl_h[cfg].float()) > 0)
    return keep


def keep_mask(arch, batch: Mapping[str, torch.Tensor], ablation: Ablation) -> torch.Tensor:
    """Where ``ablation`` keeps the model's own head outputs, per prompt of ``batch``.

    Returns:
        bool ``[n_layers, batch, pos, n_heads]``: True = keep, False = replace by the mean.
    """
    n = _n_examples(batch)
    for c, what in ((ablation.keep, "circuit"), (ablation.ablate, "ablated set")):
        if c is not None:
            _check_circuit(arch, c, batch, what)
    keys = _position_keys([ablation])
    tables = _site_table(arch, [ablation], keys)
    return _row_masks(arch, batch, [ablation], keys, tables, torch.zeros(n, dtype=torch.long),
                      torch.arange(n), int(batch["input_ids"].shape[1]))


# --------------------------------------------------------------------------------------------
# Running ablated models
# --------------------------------------------------------------------------------------------


def _check_lengths(batch: Mapping[str, torch.Tensor], means: MeanActivations) -> None:
    seq = means.seq_len
    lengths = _lengths(batch)
    counts = Counter(int(x) for x in lengths)
    if set(counts) != {seq} or int(batch["input_ids"].shape[1]) != seq:
        raise AblationError(
            f"mean ablation lines positions up: every evaluation prompt must be {seq} tokens long like the "
            f"mean-reference prompts of '{means.model}', but the evaluation prompts have lengths "
            f"{dict(sorted(counts.items()))}; build both with the same num_boxes and tokenizer"
        )


def mean_ablated_logits(lm, prompts, means: Optional[MeanActivations], ablation: Ablation = Ablation(), *,
                        all_positions: bool = False, check_model: bool = True) -> torch.Tensor:
    """Logits of ``lm`` on ``prompts`` (one trace) under ``ablation``.

    Returns:
        ``[batch, vocab]`` at each prompt's last token, or ``[batch, pos, vocab]`` with
        ``all_positions``; float32 on the CPU.
    """
    batch = encode_for(lm, prompts)
    n = _n_examples(batch)
    keep = None
    mean_t = None
    if not ablation.ablates_nothing(lm.arch):
        if means is None:
            raise AblationError("this ablation removes heads: pass the model's MeanActivations")
        means.check_fits(lm, check_model=check_model)
        _check_lengths(batch, means)
        keep = keep_mask(lm.arch, batch, ablation)
        if bool(keep.all()):
            keep = None
        else:
            keep = keep.to(lm.device)
            mean_t = means.means.to(device=lm.device, dtype=lm.dtype)
    writes = [] if keep is None else [Mean(layer, keep[layer], mean_t[layer]) for layer in range(lm.arch.n_layers)]
    out = run(Session(lm, batch, batch_size=None, out_device=lm.device), writes,
              logits="all" if all_positions else "last").logits
    assert out.shape[0] == n
    return out.detach().float().cpu()


def setting_key(arch, ablation: Ablation) -> tuple:
    """What ``ablation`` does, whatever its label and group names: the sites it keeps (``None``:
    every site) and those it ablates, as sorted ``(position key, layer, head)``; every setting that
    ablates nothing has one key. Settings with equal keys give equal evaluations."""
    if ablation.ablates_nothing(arch):
        return ("nothing ablated",)

    def sites(c: Optional[Circuit]) -> Optional[tuple]:
        if c is None:
            return None
        return tuple(sorted({(c.positions[g], int(layer), int(h)) for g in c.group_names for layer, h in c.groups[g]}))

    return sites(ablation.keep), sites(ablation.ablate) or ()


def _digest(tensors: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        v = tensors[k]
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().contiguous()
            h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
            h.update(v.numpy().tobytes())
    return h.hexdigest()


def evaluate(lm, prompts, means: Optional[MeanActivations], ablations: Sequence[Ablation], *,
             batch_size: int = 32, progress: bool = True, check_model: bool = True,
             memo: Optional[dict] = None, cached: bool = True) -> list[Evaluation]:
    """Accuracy of ``lm`` on ``prompts`` under each of ``ablations``, batched across settings.

    Rows ``(setting, prompt)`` are run ``batch_size`` at a time, each row with its own keep-mask,
    so many small settings (random circuits, pairwise ablations) share traces. Settings that
    ablate the same sites (:func:`setting_key`; e.g. F(M) asked twice, or two pairwise ablations
    naming one head twice) are run once.

    Args:
        lm: the model evaluated (a circuit may come from another model of the same architecture).
        prompts: evaluation prompt records or an encoded batch (its ``target`` is the label).
        means: ``lm``'s own :class:`MeanActivations` (may be None if nothing is ablated).
        ablations: the settings.
        memo: a dict that keeps every evaluation made with it, keyed by the model's name, a digest
            of the encoded prompts and of the means, and the setting; a later call given the same
            dict reuses them (e.g. F(M) for faithfulness, then necessity, then the shortfall).
            Share one dict only while the models' weights stay as they are.
        cached: let the runs share their first positions and blocks with the run with nothing,
            or every head, ablated (:meth:`~entity_tracking.intervene.patching.Session.predict_rows`:
            the same logits; False runs every position of every row, the oracle).

    Returns:
        One :class:`Evaluation` per setting, in order, each with the prompts' ``context_id``
        (:func:`context_ids`; None for records without one) as its ``clusters``.
    """
    batch = encode_for(lm, prompts)
    n = _n_examples(batch)
    if n == 0:
        raise AblationError("no evaluation prompts")
    target = batch["target"]
    if bool((target < 0).any()):
        raise AblationError(f"{int((target < 0).sum())} evaluation prompts have no target (query label absent?)")
    ablations = list(ablations)
    if not ablations:
        return []
    for ab in ablations:
        for c, what in ((ab.keep, "circuit"), (ab.ablate, "ablated set")):
            if c is not None:
                _check_circuit(lm.arch, c, batch, what)
    if any(not ab.ablates_nothing(lm.arch) for ab in ablations):
        if means is None:
            raise AblationError("these settings remove heads: pass the model's MeanActivations (compute_means)")
        means.check_fits(lm, check_model=check_model)
        _check_lengths(batch, means)
    data = _digest(batch)
    of_means = None if means is None else _digest({means.model: means.means})
    ids = []
    for ab in ablations:
        key = setting_key(lm.arch, ab)
        ids.append((lm.name, data, None if key == ("nothing ablated",) else of_means, key))
    memo = {} if memo is None else memo
    todo = list(dict.fromkeys(i for i in ids if i not in memo))
    for i, (c, p) in zip(todo, _evaluate_rows(lm, batch, means, [ablations[ids.index(i)] for i in todo],
                                              batch_size=batch_size, progress=progress, cached=cached)):
        memo[i] = (c, p)
    clusters = context_ids(prompts)
    if clusters is not None and clusters.numel() != n:
        raise AblationError(f"the batch's context_id names {clusters.numel()} prompts' contexts, it has {n} prompts")
    return [Evaluation(ab.label or f"setting {k}", memo[i][0].clone(), memo[i][1].clone(), clusters)
            for k, (ab, i) in enumerate(zip(ablations, ids))]


def _evaluate_rows(lm, batch: Mapping[str, torch.Tensor], means: Optional[MeanActivations],
                   ablations: list[Ablation], *, batch_size: int, progress: bool,
                   cached: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per setting, ``(correct [n] bool, predicted [n] long)``: every row ``(setting, prompt)`` is
    a run of the prompt with one :class:`~entity_tracking.intervene.patching.Mean` write per layer
    (its keep-mask from :func:`_row_masks`), ``batch_size`` rows at a time (see :func:`evaluate`)."""
    if not ablations:
        return []
    n = _n_examples(batch)
    a = lm.arch
    need = [not ab.ablates_nothing(a) for ab in ablations]
    mean_t = means.means.to(device=lm.device, dtype=lm.dtype) if any(need) else None
    keys = _position_keys(ablations)
    tables = _site_table(a, ablations, keys)
    seq = int(batch["input_ids"].shape[1])
    setting = torch.arange(len(ablations)).repeat_interleave(n)
    prompt = torch.arange(n).repeat(len(ablations))

    def ablated(rows: torch.Tensor) -> list[Mean]:  # the rows' settings, each head kept or mean-ablated
        if not any(need[int(c)] for c in setting[rows].unique()):
            return []
        keep = _row_masks(a, batch, ablations, keys, tables, setting[rows], prompt[rows], seq)
        return [Mean(layer, keep[layer], mean_t[layer]) for layer in range(a.n_layers)]

    def everything(prompts: torch.Tensor) -> list[Mean]:  # every head ablated at every position
        nothing = torch.zeros(len(prompts), seq, a.n_heads, dtype=torch.bool, device=lm.device)
        return [Mean(layer, nothing, mean_t[layer]) for layer in range(a.n_layers)]

    session = Session(lm, batch, batch_size=batch_size, cached=cached, out_device=lm.device, progress=progress,
                      desc=f"evaluate ({lm.name}, {len(ablations)} settings)")
    predicted = session.predict_rows(prompt, ablated, like=[everything] if mean_t is not None else [])
    correct = predicted == batch["target"][prompt]
    return [(correct[i * n:(i + 1) * n].clone(), predicted[i * n:(i + 1) * n].clone()) for i in range(len(ablations))]


def model_accuracy(lm, prompts, **kw) -> Evaluation:
    """F(M): accuracy of ``lm`` on ``prompts`` with nothing ablated (no means needed)."""
    return evaluate(lm, prompts, None, [Ablation(label="F(M)")], **kw)[0]


def circuit_performance(lm, prompts, means: MeanActivations, circuit: Circuit, **kw) -> Evaluation:
    """F(C): accuracy of ``lm`` with everything outside ``circuit`` mean-ablated."""
    return evaluate(lm, prompts, means, [Ablation(keep=circuit, label="F(C)")], **kw)[0]


# --------------------------------------------------------------------------------------------
# Random circuits
# --------------------------------------------------------------------------------------------


def _decode(flat: torch.Tensor, n_heads: int) -> list[Head]:
    """Flat index over layer x head -> ``(layer, head)``: ``divmod(i, n_heads)``. (The reference
    divided by the number of layers, which is only right for square models.)"""
    return [(int(i) // n_heads, int(i) % n_heads) for i in flat]


def random_circuit(arch, like: Circuit | Mapping[str, int], seed: int = 0, model: str = "",
                   exclude: Iterable[Head] = ()) -> Circuit:
    """A circuit with the group sizes of ``like``, heads drawn uniformly without replacement
    (within a group) from all ``n_layers x n_heads`` heads but ``exclude`` (e.g. a found
    circuit's, for a baseline of heads *outside* it); positions as ``like``'s."""
    names = like.group_names if isinstance(like, Circuit) else GROUPS + tuple(g for g in EXTENSION_GROUPS if g in like)
    sizes = {g: len(like.groups[g]) if isinstance(like, Circuit) else int(like.get(g, 0)) for g in names}
    positions = dict(like.positions) if isinstance(like, Circuit) else None
    excluded = set()
    for layer, head in exclude:
        arch.check_head(int(head), arch.n_heads, "query")
        excluded.add(arch.layer_index(int(layer)) * arch.n_heads + int(head))
    pool = torch.tensor([i for i in range(arch.n_layers * arch.n_heads) if i not in excluded], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    groups = {}
    for g in names:  # the paper's groups first: an extended circuit's draws share theirs with the paper's
        if not 0 <= sizes[g] <= len(pool):
            raise AblationError(f"group {g}: cannot draw {sizes[g]} distinct heads from {len(pool)}"
                                f"{f' ({len(excluded)} excluded)' if excluded else ''}")
        groups[g] = _decode(pool[torch.randperm(len(pool), generator=gen)[: sizes[g]]], arch.n_heads)
    c = Circuit(model or f"random-{seed}", groups, meta={"kind": "random", "seed": seed})
    if positions:
        c.positions.update(positions)
    return c


def random_circuits(arch, like: Circuit | Mapping[str, int], n: int = 10, seed: int = 0,
                    exclude: Iterable[Head] = ()) -> list[Circuit]:
    """``n`` random circuits (:func:`random_circuit`), seeds derived from ``seed``."""
    exclude = list(exclude)
    gen = torch.Generator().manual_seed(seed)
    seeds = torch.randint(2**31 - 1, (n,), generator=gen).tolist()
    return [random_circuit(arch, like, s, model=f"random-{seed}-{i}", exclude=exclude) for i, s in enumerate(seeds)]


# --------------------------------------------------------------------------------------------
# Faithfulness
# --------------------------------------------------------------------------------------------


@dataclass
class FaithfulnessResult:
    """F(M), F(C), F(∅) and random-circuit accuracies of one circuit evaluated in one model."""

    model: str
    circuit: Circuit
    full: Evaluation
    circuit_eval: Evaluation
    ablated: Evaluation
    random: list[Evaluation]
    random_circuits: list[Circuit]

    @property
    def score(self) -> float:
        """The faithfulness F(C)/F(M) (NaN when F(M) = 0), as :attr:`CompletenessResult.score` is
        the completeness; :func:`faithfulness` is the function that measures it. The paper rounds
        both accuracies to 2 decimals first."""
        m = self.full.accuracy
        return self.circuit_eval.accuracy / m if m > 0 else float("nan")

    @property
    def random_accuracy(self) -> float:
        return sum(e.accuracy for e in self.random) / len(self.random) if self.random else float("nan")

    @property
    def clusters(self) -> Optional[torch.Tensor]:
        """The evaluation prompts' context ids (:func:`shared_clusters`; None: prompts resampled)."""
        return shared_clusters([self.full, self.circuit_eval, self.ablated, *self.random])

    def summary(self, *, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Estimate]:
        """Every number with a bootstrap interval over the evaluation contexts (paired: the same
        resampled contexts for every setting; over prompts when they carry no ``context_id``).

        With random circuits, ``random_accuracy`` and ``random_faithfulness`` (of their mean) and
        ``faithfulness_over_random``: faithfulness minus the random circuits' faithfulness, the
        paired baseline comparison, resampling the random draws too (:func:`draws_mean`)."""
        kw = dict(n_resamples=n_resamples, seed=seed, level=level, clusters=self.clusters)
        vec = torch.stack([self.full.correct, self.circuit_eval.correct, self.ablated.correct]
                          + [e.correct for e in self.random])
        out = {
            "full_accuracy": bootstrap(vec, lambda a: a[0], **kw),
            "circuit_accuracy": bootstrap(vec, lambda a: a[1], **kw),
            "ablated_accuracy": bootstrap(vec, lambda a: a[2], **kw),
            "faithfulness": bootstrap(vec, lambda a: ratio(a[1], a[0]), **kw),
        }
        if self.random:
            out["random_accuracy"] = bootstrap(vec, lambda a: a[3:].mean(0), **kw)
            out["random_faithfulness"] = bootstrap(vec, lambda a: ratio(a[3:].mean(0), a[0]), **kw)
            rand = draws_mean(slice(3, None), seed + 1)
            out["faithfulness_over_random"] = bootstrap(vec, lambda a: ratio(a[1], a[0]) - ratio(rand(a), a[0]), **kw)
        return out

    def to_json(self, **kw) -> dict[str, Any]:
        return {
            "model": self.model,
            "circuit_model": self.circuit.model,
            "group_sizes": {g: len(self.circuit.groups[g]) for g in self.circuit.group_names},
            "n_examples": self.full.n,
            "n_random": len(self.random),
            "summary": {k: e.as_dict() for k, e in self.summary(**kw).items()},
            "random_accuracies": [e.accuracy for e in self.random],
        }


def faithfulness(lm, prompts, means: MeanActivations, circuit: Circuit, *, n_random: int = 10, seed: int = 0,
                 batch_size: int = 32, progress: bool = True, check_model: bool = True,
                 memo: Optional[dict] = None) -> FaithfulnessResult:
    """Faithfulness of ``circuit`` in ``lm``, with ``n_random`` random circuits of the same
    group sizes as the baseline (paper §3 used 10). ``circuit`` may come from another model of
    the same architecture; ``means`` must be ``lm``'s own. ``memo``: see :func:`evaluate`."""
    if n_random < 0:
        raise AblationError("n_random must be >= 0")
    rand = random_circuits(lm.arch, circuit, n_random, seed) if n_random else []
    settings = [Ablation(label="F(M)"), Ablation(keep=circuit, label="F(C)"),
                Ablation(keep=empty_circuit(), label="F(empty)")]
    settings += [Ablation(keep=r, label=f"F(random {i})") for i, r in enumerate(rand)]
    evs = evaluate(lm, prompts, means, settings, batch_size=batch_size, progress=progress, check_model=check_model,
                   memo=memo)
    return FaithfulnessResult(lm.name, circuit, evs[0], evs[1], evs[2], evs[3:], rand)


# --------------------------------------------------------------------------------------------
# Necessity
# --------------------------------------------------------------------------------------------


@dataclass
class NecessityResult:
    """Accuracy with one group's heads mean-ablated everywhere, against as many random heads.

    ``random_any`` draws from every head of the model, ``random_outside`` from the heads outside
    the circuit (empty when too few remain)."""

    model: str
    group: str
    heads: list[Head]
    full: Evaluation
    ablated: Evaluation
    random_any: list[Evaluation]
    random_outside: list[Evaluation]

    @staticmethod
    def _mean(evs: Sequence[Evaluation]) -> float:
        return sum(e.accuracy for e in evs) / len(evs) if evs else float("nan")

    @property
    def drop(self) -> float:
        """Accuracy lost to ablating the group."""
        return self.full.accuracy - self.ablated.accuracy

    def random_drop(self, baseline: str = "outside") -> float:
        """Mean accuracy lost to as many random heads (``"outside"`` the circuit, or ``"any"``)."""
        if baseline not in ("outside", "any"):
            raise ValueError(f"baseline must be 'outside' or 'any', got {baseline!r}")
        return self.full.accuracy - self._mean(self.random_outside if baseline == "outside" else self.random_any)

    def effect(self, baseline: str = "outside", *, n_resamples: int = 1000, seed: int = 0,
               level: float = 0.95) -> Estimate:
        """The effect size ``drop - random_drop(baseline)`` (accuracy lost to the group beyond
        what as many random heads lose) with a bootstrap interval over contexts (paired: the
        same resampled contexts for every setting; prompts, without ``context_id``) and over the
        random draws. NaN when the baseline could not be drawn.

        With ``d`` draws the statistic of one resample is the mean accuracy of ``d`` draws
        sampled with replacement minus the group-ablated accuracy."""
        draws = self.random_outside if baseline == "outside" else self.random_any if baseline == "any" else None
        if draws is None:
            raise ValueError(f"baseline must be 'outside' or 'any', got {baseline!r}")
        if not draws:
            return Estimate(float("nan"), float("nan"), float("nan"), level, self.full.n)
        d = len(draws)
        gen = torch.Generator().manual_seed(seed + 1)

        def stat(acc: torch.Tensor) -> torch.Tensor:  # acc [1 + d, R]
            if acc.shape[1] == 1:  # the point estimate: every draw once
                return acc[1:].mean(0) - acc[0]
            pick = torch.randint(d, (d, acc.shape[1]), generator=gen) + 1
            return acc.gather(0, pick).mean(0) - acc[0]

        vec = torch.stack([self.ablated.correct] + [e.correct for e in draws])
        return bootstrap(vec, stat, n_resamples=n_resamples, seed=seed, level=level,
                         clusters=shared_clusters([self.ablated, *draws]))

    def row(self) -> dict[str, Any]:
        """One table row (the circuit chapter's)."""
        return {"model": self.model, "group": self.group, "heads": len(self.heads),
                "full model": self.full.accuracy, "group ablated": self.ablated.accuracy,
                "random heads outside the circuit (mean)": self._mean(self.random_outside),
                "random heads of the whole model (mean)": self._mean(self.random_any)}

    def to_frame(self):
        """The measurements as a one-row table (pandas), for display."""
        import pandas as pd

        return pd.DataFrame([self.row()])

    def to_json(self) -> dict[str, Any]:
        """The measurements (:func:`entity_tracking.methods.verdicts.necessity_json` adds the verdicts)."""
        return {**self.row(), "head_list": [list(h) for h in self.heads],
                "random_outside_accuracies": [e.accuracy for e in self.random_outside],
                "random_any_accuracies": [e.accuracy for e in self.random_any],
                "n_examples": self.full.n}


def necessity(lm, prompts, means: MeanActivations, circuit: Circuit, group: str = "value_fetcher", *,
              n_random: int = 10, seed: int = 0, batch_size: int = 32, progress: bool = True,
              memo: Optional[dict] = None) -> NecessityResult:
    """Mean-ablate ``circuit``'s ``group`` at every position and, as baselines, ``n_random``
    draws of as many heads from the whole model and from the heads outside ``circuit``.
    ``memo``: see :func:`evaluate`."""
    if group not in circuit.group_names:
        raise AblationError(f"unknown group {group!r}; groups are {list(circuit.group_names)}")
    heads = list(circuit.groups[group])
    if not heads:
        raise AblationError(f"circuit of {circuit.model!r} has no {group} heads to ablate")
    if n_random < 1:
        raise AblationError("n_random must be >= 1")
    target = Circuit(circuit.model, {group: heads}, positions={group: ALL_POSITIONS})
    inside = {tuple(h) for g in circuit.group_names for h in circuit.groups[g]}
    rand_any = random_circuits(lm.arch, target, n_random, seed)
    outside_pool = lm.arch.n_layers * lm.arch.n_heads - len(inside)
    rand_out = random_circuits(lm.arch, target, n_random, seed, exclude=inside) if outside_pool >= len(heads) else []
    settings = [Ablation(label="F(M)"), Ablation(ablate=target, label=f"{group} ablated")]
    settings += [Ablation(ablate=r, label="random (any)") for r in rand_any]
    settings += [Ablation(ablate=r, label="random (outside)") for r in rand_out]
    evs = evaluate(lm, prompts, means, settings, batch_size=batch_size, progress=progress, memo=memo)
    k = 2 + len(rand_any)
    return NecessityResult(getattr(lm, "name", circuit.model), group, heads, evs[0], evs[1], evs[2:k], evs[k:])


# --------------------------------------------------------------------------------------------
# Completeness
# --------------------------------------------------------------------------------------------


@dataclass
class CompletenessDraw:
    """One removed set K with F(C\\K) and F(M\\K)."""

    removed: Circuit
    circuit_minus: Evaluation
    model_minus: Evaluation

    @property
    def score(self) -> float:
        return abs(self.circuit_minus.accuracy - self.model_minus.accuracy)


@dataclass
class CompletenessResult:
    """Completeness of one circuit in one model: random subsets K and whole groups."""

    model: str
    circuit: Circuit
    draws: list[CompletenessDraw]
    groups: dict[str, CompletenessDraw]
    p: float = 0.5

    @property
    def score(self) -> float:
        """Mean over random draws of |F(C\\K) - F(M\\K)|."""
        return sum(d.score for d in self.draws) / len(self.draws) if self.draws else float("nan")

    def draw_std(self) -> dict[str, float]:
        """Standard deviation across random draws (how the paper reports ±)."""
        def std(xs):
            xs = torch.tensor(xs, dtype=torch.float64)
            return float(xs.std(unbiased=False)) if len(xs) else float("nan")

        return {"circuit_minus": std([d.circuit_minus.accuracy for d in self.draws]),
                "model_minus": std([d.model_minus.accuracy for d in self.draws]),
                "score": std([d.score for d in self.draws])}

    @property
    def clusters(self) -> Optional[torch.Tensor]:
        """The evaluation prompts' context ids (:func:`shared_clusters`; None: prompts resampled)."""
        return shared_clusters([e for d in [*self.draws, *self.groups.values()]
                                for e in (d.circuit_minus, d.model_minus)])

    def summary(self, *, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Estimate]:
        """Per random draw (means over draws) and per group, F(C\\K), F(M\\K) and their gap, each a
        paired bootstrap over the evaluation contexts (prompts, without ``context_id``)."""
        kw = dict(n_resamples=n_resamples, seed=seed, level=level, clusters=self.clusters)
        out: dict[str, Estimate] = {}
        if self.draws:
            c = torch.stack([d.circuit_minus.correct for d in self.draws])
            m = torch.stack([d.model_minus.correct for d in self.draws])
            vec = torch.cat([c, m])
            k = len(self.draws)
            out["random_circuit_minus"] = bootstrap(vec, lambda a: a[:k].mean(0), **kw)
            out["random_model_minus"] = bootstrap(vec, lambda a: a[k:].mean(0), **kw)
            out["random_score"] = bootstrap(vec, lambda a: (a[:k] - a[k:]).abs().mean(0), **kw)
        for g, d in self.groups.items():
            vec = torch.stack([d.circuit_minus.correct, d.model_minus.correct])
            out[f"{g}_circuit_minus"] = bootstrap(vec, lambda a: a[0], **kw)
            out[f"{g}_model_minus"] = bootstrap(vec, lambda a: a[1], **kw)
            out[f"{g}_score"] = bootstrap(vec, lambda a: (a[0] - a[1]).abs(), **kw)
        return out

    def to_frame(self):
        """Every removed set K as a row, for display (pandas): ``K`` (``"random K"`` for each random
        draw, else the group's label), F(C\\K), F(M\\K) and the gap ``score``."""
        import pandas as pd

        named = [("random K", d) for d in self.draws] + [(GROUP_LABELS.get(g, g), d) for g, d in self.groups.items()]
        return pd.DataFrame([{"K": k, "F(C\\K)": d.circuit_minus.accuracy, "F(M\\K)": d.model_minus.accuracy,
                              "score": d.score} for k, d in named], columns=["K", "F(C\\K)", "F(M\\K)", "score"])

    def scores_row(self, **kw) -> dict[str, Estimate]:
        """The completeness scores with their intervals (:meth:`summary`), as one table row: the
        random draws' mean (``"random K"``) and each group's, under its label."""
        est = self.summary(**kw)
        row = {"random K": est["random_score"]} if "random_score" in est else {}
        return {**row, **{GROUP_LABELS.get(g, g): est[f"{g}_score"] for g in self.groups}}

    def to_json(self, **kw) -> dict[str, Any]:
        return {
            "model": self.model,
            "circuit_model": self.circuit.model,
            "p": self.p,
            "n_draws": len(self.draws),
            "summary": {k: e.as_dict() for k, e in self.summary(**kw).items()},
            "draw_std": self.draw_std(),
            "draws": [{"removed": {g: [list(h) for h in d.removed.groups[g]] for g in d.removed.group_names},
                       "circuit_minus": d.circuit_minus.accuracy, "model_minus": d.model_minus.accuracy}
                      for d in self.draws],
        }


def completeness(lm, prompts, means: MeanActivations, circuit: Circuit, *, n_draws: int = 10, p: float = 0.5,
                 seed: int = 0, by_group: bool = True, batch_size: int = 32, progress: bool = True,
                 check_model: bool = True, memo: Optional[dict] = None) -> CompletenessResult:
    """|F(C\\K) - F(M\\K)| for ``n_draws`` random K (each circuit site in K with probability
    ``p``, seeded) and, with ``by_group``, K = each non-empty group.

    F(C\\K) keeps C's sites minus K's; F(M\\K) ablates only K's sites (each head at its group's
    position), everything else running as in the full model. ``memo``: see :func:`evaluate`.
    """
    if not 0 <= p <= 1:
        raise AblationError(f"p must be in [0, 1], got {p}")
    sites = _sites(circuit)
    gen = torch.Generator().manual_seed(seed)
    removed = []
    for i in range(n_draws):
        pick = torch.rand(len(sites), generator=gen) < p
        removed.append(_circuit_of_sites(circuit, [s for s, t in zip(sites, pick.tolist()) if t],
                                         model=f"K{i}"))
    group_sets = {}
    if by_group:
        for g in circuit.group_names:
            if circuit.groups[g]:
                group_sets[g] = Circuit(f"K={g}", {g: list(circuit.groups[g])}, dict(circuit.positions))
    settings = []
    for k in list(removed) + list(group_sets.values()):
        settings += [Ablation(keep=circuit, ablate=k, label=f"F(C\\{k.model})"),
                     Ablation(ablate=k, label=f"F(M\\{k.model})")]
    evs = evaluate(lm, prompts, means, settings, batch_size=batch_size, progress=progress, check_model=check_model,
                   memo=memo)
    pairs = [CompletenessDraw(k, evs[2 * i], evs[2 * i + 1]) for i, k in enumerate(list(removed) + list(group_sets.values()))]
    return CompletenessResult(lm.name, circuit, pairs[: len(removed)],
                              dict(zip(group_sets, pairs[len(removed):])), p)


# --------------------------------------------------------------------------------------------
# Minimality
# --------------------------------------------------------------------------------------------


@dataclass
class HeadMinimality:
    """Minimality of one head ``v`` of ``group``: K, F(C\\K) (``before``) and F(C\\(K∪{v})) (``after``)."""

    group: str
    head: Head
    removed: list[Head]
    before: Evaluation
    after: Evaluation
    threshold: float

    @property
    def score(self) -> float:
        """F(C\\K)/F(C\\(K∪{v})) - 1; +inf if only ``after`` is 0, 0 if both are."""
        b, a = self.before.accuracy, self.after.accuracy
        if a == 0:
            return float("inf") if b > 0 else 0.0
        return b / a - 1

    @property
    def kept(self) -> bool:
        return self.score >= self.threshold

    def estimate(self, **kw) -> Estimate:
        """The score with a paired bootstrap interval over contexts (prompts, without ``context_id``)."""
        vec = torch.stack([self.before.correct, self.after.correct])
        return bootstrap(vec, lambda x: ratio(x[0], x[1]) - 1, clusters=shared_clusters([self.before, self.after]),
                         **kw)


@dataclass
class MinimalityResult:
    """Per-head minimality scores, the circuit pruned to the heads that pass, and F(C) of the
    unpruned circuit on the same prompts (``circuit_accuracy``)."""

    circuit: Circuit
    pruned: Circuit
    heads: list[HeadMinimality]
    pair_accuracy: dict[str, torch.Tensor]
    top_fraction: float
    threshold: float
    circuit_accuracy: Evaluation

    @property
    def scores(self) -> dict[tuple[str, Head], float]:
        return {(h.group, h.head): h.score for h in self.heads}

    def summary(self, *, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[tuple[str, Head], Estimate]:
        return {(h.group, h.head): h.estimate(n_resamples=n_resamples, seed=seed, level=level) for h in self.heads}

    def to_json(self) -> dict[str, Any]:
        return {
            "top_fraction": self.top_fraction,
            "threshold": self.threshold,
            "heads": [{"group": h.group, "head": list(h.head), "removed": [list(x) for x in h.removed],
                       "before": h.before.accuracy, "after": h.after.accuracy,
                       "score": h.score, "kept": h.kept} for h in self.heads],
            "circuit_accuracy": self.circuit_accuracy.accuracy,
            "n_examples": self.circuit_accuracy.n,
            "pruned": self.pruned.to_json(),
        }


def minimality(lm, prompts, means: MeanActivations, circuit: Circuit, *, top_fraction: float = 0.3,
               threshold: float = 0.01, groups: Optional[Sequence[str]] = None, batch_size: int = 32,
               progress: bool = True, check_model: bool = True, memo: Optional[dict] = None) -> MinimalityResult:
    """Score every head of ``circuit`` (paper §2) and prune the ones below ``threshold``.

    For each group g (default: all non-empty) with heads ``H``:

    1. pairwise ablations: ``pair[u, v] = F(C\\{u, v})`` for all ``u, v`` in ``H`` (``pair[u, u]
       = F(C\\{u})``), one evaluation per unordered pair;
    2. for head ``v``, rank the other heads ``u`` by the drop ``pair[u, u] - pair[u, v]`` (how
       much removing ``v`` costs once ``u`` is gone) and take as K the top
       ``ceil(top_fraction * |H|)`` with a positive drop;
    3. ``score(v) = F(C\\K) / F(C\\(K∪{v})) - 1``; ``v`` is kept if ``score >= threshold``.

    Equal K (and F(C) itself, when K is empty) are evaluated once; ``memo``: see :func:`evaluate`.

    Returns:
        :class:`MinimalityResult`: per-head :class:`HeadMinimality` (scores, K, evaluations),
        ``pair_accuracy[g]`` ``[|H|, |H|]`` and ``pruned`` (groups not scored stay as they were).
    """
    if not 0 <= top_fraction <= 1:
        raise AblationError(f"top_fraction must be in [0, 1], got {top_fraction}")
    unknown = set(groups or ()) - set(circuit.group_names)
    if unknown:
        raise AblationError(f"unknown groups {sorted(unknown)}; expected some of {circuit.group_names}")
    todo = [g for g in (groups or circuit.group_names) if circuit.groups[g]]
    kw = dict(batch_size=batch_size, progress=progress, check_model=check_model, memo=memo)

    def minus(g: str, heads: Iterable[Head], label: str) -> Ablation:
        return Ablation(keep=circuit, ablate=Circuit("K", {g: list(heads)}, dict(circuit.positions)), label=label)

    # 1. pairwise ablations, all groups in one batched evaluation (first: F(C) itself)
    pair_settings, index = [Ablation(keep=circuit, label="F(C)")], []
    for g in todo:
        hs = circuit.groups[g]
        for i in range(len(hs)):
            for j in range(i, len(hs)):
                pair_settings.append(minus(g, list(dict.fromkeys([hs[i], hs[j]])), f"F(C\\{{{hs[i]},{hs[j]}}})"))
                index.append((g, i, j))
    f_c, *evs = evaluate(lm, prompts, means, pair_settings, **kw)
    pair = {g: torch.zeros(len(circuit.groups[g]), len(circuit.groups[g])) for g in todo}
    for (g, i, j), e in zip(index, evs):
        pair[g][i, j] = pair[g][j, i] = e.accuracy

    # 2. K per head, then 3. before/after in one batched evaluation
    plan: list[tuple[str, Head, list[Head]]] = []
    for g in todo:
        hs = circuit.groups[g]
        k = math.ceil(top_fraction * len(hs))
        for v in range(len(hs)):
            drops = [(float(pair[g][u, u] - pair[g][u, v]), u) for u in range(len(hs)) if u != v]
            drops.sort(key=lambda x: (-x[0], x[1]))
            plan.append((g, hs[v], [hs[u] for d, u in drops[:k] if d > 0]))
    settings = []
    for g, v, K in plan:
        settings += [minus(g, K, f"F(C\\K_{v})"), minus(g, list(K) + [v], f"F(C\\K_{v}+{v})")]
    evs = evaluate(lm, prompts, means, settings, **kw)
    heads = [HeadMinimality(g, v, K, evs[2 * i], evs[2 * i + 1], threshold) for i, (g, v, K) in enumerate(plan)]

    kept = {(h.group, h.head) for h in heads if h.kept}
    new_groups = {g: [h for h in circuit.groups[g] if g not in todo or (g, h) in kept] for g in circuit.group_names}
    meta = dict(circuit.meta)
    meta["minimality"] = {"top_fraction": top_fraction, "threshold": threshold, "groups": todo,
                          "n_examples": f_c.n}
    pruned = Circuit(circuit.model, new_groups, dict(circuit.positions), dict(circuit.scores), meta)
    return MinimalityResult(circuit, pruned, heads, pair, top_fraction, threshold, f_c)


def pruner(lm, prompts, means: MeanActivations, **kw) -> Callable[[Circuit], Circuit]:
    """``circuit -> minimality(lm, prompts, means, circuit, **kw).pruned``: the ``prune``
    argument of :func:`entity_tracking.methods.path_patching.discover_circuit`."""
    return lambda circuit: minimality(lm, prompts, means, circuit, **kw).pruned
