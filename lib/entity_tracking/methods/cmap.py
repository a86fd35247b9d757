"""Cross-Model Activation Patching (CMAP): which of a fine-tuned model's heads carry its gain.

**The method** (paper-methods §5). Two models of one architecture -- a base model and a
fine-tune of it -- read the *same* prompt. CMAP runs the base model but overwrites some of its
activations with the fine-tuned model's activations at the same positions; if the base model's
accuracy then rises to the fine-tuned model's, the patched components carry the improvement.
There is no counterfactual prompt: the "source" is the other model.

* **Output CMAP** patches per-head outputs: the fine-tuned model's head output ``z`` (the
  o_proj input, before ``W_O``) replaces the base model's for the chosen heads, each at its
  circuit group's position (Value Fetchers and Position Transmitters at the last token, Position
  Detectors at the query label, Structure Readers at the query label's occurrence in the
  context). The patched vectors then pass through the **base** model's own output projection
  and everything after it.
* **Input CMAP** patches what a head reads instead of what it writes: the fine-tuned model's
  query (``q_proj`` output) of the head at its position ``pos``, and/or its keys and values
  (``k_proj``/``v_proj`` outputs) at earlier positions. Two variants differ in which key/value
  positions are patched and in which head outputs are afterwards put back to the base model's:

  - **The paper's reference code** (``kv_positions="before"``, ``restore="before_last"``, the
    default): keys and values at positions ``[:, :pos]``, strictly *before* the head's own
    position (its own key/value stays the base model's); then, in every layer, every head's
    output at every position but the last (the o_proj input at ``[:, :-1]``,
    ``[batch, pos, head, d_head]``) is restored to the base model's value, and the last position
    is left as the patched run computed it. Restoring only the patched layers gives the same
    numbers, and this module does that: nothing at a position before the last changes in a layer
    that holds no patch (a position only reads itself and earlier positions, and the patched
    layers' outputs there are restored), so the restore is an identity elsewhere. A consequence:
    a patch of a head whose position is *before* the last (a Position Detector at the query label,
    a Structure Reader) acts only through the keys/values it contributes to the **last**
    position, read by the heads of that layer there (the head itself and, under grouped-query
    attention, the query heads sharing its key/value head); its own output at ``pos`` is restored,
    so a query-only patch there does nothing.
  - **Ours** (``kv_positions="through"``, ``restore="others"``): keys and values at positions
    ``[:, :pos+1]``, the head's own position included (every position its query attends to);
    then only the patched layers' head outputs are restored, everywhere except each patched
    head at its own position (so under grouped-query attention the other query heads that share
    a patched key/value head are restored too, at every position). Only the chosen head's output
    at its position changes, and it carries into later layers at that position, whatever the
    position is.

  With q, k and v all patched, **ours** makes the head compute exactly the fine-tuned model's
  output at its position and keeps nothing else, so input CMAP of ``"qkv"`` equals output CMAP
  of the same head (a test checks this). Under the reference it does not: the head's own
  key/value stays the base model's (its query attends to it), a head before the last position
  has its output restored, and the heads that share the patched key/value at the last position
  keep what they read.

**Against random head sets.** A share of the gain means little alone: patching a dozen of a small
model's heads at the last token may carry the gain whichever heads they are.
:func:`random_baseline` patches the full circuit beside random head sets of the same sizes at the
same positions (:func:`random_head_sets`, seeded) from one recording of the fine-tuned model, with
the shares' intervals over prompts (contexts) and draws and the circuit's paired excess over the
random sets, and each circuit head alone (:func:`per_head_recovery`): which heads carry the gain.

Query and key patches are written before rotary embeddings, which are the same in both models.
For a family with per-head query/key norms (Gemma3) the base model's norm weights then apply to
the fine-tuned query/key, so ``"qkv"`` no longer equals output CMAP there.
"""

from __future__ import annotations

import collections.abc
from collections import defaultdict
from typing import Any, Callable, Iterable, Literal, Mapping, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from ..intervene.patching import (
    HeadPatch,
    Session,
    as_batch,
    check_positions,
    check_unpadded,
    heads_by_layer,
    last_logits,
    run,
    site_heads,
)
from ..intervene.stats import Estimate, bootstrap
from ..schema import GROUPS, Head, position_column
from ..task.encoding import position_keys, positions_at
from . import paper
from .circuit import Circuit

__all__ = ["BASE_ALONE", "CMAPError", "FINETUNED_ALONE", "FULL_CIRCUIT", "HeadSet", "check_compatible", "circuit_source",
           "gain_recovery", "head_sets", "head_sets_for", "heads_by_position", "input_cmap", "input_sets", "output_cmap", "OutputCMAP", "paper_accuracy",
           "paper_share", "per_head_recovery", "per_head_table", "random_baseline", "random_baseline_table",
           "random_head_sets", "row_key"]

INPUT_SITES = ("q", "k", "v")
#: ``input_cmap(kv_positions=...)``: keys/values strictly before the head's position (the paper's
#: reference code) or up to and including it (ours).
KV_POSITIONS = ("before", "through")
#: ``input_cmap(restore=...)``: every head output before the last position goes back to the
#: base model's (the reference code), or every head output of the patched layers but the patched
#: heads at their own positions (ours).
RESTORES = ("before_last", "others")


class CMAPError(ValueError):
    """Two models cannot be patched into each other (different head shapes), or bad input."""


def check_compatible(base, finetuned) -> None:
    """Raise :class:`CMAPError` naming the mismatch unless both models share their head geometry."""
    a, b = base.arch, finetuned.arch
    fields = ("n_layers", "n_heads", "n_kv_heads", "d_head", "d_model")
    diff = [f"{f}: {getattr(a, f)} vs {getattr(b, f)}" for f in fields if getattr(a, f) != getattr(b, f)]
    if diff:
        name_a = getattr(getattr(base, "spec", None), "name", "base")
        name_b = getattr(getattr(finetuned, "spec", None), "name", "fine-tuned")
        raise CMAPError(f"CMAP needs two models with the same head shapes; '{name_a}' vs '{name_b}' differ in " + "; ".join(diff))


def heads_by_position(circuit: Circuit, groups: Iterable[str] = GROUPS) -> dict[str, list[Head]]:
    """The heads of ``groups`` keyed by the position each acts at (``"last"``, ``"query_label"``,
    ``"prev_query_label"``), deduplicated."""
    out: dict[str, list[Head]] = defaultdict(list)
    for g in groups:
        if g not in circuit.groups:
            raise CMAPError(f"unknown circuit group '{g}' (groups: {list(GROUPS)})")
        for h in circuit.groups[g]:
            if h not in out[circuit.positions[g]]:
                out[circuit.positions[g]].append(h)
    return dict(out)


def _positions(batch: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if position_column(key) not in batch:
        raise CMAPError(f"the batch has no positions for '{key}' (its position keys: {position_keys(batch)})")
    return positions_at(batch, key)


def output_cmap(
    base,
    finetuned,
    batch: Mapping[str, torch.Tensor],
    heads: Mapping[str, Sequence[Head]],
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> torch.Tensor:
    """Base-model logits ``[batch, vocab]`` (last position) with the fine-tuned model's head outputs
    patched in.

    Args:
        base, finetuned: :class:`~entity_tracking.load.LoadedModel` s of one architecture.
        batch: an :func:`~entity_tracking.task.encode_prompts` batch (both models share the tokenizer).
        heads: ``{position key: [(layer, head), ...]}``, e.g. from :func:`heads_by_position`;
            ``{"all": ...}`` patches those heads at every position.
    """
    check_compatible(base, finetuned)
    b = as_batch(batch)
    patches: list[HeadPatch] = []
    for key, hs in heads.items():
        layers = heads_by_layer(hs)
        if not layers:
            continue
        pos = None if key == "all" else check_positions(_positions(b, key), b["input_ids"].shape[1], f"{key} position")
        cache = run(Session(finetuned, b, batch_size=batch_size, progress=progress, desc="caching fine-tuned heads"),
                    reads=[("z", l) for l in layers], positions=pos, logits=None).cache
        for layer, hl in layers.items():
            patches.append(HeadPatch("z", layer, hl, cache["z", layer][:, :, hl], pos))
    return run(Session(base, b, batch_size=batch_size, progress=progress, desc="output CMAP"), patches).logits


class OutputCMAP:
    """Output CMAP of many head sets from one fine-tuned model into one base model, on one batch:
    the numbers of :func:`output_cmap` for each set, from fewer forward passes.

    :func:`output_cmap` runs the fine-tuned model for every set; here it runs once, recording
    every head of every layer at each position key the sets will name (its last-position
    ``finetuned_logits`` come with it), and the base model runs every set in one cached
    :class:`~entity_tracking.intervene.patching.Session` of the batch (``session``, made here
    unless given: one session serves every fine-tuned model of one base). Sets must name
    position keys of ``keys``; ``"all"`` (every position) is :func:`output_cmap`'s alone.

    >>> patcher = OutputCMAP(lm, ft, batch, ["last", "query_label"])  # lm: the base model
    >>> heads = heads_by_position(circuit, ["value_fetcher"])
    >>> torch.allclose(patcher.logits(heads), output_cmap(lm, ft, batch, heads), atol=1e-5)
    True
    """

    def __init__(self, base, finetuned, batch: Mapping[str, torch.Tensor], keys: Iterable[str], *,
                 batch_size: int = 32, session: Optional[Session] = None, progress: bool = False):
        check_compatible(base, finetuned)
        self.base, self.batch, self.batch_size, self.progress = base, as_batch(batch), batch_size, progress
        seq = self.batch["input_ids"].shape[1]
        self.keys = list(dict.fromkeys(keys))
        if "all" in self.keys:
            raise CMAPError("OutputCMAP records the fine-tuned heads at position keys; patch 'all' with output_cmap")
        cols = [check_positions(_positions(self.batch, k), seq, f"{k} position") for k in self.keys]
        self._slices, at = {}, 0
        for k, c in zip(self.keys, cols):
            self._slices[k] = slice(at, at + c.shape[1])
            at += c.shape[1]
        self._positions = torch.cat(cols, dim=1) if cols else torch.zeros(len(self.batch["input_ids"]), 0, dtype=torch.long)
        ft = run(Session(finetuned, self.batch, batch_size=batch_size, progress=progress, desc="caching fine-tuned heads"),
                 reads=[("z", l) for l in range(finetuned.arch.n_layers)] if cols else (),
                 positions=self._positions if cols else None)
        self.finetuned_logits = ft.logits
        self._z = ft.cache
        self.session = session or Session(base, self.batch, batch_size=batch_size, cached=True, progress=progress,
                                          desc="output CMAP")

    def logits(self, heads: Mapping[str, Sequence[Head]]) -> torch.Tensor:
        """Base-model logits ``[batch, vocab]`` (last position) with the fine-tuned model's
        outputs of ``heads`` (``{position key: [(layer, head), ...]}``) patched in."""
        patches: list[HeadPatch] = []
        for key, hs in heads.items():
            if key not in self._slices:
                raise CMAPError(f"no fine-tuned heads were recorded at '{key}' (recorded: {self.keys})")
            at = self._slices[key]
            for layer, hl in heads_by_layer(hs).items():
                patches.append(HeadPatch("z", layer, hl, self._z["z", layer][:, at][:, :, hl], self._positions[:, at]))
        return run(self.session, patches).logits


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise CMAPError(f"input CMAP: {name}={value!r} is not one of {list(allowed)}")
    return value


def input_cmap(
    base,
    finetuned,
    batch: Mapping[str, torch.Tensor],
    heads: Mapping[str, Sequence[Head]],
    sites: str | Sequence[str] = "qkv",
    *,
    kv_positions: Literal["before", "through"] = "before",
    restore: Literal["before_last", "others"] = "before_last",
    batch_size: int = 32,
    progress: bool = False,
) -> torch.Tensor:
    """Base-model logits ``[batch, vocab]`` (last position) with the fine-tuned model's queries /
    keys / values of the chosen heads patched in (``sites`` any of ``"q"``, ``"k"``, ``"v"``,
    e.g. ``"qk"``).

    Args:
        base, finetuned: :class:`~entity_tracking.load.LoadedModel` s of one architecture.
        batch: an :func:`~entity_tracking.task.encode_prompts` batch. Prompts must share one
            length (no padding), since a head attends over absolute positions.
        heads: ``{position key: [(layer, head), ...]}``; each head is patched at its example's
            ``batch[f"{key}_position"] [batch]`` (call it ``pos``).
        sites: which of the head's inputs come from the fine-tuned model. The query
            (``[batch, pos, head, d_head]``) is patched at ``pos`` only; the key and value, on the
            head's key/value head (shared by a group of query heads under grouped-query
            attention), at the positions ``kv_positions`` says.
        kv_positions: ``"before"`` (the paper's reference code): positions ``[:, :pos]``, strictly
            before the head's own; ``"through"`` (ours): ``[:, :pos+1]``, its own included.
        restore: ``"before_last"`` (the reference code): every head output at every position
            before the last goes back to the base model's value (done in the patched layers only,
            which gives the same numbers; see the module docstring), so a head before the last
            position acts only through the keys/values it adds to the last position's attention;
            ``"others"`` (ours): the patched layers' head outputs go back to the base model's
            everywhere except each patched head at its own position.

    The defaults reproduce the reference code; ``kv_positions="through", restore="others"`` with
    ``sites="qkv"`` equals :func:`output_cmap` of the same heads.
    """
    check_compatible(base, finetuned)
    _check_choice("kv_positions", kv_positions, KV_POSITIONS)
    _check_choice("restore", restore, RESTORES)
    if isinstance(sites, str):
        unknown = sorted(set(sites) - set(INPUT_SITES))
    else:
        unknown = [s for s in sites if s not in INPUT_SITES]
    chosen_sites = [s for s in INPUT_SITES if s in set(sites)]
    if unknown or not chosen_sites:
        raise CMAPError(f"input CMAP needs sites among {INPUT_SITES}, got {sites!r}")
    b = as_batch(batch)
    S = check_unpadded(b, "CMAP prompts")
    B = b["input_ids"].shape[0]
    last = check_positions(b["last_position"], S, "last position")[:, 0]
    if restore == "before_last" and not bool((last == S - 1).all()):
        raise CMAPError(f"restore='before_last' leaves the last position ({S - 1}) unrestored, but the batch "
                        f"evaluates at positions {sorted({int(x) for x in last})[:8]}")
    arch = base.arch
    plan: dict[int, list[tuple[int, torch.Tensor]]] = defaultdict(list)  # layer -> [(head, pos [B])]
    for key, hs in heads.items():
        pos = check_positions(_positions(b, key), S, f"{key} position")[:, 0]
        for layer, head in hs:
            plan[arch.layer_index(int(layer))].append((int(head), pos))
    layers = sorted(plan)
    if not layers:
        return run(Session(base, b, batch_size=batch_size)).logits
    record = [(s, l) for l in layers for s in chosen_sites]
    ft = run(Session(finetuned, b, batch_size=batch_size, progress=progress, desc="caching fine-tuned q/k/v"),
             reads=record, logits=None).cache
    clean = run(Session(base, b, batch_size=batch_size, progress=progress, desc="caching base q/k/v/z"),
                reads=[(s, l) for l in layers for s in (*chosen_sites, "z")], logits=None).cache
    ar = torch.arange(S)
    patches: list[HeadPatch] = []
    for layer in layers:
        for site in chosen_sites:
            n = arch.n_heads if site == "q" else arch.n_kv_heads
            # where[b, t, h]: take the fine-tuned value at (t, h) of this site for example b
            where = torch.zeros(B, S, n, dtype=torch.bool)
            for head, pos in plan[layer]:
                (h_site,) = site_heads(arch, site, [head])
                if site == "q":
                    where[torch.arange(B), pos, h_site] = True
                elif kv_positions == "before":
                    where[:, :, h_site] |= ar[None, :] < pos[:, None]
                else:
                    where[:, :, h_site] |= ar[None, :] <= pos[:, None]
            value = torch.where(where[..., None], ft[site, layer], clean[site, layer])
            patches.append(HeadPatch(site, layer, None, value))
        if restore == "others":
            patches += _restore_except(clean["z", layer], layer, plan[layer])
        elif S > 1:
            patches.append(_restore_before_last(clean["z", layer], layer))
    return run(Session(base, b, batch_size=batch_size, progress=progress, desc="input CMAP"), patches).logits


def _restore_before_last(clean_z: torch.Tensor, layer: int) -> HeadPatch:
    """A patch writing the base head outputs ``clean_z [batch, seq, n_heads, d_head]`` of ``layer``
    at every head and every position but the last (the reference code's ``[:, :-1]``)."""
    B, S = clean_z.shape[:2]
    before = torch.arange(S - 1)[None, :].expand(B, S - 1)
    return HeadPatch("z", layer, None, clean_z[:, :-1], before)


def _restore_except(clean_z: torch.Tensor, layer: int, chosen: Sequence[tuple[int, torch.Tensor]]) -> list[HeadPatch]:
    """Patches writing the base head outputs ``clean_z [batch, seq, n_heads, d_head]`` of ``layer``
    everywhere except at each chosen ``(head, positions [batch])``, whose patched value stays.
    A head may be chosen at several positions (it can belong to two groups)."""
    B, S, H, _ = clean_z.shape
    keep = torch.zeros(B, S, H, dtype=torch.bool)
    for head, pos in chosen:
        keep[torch.arange(B), pos, head] = True
    free = [h for h in range(H) if not keep[:, :, h].any()]
    patches = [HeadPatch("z", layer, free, clean_z[:, :, free])] if free else []
    b = torch.arange(B)[:, None]
    for head in (h for h in range(H) if h not in free):
        counts = (~keep[:, :, head]).sum(1)
        if not bool((counts == counts[0]).all()):
            raise CMAPError(f"head {head} of layer {layer} is kept at a varying number of positions per example")
        others = torch.arange(S)[None, :].expand(B, S)[~keep[:, :, head]].view(B, int(counts[0]))
        if others.shape[1]:
            patches.append(HeadPatch("z", layer, [head], clean_z[b, others][:, :, [head]], others))
    return patches


# --------------------------------------------------------------------------------------------
# The chapter's measurements: which head sets, and how much of the gain each recovers

#: What the paper patched per group (§5): DCM-selected heads for the desideratum each group
#: was found to encode, and the whole Structure Reader group.
DCM_CHOICE = {"value_fetcher": "object_value", "position_transmitter": "positional",
              "position_detector": "positional", "structure_reader": None}


#: The labels of the rows of the models alone in :func:`gain_recovery`.
BASE_ALONE, FINETUNED_ALONE = "base alone", "fine-tuned alone"
#: The label of the set of every circuit head.
FULL_CIRCUIT = "full circuit"


class HeadSet(collections.abc.Mapping):
    """One set of heads CMAP patches: a read-only mapping ``{position key: [(layer, head), ...]}``
    (what :func:`output_cmap` and :func:`input_cmap` take), with what it is, as fields rather
    than in its label: ``group`` (``""`` for the full circuit) and ``desideratum`` (the DCM
    desideratum its heads were selected for; ``""`` for a whole group or the full circuit).

    >>> s = HeadSet({"last": [(1, 2)]}, "value_fetcher", "object_value")
    >>> s.label, dict(s)
    ('value_fetcher (DCM object_value)', {'last': [(1, 2)]})
    """

    def __init__(self, heads: Mapping[str, Sequence[Head]], group: str = "", desideratum: str = ""):
        if desideratum and not group:
            raise CMAPError(f"a set of DCM heads ({desideratum!r}) needs its group")
        self.heads = {p: list(hs) for p, hs in heads.items()}
        self.group, self.desideratum = group, desideratum

    @property
    def label(self) -> str:
        """How tables name the set: ``"full circuit"``, ``"<group> (DCM <desideratum>)"`` or
        ``"<group> (whole group)"``."""
        if not self.group:
            return FULL_CIRCUIT
        return f"{self.group} (DCM {self.desideratum})" if self.desideratum else f"{self.group} (whole group)"

    @property
    def papers(self) -> bool:
        """Whether the paper patched this set (§5): the full circuit, or a group's heads as
        :data:`DCM_CHOICE` chose them."""
        return not self.group or self.desideratum == (DCM_CHOICE.get(self.group) or "")

    def __getitem__(self, position: str) -> list[Head]:
        return self.heads[position]

    def __iter__(self):
        return iter(self.heads)

    def __len__(self) -> int:
        return len(self.heads)

    def __repr__(self) -> str:
        return f"HeadSet({self.heads!r}, group={self.group!r}, desideratum={self.desideratum!r})"


def head_sets(circuit: Circuit, dcm_selected: Mapping[tuple[str, str], Sequence[Head]] | None = None
              ) -> dict[str, HeadSet]:
    """The head sets CMAP patches, as ``{label: HeadSet}`` (:attr:`HeadSet.label`): the full
    circuit, each group's DCM heads (the paper's choice; the whole group where DCM has no result
    or for the Structure Readers) and each whole group. A set with no heads (an empty group, DCM
    selecting nothing) has nothing to patch and is left out."""
    sets = [HeadSet(heads_by_position(circuit))]
    for g in GROUPS:
        d = DCM_CHOICE[g]
        chosen = (dcm_selected or {}).get((g, d)) if d else None
        if chosen:
            sets.append(HeadSet({circuit.positions[g]: list(chosen)}, g, d))
        if circuit.groups[g]:
            sets.append(HeadSet({circuit.positions[g]: list(circuit.groups[g])}, g))
    return {s.label: s for s in sets}


#: The groups whose inputs the paper's input CMAP patches (its Table 3): the Value Fetchers and
#: the Position Transmitters, as their DCM heads.
INPUT_GROUPS = ("value_fetcher", "position_transmitter")


def input_sets(sets: Mapping[str, HeadSet]) -> dict[str, HeadSet]:
    """The head sets of :func:`head_sets` that input CMAP patches: the DCM sets of
    :data:`INPUT_GROUPS` (absent where DCM selected nothing)."""
    return {k: v for k, v in sets.items() if v.group in INPUT_GROUPS and v.desideratum}


#: ``head_sets_for(circuit=...)``: whose circuit and DCM heads a fine-tune's head sets are.
CIRCUIT_CHOICES = ("own", "base")

Source = Union[Callable[[str], Any], Mapping[str, Any]]


def _lookup(source: Source, name: str, what: str) -> Any:
    if callable(source):
        return source(name)
    if name not in source:
        raise CMAPError(f"no {what} for model '{name}' (have: {sorted(source)})")
    return source[name]


def circuit_source(finetuned: str, base: str, circuit: Literal["own", "base"]) -> str:
    """The model whose circuit and DCM heads :func:`head_sets_for` patches from ``finetuned``:
    ``finetuned`` itself (``circuit="own"``) or ``base``."""
    if circuit not in CIRCUIT_CHOICES:
        raise CMAPError(f"circuit={circuit!r} is not one of {list(CIRCUIT_CHOICES)}")
    return finetuned if circuit == "own" else base


def head_sets_for(
    finetuned: str,
    base: str,
    circuit: Literal["own", "base"],
    circuits: Source,
    selections: Source,
) -> tuple[str, dict[str, HeadSet]]:
    """The head sets (:func:`head_sets`) to patch from fine-tune ``finetuned`` into ``base``, and
    the name of the model whose circuit they come from.

    Args:
        finetuned, base: model names.
        circuit: ``"own"`` -- the fine-tuned model's own circuit and the DCM heads learned on it
            in that model (the paper's final CMAP: each model's heads are found in that model);
            ``"base"`` -- the base model's circuit and DCM heads, the same sets for every fine-tune.
        circuits: ``name -> Circuit``, a mapping or a function (e.g. loading
            ``paths.circuits / f"{name}.json"``); only the chosen model's is looked up.
        selections: ``name -> {(group, desideratum): [(layer, head), ...]}``, a mapping or a
            function (e.g. :func:`entity_tracking.methods.dcm.read_selections` of the masks file).

    Returns:
        ``(source model name, {label: HeadSet})``.
    """
    source = circuit_source(finetuned, base, circuit)
    return source, head_sets(_lookup(circuits, source, "circuit"), _lookup(selections, source, "DCM selections"))


def _correct(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == target).float()


def _share(patched: torch.Tensor, base: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
    """The share of the gain ``(patched - base) / (finetuned - base)`` of accuracies ``[R]``; NaN
    where there is no gain."""
    gain = finetuned - base
    ok = gain.abs() > 1e-9
    return torch.where(ok, (patched - base) / gain.where(ok, torch.ones_like(gain)), torch.full_like(gain, float("nan")))


def gain_recovery(base, finetuned, batch: Mapping[str, torch.Tensor], sets: Mapping[str, Mapping[str, Sequence[Head]]],
                  input_groups: Mapping[str, Mapping[str, Sequence[Head]]] | None = None,
                  input_sites: Sequence[str] = ("q", "k", "v", "qk", "qkv"), *,
                  kv_positions: Literal["before", "through"] = "before",
                  restore: Literal["before_last", "others"] = "before_last", batch_size: int = 32,
                  n_bootstrap: int = 1000, clusters: Optional[Sequence[int] | torch.Tensor] = None
                  ) -> list[dict[str, Any]]:
    """How much of the fine-tuning gain each patch recovers: the accuracy of the base model, the
    fine-tuned model, output CMAP of every head set and input CMAP of every (set, sites) pair,
    each with a bootstrap interval over the prompts. ``sets`` and ``input_groups`` are
    ``{label: HeadSet}`` (:func:`head_sets`, :func:`input_sets`; a plain ``{position key: heads}``
    mapping is a set of no group). ``kv_positions`` and ``restore`` go to :func:`input_cmap`
    (defaults: the paper's reference code). ``clusters`` (each prompt's ``context_id``,
    :func:`entity_tracking.methods.ablation.context_ids`) makes every interval a bootstrap over
    contexts (all queries of a drawn context together); None resamples prompts.

    Returns rows ``{"kind", "patched", "sites", "n_heads", "n_prompts", "n_clusters", "accuracy", "low",
    "high", "share", "share_low", "share_high", "group", "desideratum"}``: ``kind`` is ``"model"`` (the
    models alone, ``patched`` = :data:`BASE_ALONE` or :data:`FINETUNED_ALONE`), ``"output"`` or
    ``"input"``; ``patched`` is the set's label, ``group`` and ``desideratum`` its
    :class:`HeadSet` fields (``""`` for the models alone); ``share`` is the share of the fine-tuning gain the
    patch recovers, ``(acc_patched - acc_base) / (acc_finetuned - acc_base)``, with a paired
    bootstrap interval over the prompts (the same resampled prompts for all three accuracies;
    NaN where a resample has no gain). The fine-tuned model's row carries the gain itself in
    ``share`` (``acc_finetuned - acc_base``, paired interval); the base model's row has NaN."""
    _check_choice("kv_positions", kv_positions, KV_POSITIONS)
    _check_choice("restore", restore, RESTORES)
    target = batch["target"]
    rows: list[dict[str, Any]] = []
    nan = float("nan")

    def share_of_gain(acc: torch.Tensor) -> torch.Tensor:  # acc [3, R]: patched, base, fine-tuned
        return _share(acc[0], acc[1], acc[2])

    def add(kind: str, patched: str, sites: str, n: int, correct: torch.Tensor, share=None, hs=None) -> None:
        est = bootstrap(correct[None], clusters=clusters, n_resamples=n_bootstrap)
        sh = share or {"value": nan, "low": nan, "high": nan}
        rows.append({"kind": kind, "patched": patched, "sites": sites, "n_heads": n, "n_prompts": int(correct.numel()),
                     "n_clusters": est.n_clusters, "accuracy": est.value, "low": est.low, "high": est.high,
                     "share": sh["value"], "share_low": sh["low"], "share_high": sh["high"],
                     "group": getattr(hs, "group", ""), "desideratum": getattr(hs, "desideratum", "")})

    # output CMAP of every set from one recording of the fine-tuned model (OutputCMAP), unless a
    # set patches every position
    keys = [k for hs in sets.values() for k in hs]
    patcher = OutputCMAP(base, finetuned, batch, keys, batch_size=batch_size) if "all" not in keys else None
    base_c = _correct(last_logits(base, batch, batch_size=batch_size), target)
    ft_c = _correct(patcher.finetuned_logits if patcher else last_logits(finetuned, batch, batch_size=batch_size),
                    target)
    add("model", BASE_ALONE, "", 0, base_c)
    gain = bootstrap(torch.stack([ft_c, base_c]), lambda a: a[0] - a[1], clusters=clusters, n_resamples=n_bootstrap)
    add("model", FINETUNED_ALONE, "", 0, ft_c, gain.as_dict())
    jobs = [("output", label, "z", hs) for label, hs in sets.items()]
    jobs += [("input", label, s, hs) for label, hs in (input_groups or {}).items() for s in input_sites]
    for kind, label, sites, hs in tqdm(jobs, desc="CMAP", leave=False):
        n = sum(len(v) for v in hs.values())
        if kind == "output":
            logits = patcher.logits(hs) if patcher else output_cmap(base, finetuned, batch, hs, batch_size=batch_size)
        else:
            logits = input_cmap(base, finetuned, batch, hs, sites, kv_positions=kv_positions, restore=restore,
                                batch_size=batch_size)
        c = _correct(logits, target)
        share = bootstrap(torch.stack([c, base_c, ft_c]), share_of_gain, clusters=clusters, n_resamples=n_bootstrap)
        add(kind, label, sites, n, c, share.as_dict(), hs)
    return rows


def row_key(row: Mapping[str, Any]) -> str:
    """How a :func:`gain_recovery` row is named: its head set, plus ``[sites]`` for input CMAP."""
    return row["patched"] if row["kind"] != "input" else f"{row['patched']} [{row['sites']}]"


def paper_accuracy(row: Mapping[str, Any], paper_model: str | None) -> float | None:
    """The paper's accuracy for a :func:`gain_recovery` row, to print beside ours, when the paper
    has one: the models alone (:data:`~entity_tracking.methods.paper.ACCURACY`; the base is
    Llama-7B), output CMAP of the sets the paper patched (:attr:`HeadSet.papers`) from
    ``paper_model`` (:data:`~entity_tracking.methods.paper.CMAP_OUTPUT`), input CMAP from Goat-7B
    (:data:`~entity_tracking.methods.paper.CMAP_INPUT`). None elsewhere, and for a fine-tune with
    no paper model (``paper_model`` None, e.g. a positive control)."""
    if not paper_model or paper_model not in paper.ACCURACY:
        return None
    if row["kind"] == "model":
        return paper.ACCURACY[paper_model if row["patched"] == FINETUNED_ALONE else "Llama-7B"]
    if not HeadSet({}, row["group"], row["desideratum"]).papers:
        return None
    group = row["group"] or FULL_CIRCUIT
    if row["kind"] == "input":
        return paper.CMAP_INPUT.get(group, {}).get(str(row["sites"]).upper()) if paper_model == "Goat-7B" else None
    return paper.CMAP_OUTPUT.get(paper_model, {}).get(group)


def paper_share(row: Mapping[str, Any], paper_model: str | None) -> float:
    """The paper's share of the fine-tuning gain for the head set of a :func:`gain_recovery` row,
    to draw beside ours: ``(acc_patched - acc_Llama) / (acc_paper_model - acc_Llama)`` from
    :func:`paper_accuracy`. NaN where the paper has no number (:func:`paper_accuracy` is None) and
    for the rows of the models alone."""
    acc = paper_accuracy(row, paper_model) if row["kind"] != "model" else None
    if acc is None:
        return float("nan")
    base = paper.ACCURACY["Llama-7B"]
    gain = paper.ACCURACY[paper_model] - base
    return float("nan") if abs(gain) < 1e-9 else (acc - base) / gain


# --------------------------------------------------------------------------------------------
# Against random head sets: does the circuit recover more than as many heads anywhere?


def random_head_sets(heads: Mapping[str, Sequence[Head]], n_layers: int, n_heads: int, n: int = 10, seed: int = 0
                     ) -> list[dict[str, list[Head]]]:
    """``n`` random head sets shaped like ``heads`` (``{position key: [(layer, head), ...]}``, e.g. a
    :class:`HeadSet`): each has as many heads at each position key as ``heads`` has there, drawn
    uniformly without replacement from all ``n_layers x n_heads`` heads of the model (circuit
    heads included: a draw is what any heads of that number do at those positions). Seeded: the
    same ``seed`` gives the same draws.

    >>> [sorted(map(len, d.values())) for d in random_head_sets({"last": [(0, 1), (1, 2)], "query_label": [(0, 0)]}, 2, 4, 2)]
    [[1, 2], [1, 2]]
    """
    if n < 1:
        raise CMAPError(f"random head sets need at least one draw, got n={n}")
    total = n_layers * n_heads
    for key, hs in heads.items():
        if len(hs) > total:
            raise CMAPError(f"'{key}' holds {len(hs)} heads, more than the model's {total}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        draw = {}
        for key, hs in heads.items():
            idx = torch.randperm(total, generator=gen)[:len(hs)].tolist()
            draw[key] = sorted((i // n_heads, i % n_heads) for i in idx)
        out.append(draw)
    return out


def _group_of(circuit: Optional[Circuit], key: str, head: Head) -> str:
    """The circuit groups a head belongs to at position ``key`` (``"a+b"``), ``""`` without a circuit."""
    if circuit is None:
        return ""
    return "+".join(g for g in circuit.group_names if circuit.positions.get(g) == key and head in circuit.groups[g])


def per_head_recovery(patcher: OutputCMAP, heads: Mapping[str, Sequence[Head]], target: torch.Tensor, *,
                      base_correct: Optional[torch.Tensor] = None, circuit: Optional[Circuit] = None,
                      clusters: Optional[Sequence[int] | torch.Tensor] = None, n_bootstrap: int = 1000,
                      progress: bool = False) -> list[dict[str, Any]]:
    """Each head of ``heads`` patched alone at its position from the fine-tuned model (output CMAP,
    ``patcher``'s recording): its share of the gain with a paired bootstrap interval (over
    contexts with ``clusters``), and its accuracy change over the base model. Rows ``{"position",
    "layer", "head", "label", "group", "accuracy", "change", "share", "share_low", "share_high"}``;
    ``group`` names the circuit group(s) of the head at that position when ``circuit`` is given.
    Where the fine-tune has no gain over the base (it is the base model, say) every share is NaN
    and every change 0."""
    base_c = base_correct if base_correct is not None else _correct(
        last_logits(patcher.base, patcher.batch, batch_size=patcher.batch_size), target)
    ft_c = _correct(patcher.finetuned_logits, target)
    rows = []
    jobs = [(key, (int(l), int(h))) for key, hs in heads.items() for l, h in hs]
    for key, head in tqdm(jobs, desc="CMAP per head", leave=False, disable=not progress):
        c = _correct(patcher.logits({key: [head]}), target)
        est = bootstrap(torch.stack([c, base_c, ft_c]), lambda a: _share(a[0], a[1], a[2]), clusters=clusters,
                        n_resamples=n_bootstrap)
        group = _group_of(circuit, key, head)
        rows.append({"position": key, "layer": head[0], "head": head[1],
                     "label": f"L{head[0]}H{head[1]} @ {key}" + (f" ({group})" if group else ""), "group": group, "accuracy": float(c.mean()),
                     "change": float(c.mean() - base_c.mean()), "share": est.value, "share_low": est.low,
                     "share_high": est.high})
    return rows


def _draw_mean(first: int, d: int, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A bootstrap statistic's part: the mean accuracy ``[R]`` over the ``d`` draws in rows
    ``first:`` of ``acc [k, R]``; every draw once at the first call (bootstrap's point
    estimate), then ``d`` draws resampled with replacement per resample."""
    gen, state = torch.Generator().manual_seed(seed), {"point": True}

    def mean(acc: torch.Tensor) -> torch.Tensor:
        if state["point"]:
            state["point"] = False
            return acc[first:].mean(0)
        pick = torch.randint(d, (d, acc.shape[1]), generator=gen) + first
        return acc.gather(0, pick).mean(0)
    return mean


def random_baseline(base, finetuned, batch: Mapping[str, torch.Tensor], heads: Mapping[str, Sequence[Head]], *,
                    label: str = FULL_CIRCUIT, n_random: int = 10, seed: int = 0, clusters: Optional[Sequence[int] | torch.Tensor] = None,
                    circuit: Optional[Circuit] = None, per_head: bool = True, batch_size: int = 32,
                    n_bootstrap: int = 1000, progress: bool = False) -> dict[str, Any]:
    """Output CMAP of ``heads`` (the full circuit, say) beside ``n_random`` random head sets of the
    same sizes at the same positions (:func:`random_head_sets`), all from one recording of the
    fine-tuned model (:class:`OutputCMAP`), and, with ``per_head``, each head alone
    (:func:`per_head_recovery`).

    Every number is a share of the fine-tuning gain, ``(acc_patched - acc_base) / (acc_ft -
    acc_base)``, with a percentile bootstrap interval over prompts (over contexts with
    ``clusters``, each prompt's ``context_id``) and, for the random sets, over the draws too: a
    resample draws prompts (contexts) and ``n_random`` draws with replacement, the same prompts for
    every model and set (paired).

    Returns (JSON-ready) ``{"patched", "positions": {key: heads}, "n_heads", "n_random", "seed",
    "n_prompts", "n_clusters", "circuit", "random", "excess", "random_shares", "draws",
    "per_head"}``: ``circuit`` / ``random`` the shares of ``heads`` and of the mean random set,
    ``excess`` their paired difference (``{"value", "low", "high", ...}``), ``random_shares`` each
    draw's share, ``draws`` the sets drawn."""
    check_compatible(base, finetuned)
    heads = {k: [(int(l), int(h)) for l, h in hs] for k, hs in heads.items() if len(hs)}
    if not heads:
        raise CMAPError("random_baseline needs a head set with heads to patch")
    target = batch["target"]
    patcher = OutputCMAP(base, finetuned, batch, list(heads), batch_size=batch_size)
    base_c = _correct(last_logits(base, patcher.batch, batch_size=batch_size), target)
    ft_c = _correct(patcher.finetuned_logits, target)
    circ_c = _correct(patcher.logits(heads), target)
    draws = random_head_sets(heads, base.arch.n_layers, base.arch.n_heads, n_random, seed)
    rand_c = [_correct(patcher.logits(d), target) for d in tqdm(draws, desc="CMAP random sets", leave=False,
                                                                disable=not progress)]
    vec = torch.stack([circ_c, base_c, ft_c, *rand_c])  # [3 + d, n]: circuit, base, fine-tuned, each draw
    d = len(draws)
    kw = dict(clusters=clusters, n_resamples=n_bootstrap, seed=seed)
    circuit_share = bootstrap(vec[:3], lambda a: _share(a[0], a[1], a[2]), **kw)
    rand_mean = _draw_mean(3, d, seed + 1)
    random_share = bootstrap(vec, lambda a: _share(rand_mean(a), a[1], a[2]), **kw)
    rand_mean = _draw_mean(3, d, seed + 1)
    excess = bootstrap(vec, lambda a: _share(a[0], a[1], a[2]) - _share(rand_mean(a), a[1], a[2]), **kw)
    n_base, n_ft = base_c.mean().reshape(1), ft_c.mean().reshape(1)
    out = {"patched": label, "positions": {k: len(v) for k, v in heads.items()}, "n_heads": sum(len(v) for v in heads.values()),
           "n_random": d, "seed": seed, "n_prompts": int(target.numel()), "n_clusters": circuit_share.n_clusters,
           "base_accuracy": float(n_base), "finetuned_accuracy": float(n_ft),
           "circuit": circuit_share.as_dict(), "random": random_share.as_dict(), "excess": excess.as_dict(),
           "random_shares": [float(_share(c.mean().reshape(1), n_base, n_ft)) for c in rand_c],
           "draws": [{k: [list(h) for h in v] for k, v in draw.items()} for draw in draws]}
    if per_head:
        out["per_head"] = per_head_recovery(patcher, heads, target, base_correct=base_c, circuit=circuit,
                                            clusters=clusters, n_bootstrap=n_bootstrap, progress=progress)
    return out


def random_baseline_table(baselines: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per fine-tune of :func:`random_baseline` results (``{fine-tune: result}``): the full
    circuit's share of the gain beside the random sets' and the paired excess, as text, with the
    sets' sizes and positions."""
    def fmt(e: Mapping[str, float], spec: str = ".2f") -> str:
        return format(Estimate(e["value"], e["low"], e["high"]), spec)

    return [{"fine-tuned": ft, "heads (per position)": ", ".join(f"{n} @ {k}" for k, n in r["positions"].items()),
             "full circuit: share of the gain": fmt(r["circuit"]),
             f"random sets ({r['n_random']}): share of the gain": fmt(r["random"]),
             "excess over random (paired)": fmt(r["excess"], "+.2f")} for ft, r in baselines.items()]


def per_head_table(baselines: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The per-head rows of :func:`random_baseline` results, one list over fine-tunes (with a
    ``fine-tuned`` column), for a figure."""
    return [{"fine-tuned": ft, **row} for ft, r in baselines.items() for row in r.get("per_head", [])]
