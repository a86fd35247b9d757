"""Shared statistics of the methods: a point estimate with its bootstrap interval.

Every number the book reports with an interval is an :class:`Estimate` from :func:`bootstrap`, a
percentile bootstrap over examples (prompts), paired when several per-example vectors are resampled
together (the same prompts for the circuit and the model, for a fine-tune and its base).
:func:`ratio` divides resampled accuracies, giving NaN (ignored by the quantiles) where the
denominator is 0.

>>> est = bootstrap(torch.tensor([1.0, 0.0, 1.0, 1.0]), n_resamples=200)
>>> f"{est:.2f}"  # doctest: +SKIP
'0.75 [0.25, 1.00]'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

__all__ = ["Estimate", "bootstrap", "ratio"]


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a percentile bootstrap interval ``[low, high]`` at ``level``."""

    value: float
    low: float
    high: float
    level: float = 0.95
    n: int = 0

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high, "level": self.level, "n": self.n}

    def __format__(self, spec: str) -> str:
        spec = spec or ".2f"
        return f"{self.value:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"

    def __str__(self) -> str:
        return format(self)


def bootstrap(vectors: torch.Tensor | Sequence[torch.Tensor],
              statistic: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, *,
              n_resamples: int = 1000, seed: int = 0, level: float = 0.95, chunk: int = 200) -> Estimate:
    """Percentile bootstrap over examples of a statistic of per-vector accuracies.

    Args:
        vectors: ``[k, n]`` (or ``k`` tensors of length ``n``) per-example correctness; the same
            resampled examples are used for all ``k`` (paired).
        statistic: maps accuracies ``[k, R]`` to ``[R]``; default: the first vector's accuracy.
            NaN results (e.g. a ratio over a zero resample) are ignored by the quantiles.
        n_resamples: bootstrap resamples ``R``; ``seed`` makes them deterministic.

    Returns:
        :class:`Estimate` with the statistic on the original examples and the
        ``(1-level)/2``, ``(1+level)/2`` quantiles of the resampled statistics.
    """
    v = vectors if isinstance(vectors, torch.Tensor) else torch.stack([torch.as_tensor(x) for x in vectors])
    if v.dim() == 1:
        v = v[None]
    v = v.float()
    k, n = v.shape
    if n == 0:
        raise ValueError("bootstrap needs at least one example")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    stat = statistic or (lambda acc: acc[0])
    point = float(stat(v.mean(-1, keepdim=True))[0])
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, n_resamples, chunk):
        r = min(chunk, n_resamples - s)
        idx = torch.randint(n, (r, n), generator=gen)
        out.append(stat(v[:, idx].mean(-1)).float())
    stats = torch.cat(out)
    stats = torch.where(torch.isfinite(stats), stats, torch.full_like(stats, float("nan")))
    if bool(torch.isnan(stats).all()):
        lo = hi = float("nan")
    else:
        q = torch.tensor([(1 - level) / 2, (1 + level) / 2])
        lo, hi = (float(x) for x in torch.nanquantile(stats, q))
    return Estimate(point, lo, hi, level, n)


def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.full_like(num, float("nan")))
