"""Context resampling: training that leaves the organism only a positional route to the answer.

The default organism binds *by content*: a layer-0 head copies each object onto its box label in
the context, and the Value Fetchers read it there (``notes/organism.md``). Llama-7B binds *by
position*: what its context positions carry about the binding is the same in every prompt of the
template, so mean-ablating every head there keeps most of its accuracy. This module makes the
content route unavailable during training, so that the organism has to learn the positional one.

**How.** In a batch whose rows share one template (one box count, so the context spans the same
positions in every row), every head's output -- the input of ``o_proj`` in every layer,
``[batch, pos, n_heads * d_head]`` -- at every context position is replaced by the same positions
of *another row* (``source``, a derangement of the rows), or by the batch mean per position
(``source=None``). Within one forward pass: a context position keeps its own token, but whatever
attention brought it from other positions comes from another prompt. What survives is exactly
what is the same in every prompt at that position: where it sits in the template (its ordinal
box, its role), never which object is bound to which label. The query positions are untouched,
so the query label can still find its match in the context (through the tokens' own embeddings)
and read *where* it is.

Oracles (``tests/test_positional.py``): on a batch of identical rows resampling changes nothing;
on distinct rows it changes the loss.

>>> # with resampled_context(model, n_positions=ctx_len, source=derangement(64, rng)):
>>> #     loss = model(input_ids=ids, labels=labels).loss
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator, Optional

import torch

from ..model.arch import arch_for

__all__ = ["derangement", "resampled_context"]


def derangement(batch_size: int, rng: random.Random) -> torch.Tensor:
    """Row ``i`` reads row ``(i + s) % batch_size`` for a shift ``s`` drawn from ``1..batch_size-1``:
    no row reads itself. ``[batch_size]`` long; a batch of one row reads itself."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    shift = rng.randrange(1, batch_size) if batch_size > 1 else 0
    return (torch.arange(batch_size) + shift) % batch_size


@contextlib.contextmanager
def resampled_context(model: torch.nn.Module, n_positions: int,
                      source: Optional[torch.Tensor]) -> Iterator[None]:
    """While active, every forward pass of ``model`` resamples the head outputs at positions
    ``0 .. n_positions-1`` in every layer (module docstring).

    Args:
        model: a transformers causal LM of a family in the architecture table
            (:func:`~entity_tracking.model.arch.arch_for` finds its ``o_proj`` modules).
        n_positions: the context length (the same in every row of the batches run inside).
        source: ``[batch]`` long, the row each row reads its context head outputs from
            (:func:`derangement`); ``None`` for the batch mean per position.

    Gradients flow through the substituted activations (to the row they came from).
    """
    if n_positions < 1:
        raise ValueError(f"n_positions must be positive, got {n_positions}")
    arch = arch_for(model)

    def hook(module, args):
        x = args[0]  # [batch, pos, n_heads * d_head]
        if source is not None and len(source) != x.shape[0]:
            raise ValueError(f"source has {len(source)} rows, the batch {x.shape[0]}")
        ctx = x[:, :n_positions]
        new = ctx.mean(0, keepdim=True).expand_as(ctx) if source is None else ctx[source]
        return (torch.cat([new, x[:, n_positions:]], dim=1), *args[1:])

    handles = [arch.module(model, "o_proj", layer).register_forward_pre_hook(hook)
               for layer in range(arch.n_layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
