"""Shared statistics of the methods: a point estimate with its bootstrap interval.

Every number the book reports with an interval is an :class:`Estimate` from :func:`bootstrap`, a
percentile bootstrap over the unit that is independent, paired when several per-example vectors
are resampled together (the same prompts for the circuit and the model, for a fine-tune and its
base). The evaluation prompts are not independent: each context (the objects in their boxes) is
asked about ``num_boxes`` times, so a model that gets one context right tends to get its other
queries right too. Given ``clusters`` (each prompt's ``context_id``), :func:`bootstrap` resamples
*contexts* and keeps all queries of a drawn context (a cluster bootstrap), which widens the
interval by as much as the queries of one context agree. :func:`ratio` divides resampled
accuracies, giving NaN (ignored by the quantiles) where the denominator is 0.

>>> import torch
>>> correct = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 1.0])
>>> est = bootstrap(correct, clusters=[0, 0, 1, 1, 2, 2], n_resamples=200)
>>> round(est.value, 3), est.n, est.n_clusters
(0.667, 6, 3)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

__all__ = ["Estimate", "Evaluation", "bootstrap", "cluster_index", "cluster_weights", "context_ids", "draws_mean",
           "format_estimate", "ratio", "shared_clusters"]


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a percentile bootstrap interval ``[low, high]`` at ``level``."""

    value: float
    low: float
    high: float
    level: float = 0.95
    n: int = 0
    n_clusters: int = 0  # the contexts resampled (0: the examples themselves were)

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high, "level": self.level, "n": self.n,
                "n_clusters": self.n_clusters}

    def __format__(self, spec: str) -> str:
        spec = spec or ".2f"
        return f"{self.value:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"

    def __str__(self) -> str:
        return format(self)


def bootstrap(vectors: torch.Tensor | Sequence[torch.Tensor],
              statistic: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, *,
              clusters: Optional[Sequence[int] | torch.Tensor] = None,
              n_resamples: int = 1000, seed: int = 0, level: float = 0.95, chunk: int = 200) -> Estimate:
    """Percentile bootstrap over examples, or over clusters of them, of a statistic of per-vector
    accuracies.

    Args:
        vectors: ``[k, n]`` (or ``k`` tensors of length ``n``) per-example correctness; the same
            resampled examples are used for all ``k`` (paired).
        statistic: maps accuracies ``[k, R]`` to ``[R]``; default: the first vector's accuracy.
            NaN results (e.g. a ratio over a zero resample) are ignored by the quantiles.
        clusters: ``[n]`` the cluster of each example (the prompts' ``context_id``), or None for
            independent examples. Given, each resample draws as many clusters as there are, with
            replacement, and weighs every example by how often its cluster was drawn: the accuracy
            of a resample is the mean over all queries of the drawn contexts.
        n_resamples: bootstrap resamples ``R``; ``seed`` makes them deterministic.

    Returns:
        :class:`Estimate` with the statistic on the original examples and the
        ``(1-level)/2``, ``(1+level)/2`` quantiles of the resampled statistics (``n_clusters``:
        the clusters resampled, 0 without ``clusters``).
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
    member, n_clusters = cluster_index(clusters, n)
    out = []
    for s in range(0, n_resamples, chunk):
        r = min(chunk, n_resamples - s)
        if n_clusters:
            w = cluster_weights(member, n_clusters, r, gen)
            out.append(stat((v[:, None, :] * w[None]).sum(-1) / w.sum(-1)).float())
        else:
            idx = torch.randint(n, (r, n), generator=gen)
            out.append(stat(v[:, idx].mean(-1)).float())
    stats = torch.cat(out)
    stats = torch.where(torch.isfinite(stats), stats, torch.full_like(stats, float("nan")))
    if bool(torch.isnan(stats).all()):
        lo = hi = float("nan")
    else:
        q = torch.tensor([(1 - level) / 2, (1 + level) / 2])
        lo, hi = (float(x) for x in torch.nanquantile(stats, q))
    return Estimate(point, lo, hi, level, n, n_clusters)


def cluster_index(clusters: Optional[Sequence[int] | torch.Tensor], n: int) -> tuple[Optional[torch.Tensor], int]:
    """``(member [n], n_clusters)``: each example's cluster numbered ``0..n_clusters-1``, from its
    cluster ids (``context_id``); ``(None, 0)`` without ``clusters``."""
    if clusters is None:
        return None, 0
    cl = torch.as_tensor(clusters).reshape(-1)
    if cl.numel() != n:
        raise ValueError(f"clusters names {cl.numel()} examples' clusters, the vectors have {n} examples")
    _, member = torch.unique(cl, return_inverse=True)
    return member, int(member.max()) + 1


def cluster_weights(member: torch.Tensor, n_clusters: int, r: int, generator: torch.Generator) -> torch.Tensor:
    """``[r, n]`` weights of ``r`` cluster-bootstrap resamples: each draws ``n_clusters`` clusters
    with replacement, and an example weighs as often as its cluster was drawn."""
    drawn = torch.randint(n_clusters, (r, n_clusters), generator=generator)
    counts = torch.zeros(r, n_clusters).scatter_add_(1, drawn, torch.ones(r, n_clusters))
    return counts[:, member]


def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.full_like(num, float("nan")))


def format_estimate(est, spec: str = ".2f", missing: str = "not measured") -> str:
    """An estimate (an :class:`Estimate` or its ``as_dict()``) as ``value [low, high]``;
    ``missing`` for None (nothing was measured)."""
    if est is None:
        return missing
    d = est.as_dict() if isinstance(est, Estimate) else est
    return format(Estimate(d["value"], d["low"], d["high"]), spec)


# --------------------------------------------------------------------------------------------
# Per-prompt outcomes, and the contexts their intervals resample


def context_ids(prompts) -> Optional[torch.Tensor]:
    """Each prompt's ``context_id`` as a LongTensor ``[n]``: read from prompt records (the
    evaluation records of :mod:`entity_tracking.task` carry it) or from an encoded batch's
    ``"context_id"`` entry. None when some record has none (e.g. a user's own prompts): their
    intervals then resample prompts (see :func:`bootstrap`).
    Ids that are not integers are numbered in order of first appearance."""
    if isinstance(prompts, Mapping):
        c = prompts.get("context_id")
        return None if c is None else torch.as_tensor(c).reshape(-1).long()
    ids = [p.get("context_id") if isinstance(p, Mapping) else None for p in prompts]
    if not ids or any(i is None for i in ids):
        return None
    if all(isinstance(i, int) or (isinstance(i, torch.Tensor) and i.numel() == 1) for i in ids):
        return torch.tensor([int(i) for i in ids], dtype=torch.long)
    number: dict[Any, int] = {}
    return torch.tensor([number.setdefault(i, len(number)) for i in ids], dtype=torch.long)


@dataclass
class Evaluation:
    """Per-example outcome of one setting of an experiment (e.g. a mean ablation).

    Attributes:
        label: what was evaluated (e.g. ``"F(C)"``).
        correct: bool ``[n_examples]``: argmax at the last token == target.
        predicted: long ``[n_examples]``: the argmax token id.
        clusters: long ``[n_examples]``, each prompt's ``context_id`` (:func:`context_ids`), or
            None. Given, every interval resamples contexts, all queries of a drawn context
            together (a cluster bootstrap); None (prompts without ``context_id``, e.g. a user's
            own), it resamples prompts as if they were independent.
    """

    label: str
    correct: torch.Tensor
    predicted: torch.Tensor
    clusters: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.clusters is not None:
            self.clusters = torch.as_tensor(self.clusters).reshape(-1).long()
            if self.clusters.numel() != int(self.correct.shape[0]):
                raise ValueError(f"evaluation {self.label!r}: {self.clusters.numel()} context ids for "
                                 f"{int(self.correct.shape[0])} prompts")

    @property
    def accuracy(self) -> float:
        return float(self.correct.float().mean()) if len(self.correct) else float("nan")

    @property
    def n(self) -> int:
        return int(self.correct.shape[0])

    def estimate(self, *, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> "Estimate":
        """The accuracy with its bootstrap interval over contexts (over prompts without ``clusters``)."""
        return bootstrap(self.correct[None], clusters=self.clusters, n_resamples=n_resamples, seed=seed, level=level)

    def __repr__(self) -> str:
        return f"Evaluation({self.label!r}, accuracy={self.accuracy:.3f}, n={self.n})"


def shared_clusters(evaluations: Iterable[Optional[Evaluation]]) -> Optional[torch.Tensor]:
    """The context ids of evaluations compared pairwise (made on the same prompts): the
    ``clusters`` they share, or None when one of them has none (then the comparison's interval
    resamples prompts). Raises :class:`ValueError` if they name different contexts or counts."""
    cs = [e.clusters for e in evaluations if e is not None]
    if not cs or any(c is None for c in cs):
        return None
    first = cs[0]
    for c in cs[1:]:
        if c.shape != first.shape or not torch.equal(c, first):
            raise ValueError("evaluations compared pairwise hold different prompts' context ids "
                             f"({c.numel()} and {first.numel()}); pair only evaluations of the same prompts")
    return first


def draws_mean(rows: slice, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``acc -> mean accuracy of the random draws in acc[rows]`` for :func:`bootstrap`: on the
    original examples (``acc`` ``[k, 1]``) every draw once; on each resample, ``d`` draws
    sampled with replacement (seeded), so an interval over contexts is also one over draws."""
    gen = torch.Generator().manual_seed(seed)

    def mean(acc: torch.Tensor) -> torch.Tensor:
        a = acc[rows]
        if acc.shape[1] == 1:
            return a.mean(0)
        pick = torch.randint(a.shape[0], (a.shape[0], acc.shape[1]), generator=gen)
        return a.gather(0, pick).mean(0)

    return mean
