"""Plotting helpers shared by the book's chapters (matplotlib + seaborn).

Every function draws on a given ``ax`` (or a new figure) and returns the figure, so a chapter
can ``plt.show()`` it inline and save it with :func:`entity_tracking.io.save_figure`.
Colours of token roles are fixed here (:data:`ROLE_COLORS`) so every chapter's figures agree.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.patches import Patch, Rectangle

from ..intervene.stats import Estimate
from ..io import read_json
from ..methods.cmap import FINETUNED_ALONE
from ..methods.dcm import share_interval
from ..schema import GROUP_LABELS

__all__ = [
    "MINIMALITY_CAP",
    "ROLE_COLORS",
    "minimality_rows",
    "plot_counts",
    "plot_faithfulness",
    "plot_gain_shares",
    "plot_index_pairs",
    "plot_intervals",
    "plot_semantics_intervals",
    "plot_token_layout",
    "set_style",
]

#: One colour per token role of :func:`entity_tracking.task.token_table`.
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

    ``rows``: the output of :func:`entity_tracking.task.token_table` (``position``, ``token``,
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


# --- estimates with intervals ----------------------------------------------------------------

#: How the paper's numbers are drawn beside ours: a hollow black diamond (our point shows through), labelled "paper".
PAPER_MARKER: dict[str, Any] = {"marker": "D", "s": 38, "facecolors": "none", "edgecolors": "black",
                                "linewidths": 1.2, "zorder": 4}


def _finite(x) -> bool:
    try:
        return bool(np.isfinite(float(x)))
    except (TypeError, ValueError):
        return False


def plot_intervals(ax, df, cat: str, value: str = "value", low: str = "low", high: str = "high",
                   hue: str | None = None, order: Sequence[Any] | None = None,
                   hue_order: Sequence[Any] | None = None, paper: str = "paper", horizontal: bool = False,
                   palette: Sequence[Any] | None = None, legend: bool = True,
                   clip: tuple[float, float] | None = None):
    """Points with interval bars on ``ax``: one category slot per value of column ``cat`` (in
    ``order``), the ``hue`` values dodged within it, one colour per hue (one
    :class:`~matplotlib.container.ErrorbarContainer` in ``ax.containers`` per hue).

    A row whose ``value`` is NaN draws nothing; a row whose interval is NaN draws its point without
    a bar. Where ``df`` has a column ``paper``, its finite entries are drawn as
    :data:`PAPER_MARKER` at the same slot, in one collection with ``gid="paper"`` and the legend
    label "paper" (no collection when no entry is finite). ``horizontal`` puts the categories on
    the y axis (long labels). With ``clip = (lo, hi)`` a point beyond it is drawn at the edge as a
    triangle pointing outwards (one collection with ``gid="clipped"``) and interval ends are cut
    there. Returns the finite ends drawn (after clipping), for axis limits."""
    order = list(order) if order is not None else list(dict.fromkeys(df[cat]))
    hues = list(hue_order) if hue_order is not None else (list(dict.fromkeys(df[hue])) if hue else [None])
    colors = list(palette) if palette is not None else sns.color_palette(n_colors=max(len(hues), 1))
    step = 0.72 / max(len(hues), 1)
    ends: list[float] = []
    clipped: list[tuple[float, float, Any, bool]] = []
    paper_pts: list[tuple[float, float]] = []
    for j, h in enumerate(hues):
        sub = df if hue is None else df[df[hue] == h]
        pos, val, err_lo, err_hi = [], [], [], []
        for _, r in sub.iterrows():
            if r[cat] not in order:
                continue
            p = order.index(r[cat]) - 0.36 + step * (j + 0.5)
            v = float(r[value]) if _finite(r[value]) else float("nan")
            if clip and np.isfinite(v) and not clip[0] <= v <= clip[1]:
                v = float(np.clip(v, *clip))
                clipped.append((p, v, colors[j % len(colors)], v == clip[1]))
            lo_ok, hi_ok = _finite(r.get(low)), _finite(r.get(high))
            pos.append(p)
            val.append(v)
            lo_v = float(np.clip(float(r[low]), *clip)) if clip and lo_ok else (float(r[low]) if lo_ok else v)
            hi_v = float(np.clip(float(r[high]), *clip)) if clip and hi_ok else (float(r[high]) if hi_ok else v)
            err_lo.append(max(v - lo_v, 0.0) if np.isfinite(v) else 0.0)
            err_hi.append(max(hi_v - v, 0.0) if np.isfinite(v) else 0.0)
            ends += [x for x, ok in ((lo_v, lo_ok), (hi_v, hi_ok), (v, np.isfinite(v))) if ok]
            if paper in r and _finite(r[paper]):
                paper_pts.append((p, float(r[paper])))
                ends.append(float(r[paper]))
        xy = (val, pos) if horizontal else (pos, val)
        err = {"xerr" if horizontal else "yerr": [err_lo, err_hi]}
        ax.errorbar(*xy, **err, fmt="o", color=colors[j % len(colors)], ms=6, capsize=3, lw=1.5,
                    label=None if h is None else str(h), zorder=3)
    if clipped:
        p, v, c, up = zip(*clipped)
        marks = [(">" if u else "<") if horizontal else ("^" if u else "v") for u in up]
        for mk in set(marks):  # one marker per scatter call; all share the gid
            k = [i for i, x in enumerate(marks) if x == mk]
            xy = ([v[i] for i in k], [p[i] for i in k])
            ax.scatter(*(xy if horizontal else xy[::-1]), marker=mk, s=60, c=[c[i] for i in k], gid="clipped",
                       zorder=3)
    if paper_pts:
        p, v = zip(*paper_pts)
        ax.scatter(*((v, p) if horizontal else (p, v)), label="paper", gid="paper", **PAPER_MARKER)
    ticks = (ax.set_yticks, ax.set_yticklabels) if horizontal else (ax.set_xticks, ax.set_xticklabels)
    ticks[0](range(len(order)))
    ticks[1]([str(c) for c in order])
    if horizontal:
        ax.set_ylim(len(order) - 0.5, -0.5)
        ax.grid(False, axis="y")
    else:
        ax.set_xlim(-0.5, len(order) - 0.5)
        ax.grid(False, axis="x")
    if legend and (hue or paper_pts):
        ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ends


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="#555555",
            wrap=True)


def plot_gain_shares(rows, title: str = "", limits: tuple[float, float] = (-1.0, 2.0)):
    """CMAP at a glance: the share of the fine-tuning gain each patch recovers, with its 95%
    interval; one row of panels per fine-tuned model, output CMAP (one point per head set) beside
    input CMAP (the Value Fetchers' and Position Transmitters' DCM heads, one colour per patched
    input: q, k, v, qk, qkv).

    ``rows``: a DataFrame of :func:`entity_tracking.methods.cmap.gain_recovery` rows with a ``fine-tuned`` column
    (and optionally ``paper``, the paper's share for the row, e.g. from
    :func:`entity_tracking.methods.cmap.paper_share`; drawn only where finite). The models' own rows give
    each panel row its title (the gain itself, fine-tuned minus base accuracy). 0 is the base
    model, 1 the fine-tuned model; a share is undefined (NaN, not drawn) where there is no gain,
    and the panel says so when nothing can be drawn. The axis spans at most ``limits``: with a small
    gain the intervals run far wider: their bars are cut at the axis edge, and a share beyond it is
    a triangle at the edge."""
    models = list(dict.fromkeys(rows["fine-tuned"])) if len(rows) else []
    if not models:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        _note(ax, "no fine-tuned model: nothing was patched")
        ax.axis("off")
        return fig
    n_sets = max(int((rows["kind"] == "output").groupby(rows["fine-tuned"]).sum().max()), 2)
    fig, axes = plt.subplots(len(models), 2, figsize=(12.5, len(models) * (0.42 * n_sets + 1.6) + 0.6), squeeze=False,
                             gridspec_kw={"width_ratios": [1.0, 1.0]})
    sites = [s for s in ("q", "k", "v", "qk", "qkv") if s in set(rows.loc[rows["kind"] == "input", "sites"])]
    site_colors = sns.color_palette("viridis", n_colors=max(len(sites), 1))
    for (ax_out, ax_in), m in zip(axes, models):
        sub = rows[rows["fine-tuned"] == m]
        gain = sub[sub["patched"] == FINETUNED_ALONE]
        label = str(m)
        if len(gain) and _finite(gain["share"].iloc[0]):
            g = gain.iloc[0]
            label += f" (gain {g['share']:+.3f} [{g['share_low']:+.3f}, {g['share_high']:+.3f}])"
        panels = ((ax_out, sub[sub["kind"] == "output"], None, "output CMAP"),
                  (ax_in, sub[sub["kind"] == "input"], "sites", "input CMAP (DCM heads)"))
        for ax, d, hue, what in panels:
            ax.set_title(f"{label}: {what}", fontsize=10)
            ax.axvline(0, color="grey", lw=1, ls="--")
            ax.axvline(1, color="grey", lw=1, ls=":")
            ax.set_xlabel("share of the gain (0 = base, 1 = fine-tuned)" if m == models[-1] else "")
            if not len(d):
                _note(ax, "nothing patched here" + (" (DCM selected no heads of these groups)" if hue else ""))
                ax.set_xlim(limits[0] - 0.08, limits[1] + 0.08)
                ax.set_yticks([])
                continue
            d = d.assign(patched=d["patched"].str.replace("_", " "))
            ends = plot_intervals(ax, d, "patched", "share", "share_low", "share_high", hue=hue, horizontal=True,
                                  hue_order=sites if hue else None, palette=site_colors if hue else ["#4C72B0"],
                                  clip=limits)
            ax.set_ylabel("")
            lo = max(limits[0] - 0.08, min([-0.1, *ends]) - 0.1)
            hi = min(limits[1] + 0.08, max([1.1, *ends]) + 0.1)
            ax.set_xlim(lo, hi)
            if not d["share"].map(_finite).any():
                _note(ax, "no fine-tuning gain: the share is undefined")
    if title:
        fig.suptitle(title, y=1.0)
    fig.tight_layout()
    return fig


#: The core desiderata of the DCM chapter, in the order its figure shows them.
CORE_DESIDERATA = ("positional", "object_value", "box_label_value")


def plot_semantics_intervals(df, groups: Sequence[str] | None = None, labels: Mapping[str, str] | None = None,
                             title: str = ""):
    """DCM at a glance: for each group (one panel), the % of samples giving each core
    desideratum's target (:data:`CORE_DESIDERATA`) when its selected heads are patched, one colour
    per model, with the 95% interval of :func:`entity_tracking.methods.dcm.share_interval`.

    ``df``: :func:`entity_tracking.methods.dcm.semantics` rows (``group``, ``desideratum``, ``model``,
    ``mean``, ``std``, ``n_runs``, ``pairs``), optionally with ``paper`` (the paper's %; drawn only
    where finite). A NaN ``std`` draws the point without a bar."""

    groups = list(groups) if groups is not None else list(dict.fromkeys(df["group"]))
    if not len(df) or not groups:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        _note(ax, "no group has selected heads: nothing was patched")
        ax.axis("off")
        return fig
    d = df.copy()
    ivals = [share_interval(r) if _finite(r["std"]) else (np.nan, np.nan) for r in d.to_dict("records")]
    d["low"] = [lo for lo, _ in ivals]
    d["high"] = [hi for _, hi in ivals]
    names = {"positional": "positional", "object_value": "object\nvalue", "box_label_value": "box label\nvalue"}
    d["desideratum"] = d["desideratum"].map(lambda x: names.get(x, x))
    order = [names[x] for x in CORE_DESIDERATA if names[x] in set(d["desideratum"])]
    models = list(dict.fromkeys(d["model"]))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.1 * len(groups) + 1.6, 3.8), sharey=True, squeeze=False)
    for i, (ax, g) in enumerate(zip(axes[0], groups)):
        plot_intervals(ax, d[d["group"] == g], "desideratum", "mean", hue="model", order=order, hue_order=models,
                       legend=i == len(groups) - 1)
        if not (d["group"] == g).any():
            _note(ax, "no heads selected:\nnot patched")
        ax.set_title((labels or {}).get(g, g.replace("_", " ")), fontsize=10)
        ax.set_ylim(-2, 102)
        ax.set_xlabel("")
    axes[0][0].set_ylabel("% of samples giving the target")
    if title:
        fig.suptitle(title, y=1.0)
    fig.tight_layout()
    return fig


#: The measures of the paper's Table 1: (label, key of a faithfulness summary, key of paper.FAITHFULNESS).
TABLE1_MEASURES = (("full model", "full_accuracy", "full"), ("circuit", "circuit_accuracy", "circuit"),
                   ("random circuit", "random_accuracy", "random"), ("faithfulness", "faithfulness", "faithfulness"))


def plot_faithfulness(summaries: Mapping[str, Mapping[str, Mapping[str, float]]],
                      paper: Mapping[str, Mapping[str, float]] | None = None, title: str = ""):
    """The paper's Table 1 at a glance: per model, the accuracy of the full model, of the circuit
    and of random circuits (left) and the faithfulness F(C)/F(M) (right), with 95% intervals.

    ``summaries[model]``: the ``summary`` of a faithfulness result (``full_accuracy``,
    ``circuit_accuracy``, ``random_accuracy``, ``faithfulness``, each ``{value, low, high}``);
    ``paper[model]``: the paper's row for the model it stands in for
    (:data:`entity_tracking.methods.paper.FAITHFULNESS`; keys ``full``, ``circuit``, ``random``,
    ``faithfulness``), drawn as markers labelled "paper"; models without one get none."""
    import pandas as pd

    models = list(summaries)
    long = pd.DataFrame([{"model": m, "measure": label,
                          **{k: s.get(key, {}).get(k, np.nan) for k in ("value", "low", "high")},
                          "paper": (paper or {}).get(m, {}).get(pkey, np.nan)}
                         for m, s in summaries.items() for label, key, pkey in TABLE1_MEASURES])
    fig, (ax_acc, ax_f) = plt.subplots(1, 2, figsize=(max(8.0, 2.2 * len(models) + 5), 3.8),
                                       gridspec_kw={"width_ratios": [2.2, 1.0]})
    acc = long[long["measure"] != "faithfulness"]
    plot_intervals(ax_acc, acc, "model", hue="measure", order=models, hue_order=[m[0] for m in TABLE1_MEASURES[:3]],
                   palette=["#4C72B0", "#55A868", "#BBBBBB"])
    ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_title("Accuracy: full model, circuit, random circuits", fontsize=10)
    ends = plot_intervals(ax_f, long[long["measure"] == "faithfulness"], "model", order=models, palette=["#C44E52"])
    ax_f.axhline(1, color="grey", lw=1, ls="--")
    ax_f.set_ylim(min([0.0, *ends]) - 0.05, max([1.0, *ends]) + 0.1)
    ax_f.set_ylabel("faithfulness F(C)/F(M)")
    ax_f.set_title("Faithfulness", fontsize=10)
    for ax in (ax_acc, ax_f):
        ax.set_xlabel("")
        plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    if title:
        fig.suptitle(title, y=1.0)
    fig.tight_layout()
    return fig


def plot_seed_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]], chance: float | None = None,
                     learned: float | None = None, title: str = ""):
    """Entity tracking against arithmetic over fine-tuning: one line per fine-tune through its
    checkpoints (``curves[name]``: :func:`entity_tracking.methods.dynamics.replicate_curve` rows), with
    95% intervals over seeds and prompts on both axes, each point labelled by its step (left);
    both measures against the step (right). ``chance`` and ``learned`` draw reference lines
    (1/boxes on the accuracy axis, the exact match that counts as learned). Returns the figure."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    colors = sns.color_palette(n_colors=max(len(curves), 1))
    for (name, rows), c in zip(curves.items(), colors):
        x = np.array([r["arithmetic"] for r in rows])
        y = np.array([r["accuracy"] for r in rows])

        def err(key, v):
            lo = np.array([r.get(f"{key}_low", np.nan) for r in rows], dtype=float)
            hi = np.array([r.get(f"{key}_high", np.nan) for r in rows], dtype=float)
            return np.vstack([np.where(np.isfinite(lo), v - lo, 0), np.where(np.isfinite(hi), hi - v, 0)]).clip(0)

        axes[0].errorbar(x, y, xerr=err("arithmetic", x), yerr=err("accuracy", y), color=c, marker="o", capsize=2,
                         label=name)
        for r in rows:
            axes[0].annotate(str(r["step"]), (r["arithmetic"], r["accuracy"]), textcoords="offset points",
                             xytext=(4, 4), fontsize=7, color=c)
        steps = [r["step"] for r in rows]
        axes[1].errorbar(steps, y, yerr=err("accuracy", y), color=c, marker="o", capsize=2,
                         label=f"{name}: 7-box accuracy")
        axes[1].errorbar(steps, x, yerr=err("arithmetic", x), color=c, marker="s", ls="--", capsize=2,
                         label=f"{name}: arithmetic exact match")
    for ax in axes:
        if chance is not None:
            ax.axhline(chance, color="grey", ls=":", lw=1, label="chance (1 / boxes)" if ax is axes[0] else None)
    if learned is not None:
        axes[0].axvline(learned, color="grey", ls="--", lw=1, label="arithmetic learned")
    axes[0].set(xlabel="arithmetic exact match (held-out problems)", ylabel="7-box entity-tracking accuracy",
                xlim=(-0.03, 1.03), ylim=(-0.03, 1.03), title="entity tracking against arithmetic (labels: step)")
    axes[1].set(xlabel="fine-tuning step", ylabel="accuracy", ylim=(-0.03, 1.03), title="over fine-tuning")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


#: Minimality scores are drawn at most this high: a head whose removal costs many times the
#: threshold needs no exact bar, and one such head would flatten every other bar of its panel.
MINIMALITY_CAP = 10.0


def minimality_rows(circuits: Mapping[str, Any], metrics_dir, models: Iterable[str]) -> tuple[list[dict], list[dict]]:
    """The faithfulness chapter's minimality evidence: per-head rows to plot (``model``, ``group``,
    ``head``, ``score`` capped at :data:`MINIMALITY_CAP`, ``kept``) from each model's
    ``minimality_<model>.json`` under ``metrics_dir``, and one pruning-decision row per model whose
    circuit records one (``F(C)`` of the candidates, chance, the decision). Models whose candidates
    were at chance (minimality not measurable) have a decision row and no head rows."""
    heads, decisions = [], []
    for name in models:
        info = circuits[name].meta.get("minimality", {})
        if "measurable" in info:
            decisions.append({"model": name, "F(C) of the candidates": f"{Estimate(**info['circuit_accuracy']):.2f}",
                              "chance": f"{info['chance']:.2f}", "pruning": info["decision"]})
            if not info["measurable"]:
                continue
        f = Path(metrics_dir) / f"minimality_{name}.json"
        if f.exists():
            heads += [{"model": name, "group": GROUP_LABELS[h["group"]], "head": f"{h['head'][0]}.{h['head'][1]}",
                       "score": min(h["score"], MINIMALITY_CAP), "kept": h["kept"]} for h in read_json(f)["heads"]]
    return heads, decisions


def plot_planted_checks(checks: Mapping[str, Any], chance: float, group_labels: Mapping[str, str] | None = None):
    """The planted base's checks (:func:`entity_tracking.methods.ground_truth.planted_checks`) at a
    glance: accuracy per queried box with its 95% interval beside chance, and each planted group's
    interchange accuracy beside random head sets of its size at its position."""
    import pandas as pd

    labels = group_labels or {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    boxes = pd.DataFrame(checks["boxes"])
    axes[0].bar(boxes["box"].astype(str), boxes["value"], color=sns.color_palette()[0],
                yerr=[boxes["value"] - boxes["low"], boxes["high"] - boxes["value"]], capsize=3)
    axes[0].axhline(chance, ls="--", c="grey", label="chance")
    axes[0].set(ylim=(0, 1.05), xlabel="queried box", ylabel="accuracy", title="planted base, by queried box")
    axes[0].legend()
    rows = [{"group": labels.get(r["group"], r["group"]), "patched": who, "interchange accuracy": r[key]["value"]}
            for r in checks["interchange_rows"]
            for who, key in (("planted heads", "interchange"), ("random heads, same size and position", "random"))]
    sns.barplot(data=pd.DataFrame(rows), x="group", y="interchange accuracy", hue="patched", ax=axes[1])
    axes[1].set(ylim=(0, 1.05), xlabel="", title="interchange accuracy on held-out pairs")
    fig.tight_layout()
    return fig


def plot_interchange_map(m, name: str):
    """The binding chapter's residual interchange map (:class:`entity_tracking.methods.binding.InterchangeMap`)
    of one model: per (layer, position), the share of pairs that answer the source's object (top)
    and their own object at the source's queried index (bottom)."""
    import pandas as pd

    sh = m.shares
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 0.2 * len(m.positions) + 2.5), 1.2 * len(m.layers) + 3.0),
                             sharex=True)
    for ax, key, title in ((axes[0], "source", "answers the source's object"),
                           (axes[1], "positional", "answers its own object at the source's queried index")):
        df = pd.DataFrame(sh[key].numpy(), index=[f"layer {l}" for l in m.layers], columns=m.position_labels)
        sns.heatmap(df, vmin=0, vmax=1, cmap="viridis", ax=ax, xticklabels=True, yticklabels=True,
                    cbar_kws={"label": "share of pairs"})
        ax.set_title(f"{name}: {title}", fontsize=9)
    axes[1].tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    return fig
