"""Activation patching on nnsight, through the architecture table.

**The method.** Run a model on a *base* prompt, but overwrite some internal activation with
the value it took on another input -- a *source* prompt (activation patching, causal tracing,
interchange intervention), the mean over a reference set (mean ablation) or anything else --
and see how the output changes. If overwriting a component with its value from a prompt that
lacks some information destroys the behaviour, the component carries that information at that
position. Here the components are attention heads, read and written at four sites per layer
(:mod:`entity_tracking.model.arch`): a head's **output** ``z`` (the ``o_proj`` input slice, before
``W_O``; the paper's "head output"), and its **query**, **key** and **value** (``q_proj``/
``k_proj``/``v_proj`` outputs, before rotary embeddings). A patch names a site, a layer, some
heads, one or more positions *per example* (the base position may differ from example to
example, and from the position the value was read at in the source), and the values to write.

**One kernel.** :func:`run` is the only place the book runs a model with its activations
changed. What a run does at a site is a small *write* object with one method,
``new_value(base)``, that turns the value the site holds into the value the run continues
with (the shape of pyvene's interventions):

==================  ==========================================================================
:class:`HeadPatch`  replace some heads at some positions by given values (activation and path
                    patching, CMAP: values from another run)
:class:`Blend`      ``mask * base + (1 - mask) * values`` per head, differentiable (DCM)
:class:`ResidPatch` replace the residual stream at some positions (interchange of whole tokens)
:class:`Mean`       replace every head not kept by its mean at that position (mean ablation)
==================  ==========================================================================

The same call records sites (``reads``, at chosen ``positions``) and keeps the autograd graph
(``grad=True``, DCM's training); path patching, mean ablation, DCM, CMAP, binding and the
attention patterns differ only in the writes they pass and where the values come from.

**How it runs is the session's business.** ``run(lm, writes, reads, batch=prompts)`` runs every
position of every prompt through every block; ``run(session, writes, reads)`` runs them in a
:class:`Session` of the model on its prompts, which, cached, shares work between the runs: a run
that writes only from position ``p`` (or block ``l``) on starts there, from the clean run's keys
and values (:class:`KVPrefix`) or block outputs, with the same logits. Methods state what to
write and what to read; the session owns the speed, and the uncached run is the oracle it is
tested against.

Conventions:

* Shapes: per-head caches are ``[batch, pos, n_heads, d_head]`` (``z`` and ``q``) or
  ``[batch, pos, n_kv_heads, d_head]`` (``k`` and ``v``); residual caches (``resid_pre``,
  ``attn_out``, ``resid_post``) are ``[batch, pos, d_model]``. A cache taken at chosen
  positions (``positions [batch, n_pos]``) has ``n_pos`` in place of ``pos``.
* **Heads of a site** are indices on that site's own head axis. For ``k`` and ``v`` under
  grouped-query attention that is the *kv head*: the key/value "of query head ``h``" is kv head
  ``arch.kv_head(h) = h // group`` (:func:`site_heads` maps query heads to it), so patching the
  value of one query head changes the value read by all ``group`` query heads that share it.
  This is the only faithful definition -- the model has no per-query-head value to patch -- and
  it equals patching those ``group`` heads together in the multi-head twin of the model (the
  same weights with every kv head repeated). Without GQA, kv head ``h`` is query head ``h``.
* Evaluation is at each example's **last position** (``last_position [batch]``, as built by
  :func:`entity_tracking.task.encode_prompts`); probabilities are a softmax over the whole
  vocabulary.
* Every run is under ``torch.no_grad()`` (unless ``grad=True``) and split into chunks of ``batch_size`` examples.

The residual stream can be written too (:class:`ResidPatch`, sites ``resid_pre`` and
``resid_post``: a block's input and output, ``[batch, pos, d_model]``), for interchange at the
level of whole token representations (:mod:`entity_tracking.methods.binding`).

Inside one trace nnsight requires modules to be read in forward order; :func:`run` sorts all
reads and writes by ``(layer, site)`` in the order the model computes them, so callers list
patches and records in any order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..model.arch import Arch, arch_for
from ..schema import HEAD_SITES, SITES, Head

__all__ = [
    "HEAD_SITES",

    "RESID_WRITE_SITES",
    "SITES",
    "STATE_SITES",
    "Session",
    "ActivationCache",
    "Blend",
    "HeadPatch",
    "KVPrefix",
    "MIN_SUFFIX_ROWS",
    "PREFIX_BUDGET",
    "Mean",
    "PatchRun",
    "ResidPatch",
    "accuracy",
    "as_batch",
    "cache_activations",
    "check_positions",
    "check_unpadded",
    "last_logits",
    "patch_from_cache",
    "run",
    "site_heads",
    "target_probs",
    "Write",
    "by_first_position",
    "heads_by_layer",
]

_ORDER = {s: i for i, s in enumerate(SITES)}

BatchLike = Union[torch.Tensor, Mapping[str, Any]]


# --------------------------------------------------------------------------------------------
# Inputs


def as_batch(batch: BatchLike) -> dict[str, torch.Tensor]:
    """Normalise an input: a LongTensor of ids ``[batch, seq]`` or a mapping with ``input_ids``
    (and optionally ``attention_mask``, ``last_position``, ...; e.g.
    :func:`entity_tracking.task.encode_prompts`).
    Returns a dict with at least ``input_ids``, ``attention_mask`` and ``last_position``
    (default: the last non-pad position of each row)."""
    if isinstance(batch, torch.Tensor):
        out = {"input_ids": batch}
    elif isinstance(batch, Mapping) and "input_ids" in batch:
        out = dict(batch)
    else:
        raise TypeError(f"expected input ids [batch, seq] or a mapping with 'input_ids', got {type(batch).__name__}")
    ids = out["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(f"input_ids must be a tensor [batch, seq], got {getattr(ids, 'shape', type(ids))}")
    if out.get("attention_mask") is None:
        out["attention_mask"] = torch.ones_like(ids)
    if out.get("last_position") is None:
        mask = out["attention_mask"]
        seq = ids.shape[1]
        # last index whose mask is 1 (works for left and right padding)
        out["last_position"] = seq - 1 - mask.flip(1).argmax(1)
    return out


def check_positions(positions: torch.Tensor, seq_len: int, what: str = "",
                    attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Validate per-example positions ``[batch]`` or ``[batch, n]`` against ``seq_len`` (and, with
    a mask, that no position points at padding); return them as a LongTensor ``[batch, n]``.
    ``what`` names them in errors ("position 60 (example 3, last position) is out of range for
    sequence length 54")."""
    pos = torch.as_tensor(positions, dtype=torch.long)
    if pos.dim() == 1:
        pos = pos[:, None]
    if pos.dim() != 2:
        raise ValueError(f"positions ({what}) must be [batch] or [batch, n], got shape {tuple(pos.shape)}")
    bad = (pos < 0) | (pos >= seq_len)
    if bad.any():
        b, i = (int(x) for x in bad.nonzero()[0])
        raise IndexError(
            f"position {int(pos[b, i])} (example {b}{', ' + what if what else ''}) is out of range for "
            f"sequence length {seq_len}"
            + (" (-1 marks a position the prompt does not have)" if int(pos[b, i]) == -1 else "")
        )
    if attention_mask is not None:
        on_pad = attention_mask.gather(1, pos.to(attention_mask.device)) == 0
        if on_pad.any():
            b, i = (int(x) for x in on_pad.nonzero()[0])
            raise IndexError(f"position {int(pos[b, i])} (example {b}{', ' + what if what else ''}) is a padding position")
    return pos


def check_unpadded(batch: Mapping[str, torch.Tensor], what: str = "prompts") -> int:
    """Require a batch without padding (all prompts of equal length); return that length."""
    mask = batch["attention_mask"]
    if not bool((mask == 1).all()):
        lengths = sorted({int(x) for x in mask.sum(1)})
        raise ValueError(
            f"{what} have unequal lengths {lengths[:8]}{' ...' if len(lengths) > 8 else ''} tokens: this "
            f"kernel needs prompts of one length (no padding); tokenize with a tokenizer for which the "
            f"dataset's prompts all have the same length, or split the data by length"
        )
    return int(batch["input_ids"].shape[1])


def heads_by_layer(heads: Iterable[Head]) -> dict[int, list[int]]:
    """``(layer, head)`` pairs grouped as ``{layer: [head, ...]}``, layers ascending and each
    layer's heads in the order given: one write or read per layer.

    >>> heads_by_layer([(2, 5), (0, 1), (2, 3)])
    {0: [1], 2: [5, 3]}
    """
    out: dict[int, list[int]] = {}
    for layer, head in heads:
        out.setdefault(int(layer), []).append(int(head))
    return dict(sorted(out.items()))


def site_heads(arch: Arch, site: str, heads: Iterable[int]) -> list[int]:
    """The indices on ``site``'s head axis for query heads ``heads``: the heads themselves for
    ``z``/``q``; for ``k``/``v`` the kv heads ``arch.kv_head(h)`` they read, deduplicated and
    sorted (so a GQA group is patched once)."""
    hs = [int(h) for h in heads]
    for h in hs:
        arch.kv_head(h)  # range check, names the head
    if site in ("z", "q"):
        return hs
    if site in ("k", "v"):
        return sorted({arch.kv_head(h) for h in hs})
    raise ValueError(f"site '{site}' has no heads; per-head sites are {HEAD_SITES}")


def n_site_heads(arch: Arch, site: str) -> int:
    """How many heads per-head ``site`` has: ``n_kv_heads`` for ``k``/``v``, else ``n_heads``."""
    if site not in HEAD_SITES:
        raise ValueError(f"site '{site}' has no heads; per-head sites are {HEAD_SITES}")
    return arch.head_count(site)


# --------------------------------------------------------------------------------------------
# Writes: what an intervention does to one site of one layer
#
# Every write is a small object with one method that matters, ``new_value(base)``: given the
# value the site holds in this run (after earlier writes), the value to continue with (as in
# pyvene, whose interventions are ``forward(base, source)``). The rest is bookkeeping that lets
# :func:`run` check, split and shift them: ``resolved`` (checked against the batch), ``rows``
# (the rows of one chunk), ``shifted`` (for a run that starts at a later position, see
# :class:`KVPrefix`), ``first_position`` (the earliest position written, per row) and
# ``is_noop`` (a write that would change nothing is not traced).


def _head_index(arch: Arch, site: str, heads: Optional[Sequence[int]], what: str) -> list[int]:
    if site not in HEAD_SITES:
        raise ValueError(f"cannot {what} site '{site}'; per-head sites are {HEAD_SITES}")
    n = n_site_heads(arch, site)
    hs = list(range(n)) if heads is None else [int(h) for h in heads]
    for h in hs:
        arch.check_head(h, n, "key/value" if site in ("k", "v") else "query")
    return hs


def _place(base: torch.Tensor, positions: Optional[torch.Tensor], heads: Optional[list[int]],
           value: torch.Tensor) -> torch.Tensor:
    """A copy of ``base`` ``[batch, pos, (head, d_head | d_model)]`` holding ``value`` at
    ``positions [batch, n_pos]`` (None: every position) and ``heads`` (None: a residual site)."""
    new = base.clone()
    bi = torch.arange(base.shape[0], device=base.device)
    if heads is None:
        if positions is None:
            new[:] = value
        else:
            new[bi[:, None], positions.to(base.device)] = value
        return new
    hs = torch.as_tensor(heads, device=base.device)
    if positions is None:
        new[:, :, hs] = value
    else:
        new[bi[:, None, None], positions.to(base.device)[:, :, None], hs[None, None, :]] = value
    return new


def _gather(base: torch.Tensor, positions: Optional[torch.Tensor], heads: list[int]) -> torch.Tensor:
    """``base`` at ``positions [batch, n_pos]`` (None: all) and ``heads``: ``[batch, n_pos, n_sel, d_head]``."""
    hs = torch.as_tensor(heads, device=base.device)
    if positions is None:
        return base[:, :, hs]
    bi = torch.arange(base.shape[0], device=base.device)
    return base[bi[:, None, None], positions.to(base.device)[:, :, None], hs[None, None, :]]


def _checked_values(site: str, layer: int, values: torch.Tensor, positions: Optional[torch.Tensor],
                    batch_size: int, seq_len: int, trailing: dict[str, int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A patch's ``values`` and ``positions`` checked against the run: positions become
    ``[batch, n_pos]`` (values with one position per example gain the ``n_pos`` axis) and the
    values must be ``[batch, n_pos or seq, *trailing]``; errors name the site, layer and shape."""
    vals, pos = values, None
    if positions is not None:
        pos = check_positions(positions, seq_len, f"{site} patch at layer {layer}")
        if vals.dim() == 1 + len(trailing):
            vals = vals[:, None]
        if pos.shape[0] != batch_size:
            raise ValueError(f"{site} patch (layer {layer}): positions for {pos.shape[0]} examples, "
                             f"batch has {batch_size}")
    want = (batch_size, seq_len if pos is None else pos.shape[1], *trailing.values())
    if tuple(vals.shape) != want:
        raise ValueError(f"{site} patch (layer {layer}): values must be [batch, {'seq' if pos is None else 'n_pos'}, "
                         f"{', '.join(trailing)}] = {list(want)}, got {list(vals.shape)}")
    return vals, pos


class _ValuesAtPositions:
    """What :class:`HeadPatch` and :class:`ResidPatch` share: ``values`` written at per-row
    ``positions`` (``None``: every position), and how such a write is cut to rows or shifted."""

    values: torch.Tensor
    positions: Optional[torch.Tensor]

    def rows(self, idx) -> "_ValuesAtPositions":
        """The write for rows ``idx`` (a slice or indices) of the batch."""
        return dataclasses.replace(self, values=self.values[idx],
                                   positions=None if self.positions is None else self.positions[idx])

    def shifted(self, start: int) -> "_ValuesAtPositions":
        """The write for a run that feeds only positions ``start`` on."""
        if self.positions is None:
            return dataclasses.replace(self, values=self.values[:, start:])
        return dataclasses.replace(self, positions=self.positions - start)

    def first_position(self, seq_len: int) -> torch.Tensor:
        """``[batch]``: the earliest position written in each row."""
        if self.positions is None:
            return torch.zeros(self.values.shape[0], dtype=torch.long)
        return self.positions.min(1).values.cpu()

    def is_noop(self) -> bool:
        return False


@dataclass
class HeadPatch(_ValuesAtPositions):
    """Replace some heads of one site and layer at chosen per-example positions (activation
    patching: the values usually come from another run, :func:`patch_from_cache`).

    Attributes:
        site: ``"z"`` (head output), ``"q"``, ``"k"`` or ``"v"``.
        layer: layer index (negative counts from the end).
        heads: indices on the site's head axis (kv heads for ``k``/``v``; see :func:`site_heads`);
            ``None`` = every head of the site.
        values: ``[batch, n_pos, n_sel, d_head]`` with ``positions [batch, n_pos]``, or
            ``[batch, seq, n_sel, d_head]`` with ``positions=None`` (every position).
        positions: base positions per example, ``[batch]`` or ``[batch, n_pos]``; ``None`` = all.

    >>> zero = HeadPatch("z", 1, [3], torch.zeros(8, 1, 1, arch.d_head), batch["last_position"])
    >>> silenced = run(lm, [zero], batch=batch).logits  # head 1.3 silenced at each prompt's last token
    >>> bool((silenced - run(lm, batch=batch).logits).abs().max() > 0)
    True
    """

    site: str
    layer: int
    heads: Optional[Sequence[int]]
    values: torch.Tensor
    positions: Optional[torch.Tensor] = None

    def resolved(self, arch: Arch, batch_size: int, seq_len: int) -> "HeadPatch":
        """Checked copy with a non-negative layer, explicit heads and positions ``[batch, n_pos]``."""
        layer = arch.layer_index(self.layer)
        heads = _head_index(arch, self.site, self.heads, "patch")
        vals, pos = _checked_values(self.site, layer, self.values, self.positions, batch_size, seq_len,
                                    {"n_heads_selected": len(heads), "d_head": arch.d_head})
        return dataclasses.replace(self, layer=layer, heads=heads, values=vals, positions=pos)

    def new_value(self, base: torch.Tensor) -> torch.Tensor:
        """``base`` ``[batch, pos, n, d_head]`` with the chosen heads and positions replaced."""
        return _place(base, self.positions, list(self.heads), self.values.to(device=base.device, dtype=base.dtype))


@dataclass
class Blend(HeadPatch):
    """DCM's interpolation: at the chosen heads and positions the site becomes
    ``mask * base + (1 - mask) * values`` (``mask [n_sel]``, one entry per head; 1 keeps the
    run's own value, 0 writes ``values``). Differentiable in ``mask`` (run with ``grad=True``).

    >>> m = torch.ones(2, requires_grad=True)
    >>> logits = run(lm, [Blend("z", 3, [0, 5], source_z, pos, m)], batch=base, grad=True).logits
    >>> logits[:, target].sum().backward()  # m.grad: how each head's blend moves the target
    >>> m.grad.shape
    torch.Size([2])
    """

    mask: Optional[torch.Tensor] = None

    def resolved(self, arch: Arch, batch_size: int, seq_len: int) -> "Blend":
        out = super().resolved(arch, batch_size, seq_len)
        if self.mask is None or tuple(self.mask.shape) != (len(out.heads),):
            raise ValueError(f"blend (layer {out.layer}): mask must have one entry per head ({len(out.heads)}), "
                             f"got {None if self.mask is None else tuple(self.mask.shape)}")
        return out

    def new_value(self, base: torch.Tensor) -> torch.Tensor:
        here = _gather(base, self.positions, list(self.heads))
        m = self.mask.to(base.device)[:, None]  # [n_sel, 1] against [..., n_sel, d_head]
        return _place(base, self.positions, list(self.heads),
                      m * here + (1 - m) * self.values.to(device=base.device, dtype=base.dtype))


#: Residual sites :class:`ResidPatch` can write (a block's input and output).
RESID_WRITE_SITES: tuple[str, ...] = ("resid_pre", "resid_post")


@dataclass
class ResidPatch(_ValuesAtPositions):
    """Overwrite the residual stream of one block at chosen per-example positions.

    Attributes:
        site: ``"resid_pre"`` (the block's input; layer 0: the embeddings) or ``"resid_post"``
            (its output).
        layer: layer index (negative counts from the end).
        values: ``[batch, n_pos, d_model]`` with ``positions [batch, n_pos]``, or
            ``[batch, seq, d_model]`` with ``positions=None`` (every position).
        positions: base positions per example, ``[batch]`` or ``[batch, n_pos]``; ``None`` = all.

    >>> src = cache_activations(lm, source, ["resid_post"], [2])["resid_post", 2]
    >>> patched = run(lm, [ResidPatch("resid_post", 2, src)], batch=base).logits
    >>> torch.allclose(patched, run(lm, batch=source).logits, atol=1e-5)  # the source run's logits
    True
    """

    site: str
    layer: int
    values: torch.Tensor
    positions: Optional[torch.Tensor] = None

    def resolved(self, arch: Arch, batch_size: int, seq_len: int) -> "ResidPatch":
        """Checked copy with a non-negative layer and positions ``[batch, n_pos]`` (or None)."""
        if self.site not in RESID_WRITE_SITES:
            raise ValueError(f"cannot write residual site '{self.site}'; writable residual sites are {RESID_WRITE_SITES}")
        layer = arch.layer_index(self.layer)
        vals, pos = _checked_values(self.site, layer, self.values, self.positions, batch_size, seq_len,
                                    {"d_model": arch.d_model})
        return ResidPatch(self.site, layer, vals, pos)

    def new_value(self, base: torch.Tensor) -> torch.Tensor:
        """``base`` ``[batch, pos, d_model]`` with the chosen positions replaced."""
        return _place(base, self.positions, None, self.values.to(device=base.device, dtype=base.dtype))


@dataclass
class Mean:
    """Mean ablation of one site and layer: wherever ``keep`` is False the head's value is
    replaced by ``means`` at that absolute position (:mod:`entity_tracking.methods.ablation`).

    Attributes:
        layer: layer index (negative counts from the end).
        keep: bool ``[batch, seq, n_heads]``: True keeps the run's own value.
        means: ``[seq, n_heads, d_head]``, one mean per position and head.
        site: a per-head site, ``"z"`` (the head outputs) by default.

    >>> keep = torch.ones(8, seq, arch.n_heads, dtype=torch.bool); keep[:, :, 2] = False
    >>> ablated = run(lm, [Mean(0, keep, means[0])], batch=batch).logits  # head 0.2 mean-ablated everywhere
    >>> torch.equal(run(lm, [Mean(0, torch.ones_like(keep), means[0])], batch=batch).logits,
    ...             run(lm, batch=batch).logits)  # keeping every head changes nothing
    True
    """

    layer: int
    keep: torch.Tensor
    means: torch.Tensor
    site: str = "z"

    def resolved(self, arch: Arch, batch_size: int, seq_len: int) -> "Mean":
        layer = arch.layer_index(self.layer)
        n = len(_head_index(arch, self.site, None, "mean-ablate"))
        if tuple(self.keep.shape) != (batch_size, seq_len, n) or self.keep.dtype != torch.bool:
            raise ValueError(f"mean ablation (layer {layer}): keep must be bool [batch, seq, n_heads] = "
                             f"{[batch_size, seq_len, n]}, got {self.keep.dtype} {list(self.keep.shape)}")
        if tuple(self.means.shape) != (seq_len, n, arch.d_head):
            raise ValueError(f"mean ablation (layer {layer}): means must be [seq, n_heads, d_head] = "
                             f"{[seq_len, n, arch.d_head]}, got {list(self.means.shape)}")
        return dataclasses.replace(self, layer=layer)

    def rows(self, idx) -> "Mean":
        return dataclasses.replace(self, keep=self.keep[idx])

    def shifted(self, start: int) -> "Mean":
        return dataclasses.replace(self, keep=self.keep[:, start:], means=self.means[start:])

    def first_position(self, seq_len: int) -> torch.Tensor:
        ablated = ~self.keep.all(-1)  # [batch, seq]
        return torch.where(ablated.any(1), ablated.float().argmax(1), seq_len).cpu()

    def is_noop(self) -> bool:
        return bool(self.keep.all())

    def differs(self, other: Optional["Mean"]) -> torch.Tensor:
        """``[batch, seq]`` bool: where a run with this write differs from one with ``other`` at
        this site and layer (None: nothing written there), for :meth:`Session.predict_rows`."""
        if other is None:
            return ~self.keep.all(-1)
        if other.means is self.means or torch.equal(other.means, self.means):
            return (self.keep != other.keep).any(-1)
        return ~self.keep.all(-1) | ~other.keep.all(-1)

    def new_value(self, base: torch.Tensor) -> torch.Tensor:
        """``base`` ``[batch, pos, n_heads, d_head]`` with every head not kept replaced by its mean."""
        keep = self.keep.to(base.device)
        return torch.where(keep.unsqueeze(-1), base, self.means.to(device=base.device, dtype=base.dtype).unsqueeze(0))


#: What :func:`run` accepts as a write.
Write = Union[HeadPatch, Blend, ResidPatch, Mean]


def patch_from_cache(source: "ActivationCache", site: str, layer: int, heads: Optional[Sequence[int]],
                     positions: Optional[torch.Tensor], source_positions: Optional[torch.Tensor] = None) -> HeadPatch:
    """A :class:`HeadPatch` writing, at base ``positions``, the values ``source`` holds at
    ``source_positions`` (default: the same positions).

    ``source`` is a full-sequence cache (``positions=None`` when it was taken); ``heads`` index
    the site's head axis. With ``positions=None`` every position is copied (same lengths needed).
    """
    full = source[site, layer]
    if source.positions is not None:
        raise ValueError("patch_from_cache needs a full-sequence cache (taken with positions=None)")
    n = full.shape[2]
    hs = list(range(n)) if heads is None else [int(h) for h in heads]
    if positions is None:
        return HeadPatch(site, layer, hs, full[:, :, hs])
    src_pos = check_positions(positions if source_positions is None else source_positions, full.shape[1],
                              f"source {site} position", source.attention_mask)
    b = torch.arange(full.shape[0])[:, None]
    return HeadPatch(site, layer, hs, full[b, src_pos][:, :, hs], positions)


# --------------------------------------------------------------------------------------------
# Caches


@dataclass
class ActivationCache:
    """Activations recorded by :func:`run`, keyed by ``(site, layer)``.

    ``cache["z", 3]`` is ``[batch, pos, n_heads, d_head]`` (or ``[batch, n_pos, ...]`` when
    recorded at ``positions [batch, n_pos]``). ``attention_mask`` is that of the run.
    """

    data: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    positions: Optional[torch.Tensor] = None
    attention_mask: Optional[torch.Tensor] = None

    def __getitem__(self, key: tuple[str, int]) -> torch.Tensor:
        try:
            return self.data[key]
        except KeyError:
            have = sorted({s for s, _ in self.data})
            raise KeyError(f"no {key[0]} of layer {key[1]} in this cache (sites cached: {have})") from None

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self.data

    def keys(self):
        return self.data.keys()


@dataclass
class PatchRun:
    """What :func:`run` returns: ``logits [batch, vocab]`` at each example's last position (or
    ``[batch, seq, vocab]`` with ``all_logits=True``), the recorded activations, and with
    ``return_kv=True`` the ``past_key_values`` of each chunk run (in chunk order)."""

    logits: Optional[torch.Tensor]
    cache: ActivationCache
    kv: Optional[list[Any]] = None


def batch_chunks(n: int, batch_size: int, progress: bool, desc: str):
    size = max(1, int(batch_size or n))
    starts = range(0, n, size)
    if progress and len(starts) > 1:
        starts = tqdm(starts, desc=desc, leave=False)
    for s in starts:
        yield slice(s, min(n, s + size))


def lm_parts(lm: Any) -> tuple[Any, Arch, torch.device, dict]:
    nn = getattr(lm, "nn", lm)
    arch = getattr(lm, "arch", None)
    if arch is None:
        arch = arch_for(nn)
    device = getattr(lm, "device", None) or torch.device("cpu")
    kwargs = dict(getattr(lm, "trace_kwargs", {}) or {})
    return nn, arch, torch.device(device), kwargs


def by_first_position(first: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Chunks of ``batch_size`` row indices, latest ``first [batch]`` positions first: each chunk
    then shares a longer prefix (:class:`KVPrefix`)."""
    order = torch.sort(-first, stable=True).indices
    return [order[s: s + batch_size] for s in range(0, len(order), batch_size)]


def run(
    target: Any,
    writes: Sequence[Write] = (),
    reads: Iterable[tuple[str, int]] = (),
    *,
    batch: Optional[BatchLike] = None,
    grad: bool = False,
    positions: Optional[torch.Tensor] = None,
    logits: Optional[str] = "last",
) -> PatchRun:
    """Run a model on prompts with ``writes`` applied; record the ``reads`` sites. The one kernel
    every intervention of the book goes through.

    Args:
        target: a :class:`Session` (a model on its prompts, with what makes its runs fast), or a
            :class:`~entity_tracking.load.LoadedModel` (or an nnsight model) with ``batch``: then
            the prompts run whole, 32 at a time (the uncached oracle every session equals).
        writes: :class:`HeadPatch`, :class:`Blend`, :class:`ResidPatch`, :class:`Mean`; applied in
            forward order, in the order given where several act on one (site, layer).
        reads: ``(site, layer)`` pairs (sites of :data:`SITES`) to cache, *after* the writes.
        batch: with a model, its input ids ``[batch, seq]`` or an
            :func:`~entity_tracking.task.encode_prompts` batch.
        grad: keep the autograd graph (no ``torch.no_grad``, nothing detached; the batch runs as
            one chunk): for a learned write such as a :class:`Blend` mask.
        positions: ``[batch]`` / ``[batch, n_pos]``: cache the reads only at these positions.
        logits: ``"last"`` (``[batch, vocab]`` at each prompt's last position), ``"all"``
            (``[batch, seq, vocab]``) or None (no logits: the forward pass stops after the last
            read, since the blocks above it would change nothing that is returned).

    Returns:
        :class:`PatchRun` with ``logits`` and an :class:`ActivationCache`.

    >>> clean = run(lm, reads=[("z", 3)], batch=base)      # cache["z", 3]: [batch, seq, n_heads, d_head]
    >>> patch = patch_from_cache(clean.cache, "z", 3, [5], base["last_position"])
    >>> torch.allclose(run(lm, [patch], batch=base).logits, clean.logits)  # identity patch: the clean logits
    True
    """
    if isinstance(target, Session):
        if batch is not None:
            raise ValueError("a session runs its own prompts: pass run(session, ...) without batch=, "
                             "or run(lm, ..., batch=...)")
        session = target
    elif batch is None:
        raise ValueError("run(lm, ...) needs the prompts: batch=..., or a Session(lm, batch)")
    else:
        session = Session(target, batch, cached=False)
    return session.run(writes, reads, grad=grad, positions=positions, logits=logits)


def _execute(lm: Any, b: Mapping[str, torch.Tensor], writes: Sequence[Write], reads: Iterable[tuple[str, int]],
             record_positions: Optional[torch.Tensor] = None, *, logits: Optional[str] = "last", grad: bool = False,
             return_kv: bool = False, prefix: Optional["KVPrefix"] = None, start: Optional[int] = None,
             batch_size: Optional[int] = 32, progress: bool = False, desc: str = "patching",
             out_device: Union[str, torch.device] = "cpu", trace_kwargs: Optional[dict] = None,
             skip_layers: Iterable[int] = (), skip_value: Any = None) -> PatchRun:
    """The kernel's schedule, for :class:`Session` alone: run ``b`` (an :func:`as_batch` batch) in
    chunks of ``batch_size`` rows (None: one chunk; one chunk also with ``grad`` or
    ``trace_kwargs``: extra forward keyword arguments such as a key/value cache).

    ``prefix``: a :class:`KVPrefix` of these prompts: each chunk runs only its positions from
    ``start`` (default: the earliest position a write touches in the chunk; lowered as
    :meth:`KVPrefix.suffix` requires) with the prefix's keys and values, and gets the whole
    run's last-position logits. Rows run latest start first (in one chunk, as given: with
    ``grad``, ``batch_size=None``, or a given ``start`` and one chunk's rows).
    ``skip_layers``, ``skip_value``: blocks not run at all; each outputs ``skip_value``
    ``[batch, seq, d_model]`` (or a function of a chunk's rows giving theirs) instead, what the
    first block after them reads (with a ``prefix``, cut to the positions run). Writes and reads
    must lie above them. ``return_kv``: also each chunk's ``past_key_values``."""
    nn, arch, device, tkw = lm_parts(lm)
    if logits not in ("last", "all", None):
        raise ValueError(f"logits must be 'last', 'all' or None, got {logits!r}")
    all_logits, want_logits = logits == "all", logits is not None
    ids, mask = b["input_ids"], b["attention_mask"]
    B, S = ids.shape
    last = check_positions(b["last_position"], S, "last position", mask)[:, 0]
    rpos = None if record_positions is None else check_positions(record_positions, S, "record position", mask)
    writes = [w.resolved(arch, B, S) for w in writes]
    reads = [(s, arch.layer_index(l)) for s, l in reads]
    for s, _ in reads:
        if s not in SITES:
            raise ValueError(f"cannot record site '{s}'; sites are {SITES}")
    skip_layers = sorted(arch.layer_index(l) for l in skip_layers)
    if skip_layers and (skip_value is None or not callable(skip_value)
                        and tuple(skip_value.shape) != (B, S, arch.d_model)):
        raise ValueError(f"skipping blocks needs skip_value [batch, seq, d_model] = {[B, S, arch.d_model]}")
    if prefix is not None and (reads or all_logits or not want_logits or trace_kwargs):
        raise ValueError("a run from a cached prefix returns last-position logits only (no reads, all_logits, "
                         "logits=False or trace_kwargs)")
    if start is not None and prefix is None:
        raise ValueError(f"start={start} says where a run from a cached prefix begins: pass the prefix too")
    pad_free = bool((mask == 1).all())  # then no chunk passes a mask
    kw = {**tkw, **(trace_kwargs or {})}
    if return_kv:
        kw["use_cache"] = True

    def chunk(rows, first: Optional[int]) -> tuple[Optional[torch.Tensor], dict, Any]:
        cw = [w.rows(rows) for w in writes]
        cids, cmask, clast = ids[rows], None if pad_free else mask[rows], last[rows]
        cskip = None if not skip_layers else skip_value(rows) if callable(skip_value) else skip_value[rows]
        crpos = None if rpos is None else rpos[rows]
        ckw = kw
        st = 0
        if first is not None:
            st, extra = prefix.take(rows).suffix(len(cids), S, first)
            if st:
                cw = [w.shifted(st) for w in cw]
                cids, cmask, clast = cids[:, st:], None, clast - st
                cskip = None if cskip is None else cskip[:, st:]
                ckw = {**kw, **extra}
        return _trace(nn, arch, device, cids, cmask, clast, cw, reads, crpos, cskip, skip_layers, ckw,
                      all_logits=all_logits, logits=want_logits, grad=grad, return_kv=return_kv,
                      out_device=out_device)

    context = contextlib.nullcontext() if grad else torch.no_grad()
    pieces: dict[tuple[str, int], list[torch.Tensor]] = {(s, l): [] for s, l in reads}
    logit_pieces: list[torch.Tensor] = []
    kvs: list[Any] = []
    with context:
        if prefix is not None:
            firsts = torch.full((B,), S if start is None else int(start), dtype=torch.long)
            for w in writes if start is None else ():
                firsts = torch.minimum(firsts, w.first_position(S))
            parts = [slice(None)] if grad or not batch_size or batch_size >= B and start is not None \
                else by_first_position(firsts, batch_size)
            if progress and len(parts) > 1:
                parts = tqdm(parts, desc=desc, leave=False)
            out = None
            for rows in parts:
                lg, _, kv = chunk(rows, int(firsts[rows].min()))
                if out is None and not isinstance(rows, slice):
                    out = lg.new_zeros(B, lg.shape[-1])
                if isinstance(rows, slice):  # one chunk in the given order
                    out = lg
                else:
                    out[rows.to(out.device)] = lg
                kvs.append(kv)
            return PatchRun(out, ActivationCache({}, attention_mask=mask), kvs if return_kv else None)
        size = B if (trace_kwargs or grad or not batch_size) else batch_size
        for sl in batch_chunks(B, size, progress, desc):
            lg, saved, kv = chunk(sl, None)
            for k, v in saved.items():
                pieces[k].append(v)
            if want_logits:
                logit_pieces.append(lg)
            kvs.append(kv)
    cache = ActivationCache({k: torch.cat(v) for k, v in pieces.items()}, positions=rpos, attention_mask=mask)
    return PatchRun(torch.cat(logit_pieces) if want_logits else None, cache, kvs if return_kv else None)


def _trace(nn: Any, arch: Arch, device: torch.device, ids: torch.Tensor, mask: Optional[torch.Tensor],
           last: torch.Tensor, writes: list, reads: list, rpos: Optional[torch.Tensor],
           skip_value: Optional[torch.Tensor], skip_layers: list[int], kw: dict, *, all_logits: bool,
           logits: bool, grad: bool, return_kv: bool, out_device) -> tuple[Optional[torch.Tensor], dict, Any]:
    """One nnsight trace of one chunk: ``(logits, {(site, layer): value}, past_key_values)``.
    ``mask`` None runs without an attention mask."""
    writes = [w for w in writes if not w.is_noop()]
    steps = sorted({(w.layer, w.site) for w in writes} | {(l, s) for s, l in reads},
                   key=lambda ls: (ls[0], _ORDER[ls[1]]))
    if skip_layers and steps and steps[0][0] <= skip_layers[-1]:
        raise ValueError(f"write/read at layer {steps[0][0]} lies in the skipped blocks {skip_layers}")
    by_step = {k: [w for w in writes if (w.layer, w.site) == k] for k in steps}
    wanted = {(l, s) for s, l in reads}
    S = ids.shape[1]
    inputs = {"input_ids": ids.to(device)}
    if mask is not None:
        inputs["attention_mask"] = mask.to(device)
    bi = torch.arange(ids.shape[0], device=device)
    clast = last.to(device)
    crpos = None if rpos is None else rpos.to(device)
    saved: dict[tuple[str, int], Any] = {}
    out_box: list[Any] = []
    with nn.trace(inputs, **kw) as tracer:
        for layer in skip_layers:
            arch.layer(nn, layer).skip(skip_value.to(device))
        for (layer, site) in steps:
            cur = arch.read(nn, site, layer)
            if by_step[(layer, site)]:
                for w in by_step[(layer, site)]:
                    cur = w.new_value(cur)
                arch.write(nn, site, layer, cur)
            if (layer, site) in wanted:
                val = cur if crpos is None else cur[bi[:, None], crpos]
                saved[(site, layer)] = val.detach().to(out_device).save()
        if logits:
            lg = nn.output.logits
            if not all_logits:  # logits_to_keep=n leaves only the last n positions
                lg = lg[bi, clast - (S - lg.shape[1])]
            out_box.append((lg if grad else lg.detach()).to(out_device).save())
        elif steps and not return_kv:
            tracer.stop()  # nothing above the last recorded site is returned
        if return_kv:
            out_box.append(nn.output.past_key_values.save())
    lg = out_box[0] if logits else None
    return lg, saved, (out_box[-1] if return_kv else None)


# --------------------------------------------------------------------------------------------
# Running only a suffix, from a cached prefix

#: A run over a suffix keeps at least this many rows x tokens: below it the CPU's matrix kernels
#: (MKL's sgemm, measured from d_model 32 to 11008) switch code path and its rows stop matching
#: the whole run's bit for bit; at or above it they match exactly on the Intel CPUs we measured
#: (on an AMD EPYC, MKL's AVX2 path, a few float32 ulps apart at 24 rows). It also keeps two
#: tokens: a single query token takes another attention kernel.
MIN_SUFFIX_ROWS = 16


#: Bytes a prompts' cached prefix (:meth:`KVPrefix.for_prompts`) may take; beyond it runs go whole.
PREFIX_BUDGET = 1 << 30


@dataclass
class KVPrefix:
    """Every layer's keys and values ``[batch, n_kv_heads, start, d_head]`` (after rotary
    embeddings, as the model caches them) for the first ``start`` positions of a batch of prompts.

    An intervention at position ``p`` changes nothing before ``p`` (attention is causal), so
    repeated runs that differ only from ``p`` on can share the work on the prefix: the prefix is
    taken once from **whole** runs (:meth:`of_runs`; a run over the prefix alone would compute
    its attention with other kernel shapes), and each run then feeds only the tokens from the
    start with this cache (:meth:`suffix`), getting the whole run's logits -- and gradients --
    bit for bit on the Intel CPUs we measured, to a few float32 ulps on others
    (:data:`MIN_SUFFIX_ROWS`).
    """

    start: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    config: Any = None

    @staticmethod
    def fits(lm: Any, n: int, start: int, budget: int) -> bool:
        """Whether ``n`` prompts' prefix of ``start`` tokens takes at most ``budget`` bytes."""
        _, a, _, _ = lm_parts(lm)
        dtype = getattr(lm, "dtype", torch.float32)
        return n * a.n_layers * 2 * a.n_kv_heads * start * a.d_head * torch.finfo(dtype).bits // 8 <= budget

    @classmethod
    def of_runs(cls, caches: Sequence[Any], start: int, seq: int, config: Any) -> Optional["KVPrefix"]:
        """The first ``start`` positions of the ``past_key_values`` of whole runs (``seq`` tokens)
        over consecutive chunks of the prompts; None when a layer kept fewer keys than the run had
        tokens (a sliding attention window dropped early ones)."""
        n_layers = len(caches[0].layers)
        keys: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        values: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        for cache in caches:
            for l, layer in enumerate(cache.layers):
                if layer.keys.shape[-2] != seq:
                    return None
                keys[l].append(layer.keys[:, :, :start])
                values[l].append(layer.values[:, :, :start])
        return cls(start, [torch.cat(k) for k in keys], [torch.cat(v) for v in values], config)

    @classmethod
    def clean(cls, lm: Any, batch: BatchLike, start: int, *, batch_size: int = 32) -> Optional["KVPrefix"]:
        """The prefix of ``batch`` (unpadded) before ``start``, from whole runs of the model as it is."""
        b = as_batch(batch)
        nn, arch, device, _ = lm_parts(lm)
        res = _execute(lm, b, (), (), logits=None, return_kv=True, batch_size=batch_size, out_device=device)
        return cls.of_runs(res.kv, start, int(b["input_ids"].shape[1]), arch.torch_module(nn).config)

    @classmethod
    def for_prompts(cls, lm: Any, batch: BatchLike, *, batch_size: int = 32,
                    budget: Optional[int] = None) -> Optional["KVPrefix"]:
        """The clean prefix of ``batch`` before its last two tokens, which any run of these
        prompts that writes only from there on, or from any later position, can start from;
        None where it cannot serve: padded prompts, more than ``budget`` bytes (default
        :data:`PREFIX_BUDGET`), a sliding attention window."""
        b = as_batch(batch)
        n, seq = b["input_ids"].shape
        budget = PREFIX_BUDGET if budget is None else budget
        if n == 0 or seq < 3 or not bool((b["attention_mask"] == 1).all()) or not cls.fits(lm, n, seq - 2, budget):
            return None
        return cls.clean(lm, b, seq - 2, batch_size=batch_size)

    def take(self, idx) -> "KVPrefix":
        """The prefix of the prompts ``idx`` (indices or a slice)."""
        return KVPrefix(self.start, [k[idx] for k in self.keys], [v[idx] for v in self.values], self.config)

    def suffix(self, n_rows: int, seq: int, start: Optional[int] = None) -> tuple[int, dict[str, Any]]:
        """``(start, forward keyword arguments)`` to run ``n_rows`` rows of these prompts
        (``seq`` tokens long) from ``start`` (default: this prefix's) on: the cache and the
        position ids. ``start`` is lowered to leave at least :data:`MIN_SUFFIX_ROWS` rows x tokens
        and two tokens; 0 means run the rows whole (and no keyword arguments)."""
        start = min(self.start if start is None else start, seq - max(2, math.ceil(MIN_SUFFIX_ROWS / max(n_rows, 1))))
        if start < 1:
            return 0, {}
        device = self.keys[0].device
        cache = DynamicCache([(k[:, :, :start], v[:, :, :start]) for k, v in zip(self.keys, self.values)],
                             config=self.config)
        return start, {"past_key_values": cache,
                       "position_ids": torch.arange(start, seq, device=device).expand(n_rows, seq - start)}


# --------------------------------------------------------------------------------------------
# The session: one model on one batch of prompts, and what makes many runs on them fast

_UNSET = object()

#: Sites every layer of a session's kept clean run holds (:meth:`Session.clean_state`).
STATE_SITES: tuple[str, ...] = ("resid_pre", "z", "attn_out", "resid_post")


class Session:
    """One model on one batch of prompts, and everything that makes many runs on them fast.

    A method says what to write and what to read, ``run(session, writes, reads)``; the session
    decides how to run it. An intervention at position ``p`` of layer ``l`` changes nothing
    before ``p`` (attention is causal) and nothing below ``l``, so a run shares those parts with
    a run that differs only from there on. With ``cached=True`` the session uses that:

    * **a late start**: a run that writes heads runs only its positions from the earliest one its
      writes touch (:meth:`HeadPatch.first_position`), from the prompts' clean keys and values
      before their last two tokens (:attr:`prefix`, made on first use), with the whole run's
      last-position logits (and gradients);
    * **skipped blocks**: a run that overwrites the residual stream (:class:`ResidPatch`) where
      the session holds the clean run's value (:meth:`clean`) does not run the blocks below it:
      the first block above reads the clean residual stream with the write in it;
    * **reference runs** (:meth:`predict_rows`): many runs of the prompts, each sharing its first
      positions (and blocks) with one of a few whole runs made once.

    Rows run ``batch_size`` at a time (None: all at once). A session over some of the prompts
    (:meth:`rows`, repeats allowed) shares what this one has made, and :meth:`tile` repeats each
    of them for several runs at once from the clean run kept whole (:meth:`clean_state`), which
    is path patching's second pass. ``cached=False`` (the default) runs every position of every
    row through every block: the oracle the cached runs are tested against.

    Args:
        lm: a :class:`~entity_tracking.load.LoadedModel` (or an nnsight model).
        batch: input ids ``[batch, seq]`` or an :func:`~entity_tracking.task.encode_prompts` batch.
        out_device: where logits and reads are returned.
        budget: bytes the session may keep of the clean run (default :data:`PREFIX_BUDGET`).

    >>> session = Session(lm, pairs["base"], cached=True)  # the clean prefix is made on the first run
    >>> patch = HeadPatch("z", 1, [3], values, pairs["base"]["last_position"])
    >>> fast = run(session, [patch]).logits  # the positions before the last two run once, for every run
    >>> torch.allclose(fast, run(lm, [patch], batch=pairs["base"]).logits, atol=1e-5)  # the uncached oracle
    True
    """

    def __init__(self, lm: Any, batch: BatchLike, *, batch_size: Optional[int] = 32, cached: bool = False,
                 out_device: Union[str, torch.device] = "cpu", progress: bool = False, desc: str = "patching",
                 budget: Optional[int] = None):
        self.lm = lm
        self.batch = as_batch(batch)
        self.batch_size, self.cached, self.out_device = batch_size, cached, out_device
        self.progress, self.desc = progress, desc
        self.budget = PREFIX_BUDGET if budget is None else budget
        self._parent: Optional[Session] = None
        self._index: Optional[torch.Tensor] = None
        self._repeat = 1
        self._prefix: Any = _UNSET
        self._clean: dict[tuple[str, int], torch.Tensor] = {}
        self._state: Any = _UNSET
        self._rows_kept: Any = _UNSET

    @property
    def n(self) -> int:
        """How many rows (prompts) the session runs."""
        return int(self.batch["input_ids"].shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.batch["input_ids"].shape[1])

    def _options(self) -> dict[str, Any]:
        return dict(batch_size=self.batch_size, progress=self.progress, desc=self.desc, out_device=self.out_device)

    def _pad_free(self) -> bool:
        return bool((self.batch["attention_mask"] == 1).all())

    # -- sub-sessions ----------------------------------------------------------------------

    def rows(self, index) -> "Session":
        """A session over rows ``index`` (indices, repeats allowed, or a slice) of these prompts,
        sharing what this session has made (its prefix, clean reads and clean run)."""
        index = torch.arange(self.n)[index] if isinstance(index, slice) else torch.as_tensor(index, dtype=torch.long)
        sub = Session(self.lm, {k: v[index.to(v.device)] if isinstance(v, torch.Tensor) and v.shape[:1] == (self.n,)
                                else v for k, v in self.batch.items()},
                      batch_size=self.batch_size, cached=self.cached, out_device=self.out_device,
                      progress=self.progress, desc=self.desc, budget=self.budget)
        sub._parent, sub._index = self, index
        return sub

    def tile(self, k: int) -> "Session":
        """These rows, each repeated ``k`` times (row-major: row ``i * k + j`` is copy ``j`` of row
        ``i``), for ``k`` runs of each prompt in one forward pass that all start at one position.
        Its runs start exactly at their writes' first position, from this session's clean run
        (:meth:`clean_state`, else one clean pass over these rows), and skip the blocks below
        their first write, which read the clean residual stream."""
        sub = self.rows(torch.arange(self.n).repeat_interleave(k))
        sub._repeat = k
        return sub

    # -- what the session keeps --------------------------------------------------------------

    @property
    def prefix(self) -> Optional["KVPrefix"]:
        """The clean keys and values of the prompts before their last two tokens
        (:meth:`KVPrefix.for_prompts`), made on first use; None uncached or where it cannot serve
        (padded prompts, more than ``budget`` bytes, a sliding attention window)."""
        if self._prefix is _UNSET:
            if self._parent is not None:
                p = self._parent.prefix
                self._prefix = None if p is None else p.take(self._index)
            elif self.cached:
                self._prefix = KVPrefix.for_prompts(self.lm, self.batch, batch_size=self.batch_size,
                                                    budget=self.budget)
            else:
                self._prefix = None
        return self._prefix

    def clean(self, reads: Iterable[tuple[str, int]]) -> "PatchRun":
        """The clean run (nothing written) with ``reads`` recorded; a cached session keeps them,
        so that later runs writing the residual stream there skip the blocks below."""
        res = _execute(self.lm, self.batch, (), list(reads), **self._options())
        if self.cached:
            self._clean.update(res.cache.data)
        return res

    def _clean_rows(self, key: tuple[str, int], rows) -> Optional[torch.Tensor]:
        """The kept clean value at ``key`` for rows ``rows`` of this session (None if not kept)."""
        if key in self._clean:
            return self._clean[key][rows]
        if self._parent is None:
            return None
        return self._parent._clean_rows(key, self._index[rows])

    def clean_state(self) -> Optional[dict[str, list[torch.Tensor]]]:
        """The clean run of every prompt kept whole (made once, ``batch_size`` prompts at a time),
        or None beyond ``budget`` bytes: per layer the keys and values ``[batch, n_kv_heads, seq,
        d_head]`` (the model's cache: after rotary embeddings), :data:`STATE_SITES` (``z``
        ``[batch, seq, n_heads, d_head]``, the others ``[batch, seq, d_model]``) and the
        last-position ``logits``."""
        if self._parent is not None:
            st = self._parent.clean_state()
            return None if st is None else {k: [t[self._index.to(t.device)] for t in v] for k, v in st.items()}
        if self._state is _UNSET:
            self._state = None
            if self._state_bytes() <= self.budget:
                parts = [self._clean_pass(torch.arange(sl.start, sl.stop))
                         for sl in batch_chunks(self.n, self.batch_size or self.n, False, "")]
                self._state = {key: [torch.cat([p[key][l] for p in parts]) for l in range(len(parts[0][key]))]
                               for key in parts[0]}
        return self._state

    def _state_bytes(self) -> int:
        _, a, _, _ = lm_parts(self.lm)
        nb = torch.finfo(next(a.torch_module(self.lm).parameters()).dtype).bits // 8
        per_token = 2 * a.n_kv_heads * a.d_head + 3 * a.d_model + a.n_heads * a.d_head
        return self.n * a.n_layers * self.seq_len * per_token * nb

    def _clean_pass(self, rows: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """One clean forward of ``rows``: :meth:`clean_state`'s entries for them."""
        _, a, _, _ = lm_parts(self.lm)
        L, S = a.n_layers, self.seq_len
        res = _execute(self.lm, as_batch(self.batch["input_ids"][rows.cpu()]),
                       (), [(s, l) for l in range(L) for s in STATE_SITES], return_kv=True, batch_size=None,
                       out_device=self.out_device, trace_kwargs={"logits_to_keep": 1})
        got: dict[str, list] = {s: [res.cache[s, l] for l in range(L)] for s in STATE_SITES}
        layers = res.kv[0].layers
        short = [l for l, layer in enumerate(layers) if layer.keys.shape[-2] != S]
        if short:  # a sliding-window layer dropped early keys: the prefix cannot be cut from it
            raise NotImplementedError(
                f"prompts of {S} tokens exceed the sliding attention window of layer {short[0]}; a run "
                f"from the clean keys and values needs every key: run uncached")
        got["k"] = [layer.keys for layer in layers]
        got["v"] = [layer.values for layer in layers]
        got["logits"] = [res.logits]
        return got

    def _rows_state(self) -> dict[str, list[torch.Tensor]]:
        """The clean keys, values and block outputs of this session's rows: from the kept clean
        run of the session they come from, else from one clean pass over them (kept)."""
        if self._rows_kept is _UNSET:
            root, index = self, torch.arange(self.n)
            while root._parent is not None:
                root, index = root._parent, root._index[index]
            st = root.clean_state()
            if st is None:
                self._rows_kept = self._clean_pass(torch.arange(self.n))
            else:
                self._rows_kept = {k: [t[index.to(t.device)] for t in st[k]] for k in ("k", "v", "resid_post")}
        return self._rows_kept

    # -- running -------------------------------------------------------------------------------

    def run(self, writes: Sequence[Write] = (), reads: Iterable[tuple[str, int]] = (), *, grad: bool = False,
            positions: Optional[torch.Tensor] = None, logits: Optional[str] = "last") -> "PatchRun":
        """:func:`run` on this session's prompts (see the class docstring for how)."""
        writes, reads = list(writes), list(reads)
        if self._repeat > 1:
            return self._run_tiled(writes, reads, grad, positions, logits)
        late = self.cached and logits == "last" and not reads
        if any(isinstance(w, ResidPatch) for w in writes):
            skipped = self._run_skipping(writes) if late and not grad else None
            if skipped is not None:
                return skipped
            late = False  # a residual write skips blocks or runs whole, it never starts late
        return _execute(self.lm, self.batch, writes, reads, positions, logits=logits, grad=grad,
                        prefix=self.prefix if late else None, **self._options())

    def _run_skipping(self, writes: list) -> Optional["PatchRun"]:
        """One residual write run from the kept clean residual stream at its site and layer, the
        blocks below it not run; None where that is not possible."""
        _, a, _, _ = lm_parts(self.lm)
        if len(writes) != 1:
            return None
        w = writes[0].resolved(a, self.n, self.seq_len)
        below = range(w.layer + 1 if w.site == "resid_post" else w.layer)
        if not below or self._clean_rows((w.site, w.layer), slice(0, 1)) is None:
            return None

        def skip_value(rows):
            return w.rows(rows).new_value(self._clean_rows((w.site, w.layer), rows))

        return _execute(self.lm, self.batch, (), (), skip_layers=below, skip_value=skip_value, **self._options())

    def _run_tiled(self, writes: list, reads: list, grad: bool, positions, logits) -> "PatchRun":
        """A tiled session's run (:meth:`tile`): last-position logits only."""
        if reads or grad or positions is not None or logits != "last" or not writes:
            raise ValueError("a tiled session runs writes for last-position logits only")
        nn, a, device, _ = lm_parts(self.lm)
        S = self.seq_len
        first_pos = int(min(int(w.first_position(S).min()) for w in writes))
        first = min(a.layer_index(w.layer) for w in writes)
        st = self._parent._rows_state()
        k = self._repeat
        suffix = self.batch["input_ids"][:, first_pos:].to(device)
        rows, T = suffix.shape
        kw: dict[str, Any] = {"position_ids": torch.arange(first_pos, first_pos + T, device=device).expand(rows, T),
                              "logits_to_keep": 1}
        if first_pos > 0:
            # blocks below the first write are skipped: their layers keep the untiled prefix (never
            # read; it only gives the cache its length), so the tiling copy is made only where
            # attention will read it
            cache = DynamicCache([(kk[:, :, :first_pos], vv[:, :, :first_pos]) for kk, vv in zip(st["k"], st["v"])],
                                 config=a.torch_module(self.lm).config)
            for l, layer in enumerate(cache.layers):
                if l >= first:
                    layer.batch_repeat_interleave(k)
            kw["past_key_values"] = cache
        skip = st["resid_post"][first - 1][:, first_pos:].repeat_interleave(k, 0) if first > 0 else None
        return _execute(self.lm, as_batch(suffix), [w.shifted(first_pos) for w in writes], (),
                        trace_kwargs=kw, out_device=self.out_device,
                        skip_layers=range(first) if first > 0 else (), skip_value=skip)

    def predict_rows(self, prompts: torch.Tensor, writes: Callable[[torch.Tensor], Sequence[Write]],
                     like: Sequence[Callable[[torch.Tensor], Sequence[Write]]] = ()) -> torch.Tensor:
        """The argmax token ``[R]`` at the last position of ``R`` runs: row ``r`` runs prompt
        ``prompts[r]`` with the writes ``writes(rows)`` makes for a chunk of rows (their batch axis
        the chunk's rows). Rows run ``batch_size`` at a time.

        Cached, with prompts of one length, rows share work with whole *reference* runs of the
        prompts: the clean run and each of ``like`` (``like[i](prompts)`` makes its writes for some
        prompts, e.g. every head mean-ablated). Each row follows the reference its writes agree
        with over the most leading positions (:meth:`Mean.differs`; the clean run on a tie); a
        reference is run, once, when the positions it spares its rows (and, for the clean run, the
        blocks below a row's first write) outweigh its own cost. Rows then run in chunks that share
        the most, each only from its first differing position, from the reference's keys and
        values, and above its first differing block, from the reference's block outputs: the same
        logits as the whole runs (see :class:`KVPrefix`)."""
        nn, a, device, _ = lm_parts(self.lm)
        n, seq, L = self.n, self.seq_len, a.n_layers
        R, bs = int(prompts.shape[0]), int(self.batch_size or prompts.shape[0])
        chunks = [torch.arange(s, min(R, s + bs)) for s in range(0, R, bs)]
        length = layers = kind = None
        refs: dict[int, tuple[Optional[KVPrefix], list[torch.Tensor]]] = {}
        if self.cached and self._pad_free():
            length, layers, kind = self._agreement(prompts, writes, like)
            length, layers = length.clamp(max=seq - 2), layers.clamp(max=L - 1)
            width = torch.finfo(next(a.torch_module(self.lm).parameters()).dtype).bits // 8
            for k in range(len(like) + 1):  # a reference pays off when its rows skip more of the model than it runs
                mine = kind == k
                start = int(length[mine].max()) if bool(mine.any()) else 0
                saved = int((length[mine] * L + (seq - length[mine]) * layers[mine]).sum())
                size = n * L * (2 * a.n_kv_heads * a.d_head * start + seq * a.d_model) * width  # keys, values, blocks
                if saved > n * seq * L and size <= self.budget // 2:
                    ref = self._reference(like[k - 1] if k else None, start)
                    if ref[0] is not None:
                        refs[k] = ref
            # rows of one reference run together, those sharing the most first; the rest as given
            group = torch.tensor([k if k in refs and (int(l) > 0 or int(b) > 0) else -1
                                  for k, l, b in zip(kind.tolist(), length, layers)])
            length = torch.where(group >= 0, length, torch.zeros_like(length))
            layers = torch.where(group >= 0, layers, torch.zeros_like(layers))
            chunks = []
            for g in (*range(len(like) + 1), -1):
                rows = (group == g).nonzero()[:, 0]
                rows = rows[torch.sort(-(length[rows] * (L + 1) + layers[rows]), stable=True).indices]
                chunks += [rows[s: s + bs] for s in range(0, len(rows), bs)]
        b = self.batch
        predicted = torch.zeros(R, dtype=torch.long)
        it = tqdm(chunks, desc=self.desc, total=len(chunks)) if self.progress else chunks
        for rows in it:
            ex = prompts[rows]
            prefix, start, n_skip, skip = None, None, 0, None
            if length is not None and int(kind[rows[0]]) in refs and \
                    (int(length[rows].min()) > 0 or int(layers[rows].min()) > 0):
                ref, resid = refs[int(kind[rows[0]])]
                if int(length[rows].min()) > 0:
                    prefix, start = ref.take(ex), int(length[rows].min())
                n_skip = int(layers[rows].min())
                if n_skip:
                    skip = resid[n_skip - 1][ex]
            ws = [w for w in writes(rows) if a.layer_index(w.layer) >= n_skip]
            chunk = {"input_ids": b["input_ids"][ex], "attention_mask": b["attention_mask"][ex],
                     "last_position": b["last_position"][ex]}
            logits = _execute(self.lm, chunk, ws, (), prefix=prefix, start=start, batch_size=None,
                              out_device=self.out_device, skip_layers=range(n_skip), skip_value=skip).logits
            predicted[rows] = logits.argmax(-1).cpu()
        return predicted

    def _agreement(self, prompts: torch.Tensor, writes: Callable, like: Sequence[Callable]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row, in order: ``(length, layers, kind)``, each ``[R]``: the reference it follows
        (``kind`` 0 the clean run, ``i`` the run of ``like[i - 1]``), how many leading positions
        it runs as that reference does and (the clean run only) how many leading blocks."""
        _, a, _, _ = lm_parts(self.lm)
        n, seq, L = self.n, self.seq_len, a.n_layers
        R = int(prompts.shape[0])

        def first(mask: torch.Tensor, none: int) -> torch.Tensor:  # first True per row of [rows, k]
            return torch.where(mask.any(1), mask.float().argmax(1), none)

        lengths, layers, kinds = [], [], []
        for s in range(0, R, n):
            rows = torch.arange(s, min(R, s + n))
            ws = {(w.site, a.layer_index(w.layer)): w for w in writes(rows)}
            differ = [_differs(w, None) for w in ws.values()]
            clean = first(torch.stack(differ).any(0), seq) if differ else torch.full((len(rows),), seq)
            touched = torch.zeros(len(rows), L, dtype=torch.bool)
            for (_, l), d in zip(ws, differ):
                touched[:, l] |= d.any(1)
            candidates = [clean]
            for ref in like:
                rws = {(w.site, a.layer_index(w.layer)): w for w in ref(prompts[rows])}
                d = torch.stack([_differs(ws.get(key), rws.get(key)) for key in {**ws, **rws}]).any(0)
                candidates.append(first(d, seq))
            cand = torch.stack(candidates)  # [refs, rows]
            kind = torch.zeros(len(rows), dtype=torch.long)
            for k in range(1, len(candidates)):  # the clean run on a tie
                kind = torch.where(cand[k] > cand.gather(0, kind[None])[0], k, kind)
            lengths.append(cand.gather(0, kind[None])[0])
            layers.append(torch.where(kind == 0, first(touched, L), torch.zeros(len(rows), dtype=torch.long)))
            kinds.append(kind)
        return torch.cat(lengths), torch.cat(layers), torch.cat(kinds)

    def _reference(self, like: Optional[Callable], start: int) -> tuple[Optional["KVPrefix"], list[torch.Tensor]]:
        """The prompts' :class:`KVPrefix` before ``start`` from whole runs with ``like``'s writes
        (None: the clean run), ``batch_size`` prompts at a time, and every block's output
        ``[n, seq, d_model]`` in those runs."""
        nn, a, _, _ = lm_parts(self.lm)
        n, seq = self.n, self.seq_len
        b, bs = self.batch, int(self.batch_size or n)
        caches, resid = [], []
        for s in range(0, n, bs):
            rows = torch.arange(s, min(n, s + bs))
            chunk = {"input_ids": b["input_ids"][s: s + bs], "attention_mask": b["attention_mask"][s: s + bs],
                     "last_position": b["last_position"][s: s + bs]}
            res = _execute(self.lm, chunk, [] if like is None else like(rows),
                           [("resid_post", l) for l in range(a.n_layers)], return_kv=True, batch_size=None,
                           out_device=self.out_device)
            caches.append(res.kv[0])
            resid.append([res.cache["resid_post", l] for l in range(a.n_layers)])
        resid = [torch.cat([r[l] for r in resid]) for l in range(a.n_layers)]
        return KVPrefix.of_runs(caches, max(start, 1), seq, a.torch_module(nn).config), resid


def _differs(write: Any, reference: Any) -> torch.Tensor:
    """``[batch, seq]`` bool: where a run with ``write`` at one (site, layer) differs from one with
    ``reference`` there (None: nothing written)."""
    if write is None:
        write, reference = reference, None
    if not hasattr(write, "differs"):
        raise TypeError(f"{type(write).__name__} cannot be compared with a reference run; only Mean can")
    return write.differs(reference)


# --------------------------------------------------------------------------------------------
# Convenience wrappers and metrics


def last_logits(lm: Any, batch: BatchLike, patches: Sequence[HeadPatch] = (), *, batch_size: int = 32,
                progress: bool = False) -> torch.Tensor:
    """Logits ``[batch, vocab]`` at each example's last position, with ``patches`` applied."""
    return run(Session(lm, batch, batch_size=batch_size, progress=progress, desc="logits"), patches).logits


def cache_activations(lm: Any, batch: BatchLike, sites: Iterable[str] = ("z",),
                      layers: Optional[Iterable[int]] = None, *, positions: Optional[torch.Tensor] = None,
                      patches: Sequence[HeadPatch] = (), batch_size: int = 32, progress: bool = False,
                      with_logits: bool = False) -> Union[ActivationCache, tuple[ActivationCache, torch.Tensor]]:
    """Cache ``sites`` (default the head outputs ``z``) of ``layers`` (default all).

    Returns an :class:`ActivationCache`: ``cache["z", l]`` is ``[batch, pos, n_heads, d_head]``
    (``[batch, n_pos, ...]`` with ``positions [batch, n_pos]``). With ``with_logits`` also the
    last-position logits ``[batch, vocab]`` of the same run.
    """
    _, arch, _, _ = lm_parts(lm)
    layers = range(arch.n_layers) if layers is None else list(layers)
    record = [(s, l) for l in layers for s in sites]
    res = run(Session(lm, batch, batch_size=batch_size, progress=progress, desc="caching"), patches, record,
              positions=positions, logits="last" if with_logits else None)
    return (res.cache, res.logits) if with_logits else res.cache


def target_probs(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Probability ``[batch]`` of ``target [batch]`` under ``softmax(logits [batch, vocab])``
    (computed in float32)."""
    target = torch.as_tensor(target, dtype=torch.long, device=logits.device)
    if target.shape != logits.shape[:1]:
        raise ValueError(f"targets {tuple(target.shape)} do not match logits {tuple(logits.shape)}")
    if (target < 0).any() or (target >= logits.shape[-1]).any():
        raise IndexError(f"target ids must lie in [0, {logits.shape[-1]}); got {target.min().item()}..{target.max().item()}")
    return logits.float().softmax(-1).gather(-1, target[:, None])[:, 0]


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Share of examples whose argmax at the last position is ``target``."""
    target = torch.as_tensor(target, dtype=torch.long, device=logits.device)
    return float((logits.argmax(-1) == target).float().mean())
