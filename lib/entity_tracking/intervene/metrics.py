"""What a patching experiment scores: a metric of the patched run against the clean one.

A metric is a callable, as in TransformerLens: ``metric(logits, target, clean) -> [rows]``, the
patched run's last-position logits ``[rows, vocab]`` and the answers ``target [rows]`` scored
against the clean run at the same rows (:class:`Clean`); an experiment's score is the mean of
these terms over its prompts. Two are provided, :func:`relative` (the paper's mean relative change
of p(correct)) and :func:`pooled` (the relative change of the mean); a profile names one of them
(:data:`METRICS`, :func:`metric_named`) and a user passes any function of their own, e.g. a logit
difference::

    def logit_difference(logits, target, clean):
        at = target[:, None]
        return (logits.gather(1, at) - clean.logits.gather(1, at))[:, 0]
"""

from __future__ import annotations

from typing import Callable

import torch

from .patching import target_probs

__all__ = ["METRICS", "Clean", "Metric", "metric_name", "metric_named", "pooled", "relative"]


class Clean:
    """The clean run at the rows a metric scores (one row per prompt, or per sender and prompt).

    Attributes:
        p: ``[rows]`` the clean probability of the target at the last token.
        p_mean: the mean clean probability of the target over the whole dataset (0-d).
        logits: ``[rows, vocab]`` the clean last-position logits (gathered on first use).
    """

    def __init__(self, p: torch.Tensor, p_mean: torch.Tensor, logits: Callable[[], torch.Tensor]):
        self.p, self.p_mean, self._logits = p, p_mean, logits

    @property
    def logits(self) -> torch.Tensor:
        return self._logits()


#: A path-patching metric: ``metric(logits [rows, vocab], target [rows], clean: Clean) -> [rows]``,
#: the patched run's last-position logits scored against the clean run; a sender's score is the
#: mean of these terms over the prompts, and the heads with the lowest scores carry the path.
Metric = Callable[[torch.Tensor, torch.Tensor, Clean], torch.Tensor]


def relative(logits: torch.Tensor, target: torch.Tensor, clean: Clean) -> torch.Tensor:
    """The paper's metric: each prompt's relative change of p(target), ``(p - p_clean) / p_clean``.

    >>> p = torch.tensor([0.1, 0.01])  # p(target) patched; clean 0.9 and 0.001: the wrong prompt dominates
    >>> logits, target = torch.stack([p, 1 - p], 1).log(), torch.zeros(2, dtype=torch.long)
    >>> relative(logits, target, Clean(torch.tensor([0.9, 0.001]), None, None))
    tensor([-0.8889,  9.0000])
    """
    return (target_probs(logits, target) - clean.p) / clean.p


def pooled(logits: torch.Tensor, target: torch.Tensor, clean: Clean) -> torch.Tensor:
    """Ours: ``(p - p_clean) / mean(p_clean)``, whose mean over the prompts is the relative change
    of the *mean* probability (module docstring).

    >>> p, pc = torch.tensor([0.1, 0.01]), torch.tensor([0.9, 0.001])
    >>> logits, target = torch.stack([p, 1 - p], 1).log(), torch.zeros(2, dtype=torch.long)
    >>> pooled(logits, target, Clean(pc, pc.mean(), None)).mean()
    tensor(-0.8779)
    """
    return (target_probs(logits, target) - clean.p) / clean.p_mean


#: The metrics a profile names (``circuit.metric``): the paper's mean relative change, or the
#: relative change of the mean.
METRICS: dict[str, Metric] = {"relative": relative, "pooled": pooled}


def metric_named(name: str) -> Metric:
    """The provided metric called ``name`` (a profile's ``circuit.metric``).

    >>> metric_named("pooled") is pooled
    True
    """
    if name not in METRICS:
        raise ValueError(f"unknown path-patching metric {name!r}; the metrics are {list(METRICS)} "
                         f"(or pass a callable of your own, see Metric)")
    return METRICS[name]


def metric_name(metric: Metric) -> str:
    """The name a circuit's ``meta`` records for ``metric`` (its function name)."""
    return getattr(metric, "__name__", type(metric).__name__)
