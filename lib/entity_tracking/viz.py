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
