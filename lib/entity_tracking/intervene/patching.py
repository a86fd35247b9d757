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

The same call records sites (``reads``), keeps the autograd graph (``grad=True``, DCM's
training), returns the keys and values (``return_kv=True``) and runs only the positions after a
cached prefix (``prefix``, :class:`KVPrefix`); path patching, mean ablation, DCM, CMAP, binding
and the attention patterns differ only in the writes they pass and where the values come from.

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
    >>> run(lm, batch, [zero]).logits  # head 1.3 silenced at each prompt's last token
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
    >>> logits = run(lm, base, [Blend("z", 3, [0, 5], source_z, pos, m)], grad=True).logits
    >>> logits[:, target].sum().backward()  # m.grad: how each head's blend moves the target
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
    >>> run(lm, base, [ResidPatch("resid_post", 2, src)]).logits  # = the source run's logits
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
    >>> run(lm, batch, [Mean(0, keep, means[0])]).logits  # head 0.2 mean-ablated everywhere
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
    lm: Any,
    batch: BatchLike,
    writes: Sequence[Write] = (),
    reads: Iterable[tuple[str, int]] = (),
    *,
    record: Optional[Iterable[tuple[str, int]]] = None,
    record_positions: Optional[torch.Tensor] = None,
    all_logits: bool = False,
    logits: bool = True,
    grad: bool = False,
    return_kv: bool = False,
    prefix: Optional["KVPrefix"] = None,
    start: Optional[int] = None,
    batch_size: Optional[int] = 32,
    progress: bool = False,
    desc: str = "patching",
    out_device: Union[str, torch.device] = "cpu",
    trace_kwargs: Optional[dict] = None,
    skip_layers: Iterable[int] = (),
    skip_value: Optional[torch.Tensor] = None,
) -> PatchRun:
    """Run ``lm`` on ``batch`` with ``writes`` applied; record the ``reads`` sites. The one
    kernel every intervention of the book goes through.

    Args:
        lm: a :class:`~entity_tracking.load.LoadedModel` (or an nnsight model).
        batch: input ids ``[batch, seq]`` or an :func:`~entity_tracking.task.encode_prompts` batch.
        writes: :class:`HeadPatch`, :class:`Blend`, :class:`ResidPatch`, :class:`Mean`; applied in
            forward order, in the order given where several act on one (site, layer).
        reads: ``(site, layer)`` pairs (sites of :data:`SITES`) to cache, *after* the writes
            (``record`` is the same argument under its older name).
        record_positions: ``[batch]`` / ``[batch, n_pos]``: cache only these positions.
        all_logits: return ``[batch, seq, vocab]`` instead of the last position's ``[batch, vocab]``.
        logits: return no logits at all when False; the forward pass then stops after the last
            read (the blocks above it would change nothing that is returned).
        grad: keep the autograd graph (no ``torch.no_grad``, nothing detached; the batch runs as
            one chunk): for a learned write such as a :class:`Blend` mask.
        return_kv: also return each chunk's ``past_key_values`` (keys after rotary embeddings).
        prefix: a :class:`KVPrefix` of these prompts: each chunk runs only its positions from
            ``start`` (default: the earliest position a write touches in the chunk; lowered as
            :meth:`KVPrefix.suffix` requires) with the prefix's cached keys and values, and gets
            the whole run's logits. Rows run latest start first (in one chunk, as given: with
            ``grad``, ``batch_size=None``, or a given ``start`` and one chunk's rows); the caller
            vouches that the prefix is what this run computes before ``start``.
        batch_size: examples per forward pass (None: all at once).
        trace_kwargs: extra keyword arguments for the model's forward (e.g. ``past_key_values``,
            ``position_ids``, ``logits_to_keep``); with them the batch runs as one chunk.
        skip_layers, skip_value: blocks not run at all; each outputs ``skip_value``
            ``[batch, seq, d_model]`` instead (what the first block after them reads; with a
            ``prefix``, cut to the positions run). Writes and reads must lie above them.

    Returns:
        :class:`PatchRun` with ``logits`` and an :class:`ActivationCache` (on ``out_device``).

    >>> clean = run(lm, base, reads=[("z", 3)])           # cache["z", 3]: [batch, seq, n_heads, d_head]
    >>> patch = patch_from_cache(clean.cache, "z", 3, [5], base["last_position"])
    >>> run(lm, base, [patch]).logits                       # identity patch: the clean logits
    """
    nn, arch, device, tkw = lm_parts(lm)
    b = as_batch(batch)
    ids, mask = b["input_ids"], b["attention_mask"]
    B, S = ids.shape
    last = check_positions(b["last_position"], S, "last position", mask)[:, 0]
    rpos = None if record_positions is None else check_positions(record_positions, S, "record position", mask)
    writes = [w.resolved(arch, B, S) for w in writes]
    if record is not None:
        if reads:
            raise ValueError("give the sites to cache as reads or as record, not both")
        reads = record
    reads = [(s, arch.layer_index(l)) for s, l in reads]
    for s, _ in reads:
        if s not in SITES:
            raise ValueError(f"cannot record site '{s}'; sites are {SITES}")
    skip_layers = sorted(arch.layer_index(l) for l in skip_layers)
    if skip_layers and (skip_value is None or tuple(skip_value.shape) != (B, S, arch.d_model)):
        raise ValueError(f"skipping blocks needs skip_value [batch, seq, d_model] = {[B, S, arch.d_model]}")
    if prefix is not None and (reads or all_logits or not logits or trace_kwargs):
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
        cskip = None if not skip_layers else skip_value[rows]
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
                      all_logits=all_logits, logits=logits, grad=grad, return_kv=return_kv, out_device=out_device)

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
            if logits:
                logit_pieces.append(lg)
            kvs.append(kv)
    cache = ActivationCache({k: torch.cat(v) for k, v in pieces.items()}, positions=rpos, attention_mask=mask)
    return PatchRun(torch.cat(logit_pieces) if logits else None, cache, kvs if return_kv else None)


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
        res = run(lm, b, logits=False, return_kv=True, batch_size=batch_size, out_device=device)
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
# Convenience wrappers and metrics


def last_logits(lm: Any, batch: BatchLike, patches: Sequence[HeadPatch] = (), *, batch_size: int = 32,
                progress: bool = False) -> torch.Tensor:
    """Logits ``[batch, vocab]`` at each example's last position, with ``patches`` applied."""
    return run(lm, batch, patches, batch_size=batch_size, progress=progress, desc="logits").logits


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
    res = run(lm, batch, patches, record, record_positions=positions, logits=with_logits,
              batch_size=batch_size, progress=progress, desc="caching")
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
