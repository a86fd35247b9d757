"""Plotting helpers shared by the book's chapters (matplotlib + seaborn).

Every function draws on a given ``ax`` (or a new figure) and returns the figure, so a chapter
can ``plt.show()`` it inline and save it with :func:`entity_tracking.io.save_figure`.
Colours of token roles are fixed here (:data:`ROLE_COLORS`) so every chapter's figures agree.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.patches import Patch, Rectangle

__all__ = [
    "ROLE_COLORS",
    "plot_counts",
    "plot_index_pairs",
    "plot_token_layout",
    "set_style",
]

#: One colour per token role of :func:`entity_tracking.data.token_table`.
ROLE_COLORS: dict[str, str] = {
    "box label": "#4C72B0",
    "object": "#55A868",
    "query label": "#C44E52",
    "last token": "#8172B2",
    "special": "#BBBBBB",
    "other": "#F2F2F2",
}


def set_style() -> None:
    """The book's plotting style."""
    sns.set_theme(style="whitegrid", context="notebook")


def _new_ax(ax, figsize: tuple[float, float]):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def plot_token_layout(rows: Sequence[Mapping[str, Any]], ax=None, title: str | None = None,
                      tokens_per_row: int | None = None):
    """Tokens of one prompt along the x axis, coloured by role, positions annotated.

    ``rows``: the output of :func:`entity_tracking.data.token_table` (``position``, ``token``,
    ``role``, ``prev_query_label``, ``answer``). The query label's context occurrence and the
    answer object get a thick outline; long prompts wrap after ``tokens_per_row`` tokens.
    """
    rows = list(rows)
    n = len(rows)
    per_row = tokens_per_row or n
    n_lines = -(-n // per_row)
    fig, ax = _new_ax(ax, (max(6.0, 0.42 * per_row), 1.5 * n_lines + 0.8))
    for r in rows:
        t = r["position"]
        x, y = t % per_row, -(t // per_row) * 1.6
        color = ROLE_COLORS.get(r["role"], ROLE_COLORS["other"])
        edge = "black" if (r.get("prev_query_label") or r.get("answer")) else "#999999"
        ax.add_patch(Rectangle((x, y), 0.94, 1.0, facecolor=color, edgecolor=edge,
                               linewidth=2.2 if edge == "black" else 0.6))
        dark = r["role"] not in ("other", "special")
        ax.text(x + 0.47, y + 0.5, r["token"].strip() or repr(r["token"]), rotation=90, ha="center",
                va="center", fontsize=8, color="white" if dark else "black")
        ax.text(x + 0.47, y - 0.12, str(t), ha="center", va="top", fontsize=6.5, color="#444444")
    ax.set_xlim(-0.2, per_row + 0.2)
    ax.set_ylim(-(n_lines - 1) * 1.6 - 0.5, 1.15)
    ax.set_axis_off()
    handles = [Patch(facecolor=c, edgecolor="#999999", label=k) for k, c in ROLE_COLORS.items()
               if any(r["role"] == k for r in rows)]
    handles.append(Patch(facecolor="white", edgecolor="black", linewidth=2, label="answer / previous query label"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=len(handles), fontsize=8,
              frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def plot_counts(counts: Mapping[str, Iterable[Any]] | Iterable[Any], ax=None, xlabel: str = "",
                ylabel: str = "fraction", title: str | None = None, normalize: bool = True,
                order: Sequence[Any] | None = None, top: int | None = None, figsize=(7.0, 3.2)):
    """Bar chart of value frequencies; a mapping gives one hue per key (e.g. one per dataset)."""
    import pandas as pd

    series = counts if isinstance(counts, Mapping) else {"": counts}
    frames = []
    for name, values in series.items():
        c = Counter(values)
        total = sum(c.values()) or 1
        for value, k in c.items():
            frames.append({"value": value, "count": k / total if normalize else k, "dataset": name})
    df = pd.DataFrame(frames)
    if order is None:
        order = (df.groupby("value")["count"].sum().sort_values(ascending=False).index.tolist()
                 if top else sorted(df["value"].unique()))
    if top:
        order = list(order)[:top]
        df = df[df["value"].isin(order)]
    fig, ax = _new_ax(ax, figsize)
    hue = "dataset" if len(series) > 1 else None
    sns.barplot(df, x="value", y="count", hue=hue, order=order, ax=ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel if normalize else "count")
    if top or len(order) > 12:
        ax.tick_params(axis="x", rotation=90, labelsize=8)
    if hue:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), title=None, frameon=False)
    if title:
        ax.set_title(title)
    return fig


def plot_index_pairs(pairs: Iterable[tuple[int, int]], n: int, ax=None, xlabel: str = "source query index",
                     ylabel: str = "base query index", title: str | None = None):
    """Heatmap of how often each (row, column) index pair occurs, e.g. base vs source query index."""
    grid = np.zeros((n, n), dtype=int)
    for r, c in pairs:
        grid[r, c] += 1
    fig, ax = _new_ax(ax, (4.2, 3.6))
    sns.heatmap(grid, annot=True, fmt="d", cmap="Blues", cbar=False, ax=ax, annot_kws={"fontsize": 7})
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def plot_masks(masks: Mapping[str, Mapping[str, Sequence[int]]], heads: Mapping[str, Sequence[tuple[int, int]]],
               labels: Mapping[str, str] | None = None):
    """Learned DCM masks, one panel per group: rows are desiderata, columns the group's heads
    (``L.H``); dark cells are heads the mask patches (rounded mask 0).

    ``masks[group][desideratum]`` is the rounded mask over ``heads[group]``."""
    import numpy as np
    import pandas as pd

    groups = [g for g in masks if heads.get(g)]
    if not groups:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.text(0.5, 0.5, "no group has heads", ha="center", va="center")
        ax.axis("off")
        return fig
    widths = [max(len(heads[g]), 2) for g in groups]
    fig, axes = plt.subplots(1, len(groups), figsize=(min(3 + 0.45 * sum(widths), 22), 2.2 + 0.3 * max(len(m) for m in masks.values())),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    for ax, g in zip(axes[0], groups):
        df = pd.DataFrame({d: 1 - np.asarray(m) for d, m in masks[g].items()},
                          index=[f"{l}.{h}" for l, h in heads[g]]).T
        sns.heatmap(df, ax=ax, cmap="Blues", vmin=0, vmax=1, cbar=False, linewidths=0.5, linecolor="white")
        ax.set_title((labels or {}).get(g, g), fontsize=10)
        ax.set_xlabel("head (layer.head)")
        if ax is not axes[0][0]:
            ax.set_yticklabels([])
    fig.suptitle("DCM: heads selected (dark) for each desideratum", y=1.02)
    fig.tight_layout()
    return fig


def plot_semantics(df, title: str = ""):
    """Bars of the per-model semantics (mean %): x = group / desideratum, hue = model."""
    d = df.assign(case=df["group"].str.replace("_", " ") + "\n" + df["desideratum"].str.replace("_", " "))
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * d["case"].nunique()), 4))
    sns.barplot(data=d, x="case", y="mean", hue="model", ax=ax, errorbar=None)
    ax.set_xlabel("")
    ax.set_ylabel("% of samples giving the target")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_score_maps(scores: Mapping[str, Sequence[Sequence[float]]], labels: Mapping[str, str] | None = None,
                    selected: Mapping[str, Sequence[tuple[int, int]]] | None = None, title: str = ""):
    """Path-patching score maps, one ``[layer x head]`` heatmap per step (negative = the head's
    corrupted path lowers the correct answer's probability); selected heads are outlined."""
    import numpy as np
    from matplotlib.patches import Rectangle

    steps = list(scores)
    fig, axes = plt.subplots(1, len(steps), figsize=(3.6 * len(steps), 3.4), squeeze=False)
    for ax, step in zip(axes[0], steps):
        m = np.asarray(scores[step], dtype=float)
        lim = max(float(np.nanmax(np.abs(m))), 1e-6)
        sns.heatmap(m, ax=ax, cmap="RdBu", vmin=-lim, vmax=lim, center=0, cbar=True, square=m.shape[0] == m.shape[1],
                    cbar_kws={"shrink": 0.7})
        for layer, head in (selected or {}).get(step, []):
            ax.add_patch(Rectangle((head, layer), 1, 1, fill=False, edgecolor="black", lw=1.5))
        ax.set_title((labels or {}).get(step, step), fontsize=10)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
    if title:
        fig.suptitle(title, y=1.03)
    fig.tight_layout()
    return fig
