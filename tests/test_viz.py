"""The figures the chapters show first: each plot function draws from a small synthetic frame the
panels and points it promises, survives NaN estimates (a fine-tune with no gain has no share),
and draws the paper's markers exactly where a paper number is given."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.container import ErrorbarContainer  # noqa: E402

from entity_tracking.io import write_json  # noqa: E402
from entity_tracking.methods import cmap, paper
from entity_tracking.methods.circuit import Circuit  # noqa: E402
from entity_tracking.book import figures as viz

NAN = float("nan")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _paper_offsets(ax) -> np.ndarray:
    return np.concatenate([c.get_offsets() for c in ax.collections if c.get_gid() == "paper"] or [np.empty((0, 2))])


def _errorbars(ax) -> list[ErrorbarContainer]:
    return [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


def _cmap_rows(gain: float = 0.2, share=0.5, paper_for=None) -> pd.DataFrame:
    """Sweep rows of two fine-tunes: models alone, three output sets, one input group x 5 sites."""
    rows = []
    for ft in ("ft-a", "ft-b"):
        g = gain if ft == "ft-a" else NAN
        rows += [{"fine-tuned": ft, "kind": "model", "patched": "base alone", "sites": "", "share": NAN,
                  "share_low": NAN, "share_high": NAN, "group": "", "desideratum": ""},
                 {"fine-tuned": ft, "kind": "model", "patched": "fine-tuned alone", "sites": "", "share": g,
                  "share_low": g - 0.1, "share_high": g + 0.1, "group": "", "desideratum": ""}]
        for hs in (cmap.HeadSet({}), cmap.HeadSet({}, "value_fetcher", "object_value"), cmap.HeadSet({}, "value_fetcher")):
            s = share if ft == "ft-a" else NAN
            rows.append({"fine-tuned": ft, "kind": "output", "patched": hs.label, "sites": "z", "share": s,
                         "share_low": s - 0.3, "share_high": s + 0.3, "group": hs.group, "desideratum": hs.desideratum})
        for site in ("q", "k", "v", "qk", "qkv"):
            s = share if ft == "ft-a" else NAN
            rows.append({"fine-tuned": ft, "kind": "input", "patched": "value_fetcher (DCM object_value)",
                         "sites": site, "share": s, "share_low": NAN, "share_high": NAN, "group": "value_fetcher",
                         "desideratum": "object_value"})
    df = pd.DataFrame(rows)
    if paper_for:
        df["paper"] = [cmap.paper_share(r, paper_for.get(r["fine-tuned"])) for r in df.to_dict("records")]
    return df


def test_plot_intervals_one_container_per_hue_and_paper_where_given():
    fig, ax = plt.subplots()
    df = pd.DataFrame({"cat": ["a", "a", "b", "b"], "h": ["x", "y", "x", "y"], "value": [0.2, 0.4, NAN, 0.6],
                       "low": [0.1, NAN, NAN, 0.5], "high": [0.3, NAN, NAN, 0.7], "paper": [NAN, 0.5, NAN, NAN]})
    viz.plot_intervals(ax, df, "cat", hue="h")
    assert len(_errorbars(ax)) == 2
    assert _paper_offsets(ax).shape == (1, 2)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]


def test_plot_intervals_clips_points_beyond_the_limits():
    fig, ax = plt.subplots()
    df = pd.DataFrame({"cat": ["a", "b", "c"], "value": [-5.0, 0.5, 9.0], "low": [-8, 0, 7], "high": [-1, 1, 12]})
    ends = viz.plot_intervals(ax, df, "cat", horizontal=True, clip=(-1.0, 2.0))
    clipped = [c for c in ax.collections if c.get_gid() == "clipped"]
    assert sum(len(c.get_offsets()) for c in clipped) == 2
    assert min(ends) == -1.0 and max(ends) == 2.0


def test_gain_shares_two_panels_per_fine_tune_and_titles_carry_the_gain():
    fig = viz.plot_gain_shares(_cmap_rows())
    axes = fig.axes
    assert len(axes) == 4  # (ft-a, ft-b) x (output, input)
    out_a, in_a = axes[0], axes[1]
    assert "gain +0.200" in out_a.get_title()
    assert len(_errorbars(out_a)) == 1  # one series of output sets
    assert len(_errorbars(in_a)) == 5  # q, k, v, qk, qkv
    assert len(out_a.get_yticklabels()) == 3
    assert not any(c.get_gid() == "paper" for ax in axes for c in ax.collections)


def test_gain_shares_without_gain_does_not_raise_and_says_so():
    rows = _cmap_rows(gain=NAN, share=NAN)
    fig = viz.plot_gain_shares(rows)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any("no fine-tuning gain" in t for t in texts)


def test_gain_shares_paper_markers_only_where_the_paper_has_a_number():
    rows = _cmap_rows(paper_for={"ft-a": "Goat-7B", "ft-b": None})
    fig = viz.plot_gain_shares(rows)
    out_a, in_a, out_b, in_b = fig.axes
    # Goat-7B: output CMAP of the full circuit and of the Value Fetchers' DCM heads (not the whole
    # group); input CMAP of the Value Fetchers' DCM heads at all five sites; nothing for ft-b.
    assert len(_paper_offsets(out_a)) == 2
    assert len(_paper_offsets(in_a)) == 5
    assert len(_paper_offsets(out_b)) == 0 and len(_paper_offsets(in_b)) == 0
    full = (paper.CMAP_OUTPUT["Goat-7B"]["full circuit"] - 0.66) / (paper.ACCURACY["Goat-7B"] - 0.66)
    assert math.isclose(_paper_offsets(out_a)[0][0], full)


def test_gain_shares_without_input_rows_or_models():
    rows = _cmap_rows()
    fig = viz.plot_gain_shares(rows[rows["kind"] != "input"])
    assert len(fig.axes) == 4
    assert any("nothing patched" in t.get_text() for t in fig.axes[1].texts)
    fig = viz.plot_gain_shares(pd.DataFrame(columns=rows.columns))
    assert len(fig.axes) == 1


def test_paper_share_of_rows_the_paper_did_not_patch_is_nan():
    row = {"kind": "output", "patched": "position_detector (whole group)", "sites": "z", "group": "position_detector",
           "desideratum": ""}
    assert math.isnan(cmap.paper_share(row, "Goat-7B"))
    assert math.isnan(cmap.paper_share({**row, "group": ""}, None))
    assert math.isnan(cmap.paper_share({"kind": "input", "patched": "value_fetcher (DCM object_value)",
                                        "sites": "q", "group": "value_fetcher", "desideratum": "object_value"}, "FLoat-7B"))
    assert math.isnan(cmap.paper_share({**row, "kind": "model", "patched": "fine-tuned alone", "group": ""}, "Goat-7B"))
    assert math.isclose(cmap.paper_share({**row, "group": "structure_reader"}, "Goat-7B"),
                        (0.65 - 0.66) / (0.82 - 0.66))


def _semantics(std=2.0) -> pd.DataFrame:
    rows = []
    for model in ("base", "ft"):
        for g in ("value_fetcher", "position_transmitter"):
            for d in ("positional", "object_value", "box_label_value"):
                rows.append({"group": g, "desideratum": d, "selected_for": d, "model": model, "n_heads": 2,
                             "mean": 40.0, "std": std, "pairs": "fresh", "n_runs": 3})
    return pd.DataFrame(rows)


def test_semantics_intervals_one_panel_per_group_one_series_per_model():
    groups = ["value_fetcher", "position_transmitter", "position_detector"]
    df = _semantics()
    df["paper"] = [paper.DCM_SEMANTICS.get((g, d), {}).get("Llama-7B") if m == "base" else None
                   for g, d, m in zip(df["group"], df["desideratum"], df["model"])]
    fig = viz.plot_semantics_intervals(df, groups)
    assert len(fig.axes) == 3
    for ax in fig.axes[:2]:
        assert len(_errorbars(ax)) == 2
        assert len(_paper_offsets(ax)) == 2  # positional and object value; no box-label number given
    assert any("no heads" in t.get_text() for t in fig.axes[2].texts)
    lo, hi = _errorbars(fig.axes[0])[0].lines[2][0].get_segments()[0][:, 1]
    se = 2.0 / math.sqrt(3)
    assert math.isclose(lo, 40 - 1.96 * se, rel_tol=1e-6) and math.isclose(hi, 40 + 1.96 * se, rel_tol=1e-6)


def test_semantics_intervals_nan_std_and_empty_frame():
    fig = viz.plot_semantics_intervals(_semantics(std=NAN))
    assert len(fig.axes) == 2
    fig = viz.plot_semantics_intervals(_semantics().iloc[:0])
    assert len(fig.axes) == 1


def _summary(v: float, width: float = 0.05) -> dict:
    keys = ("full_accuracy", "circuit_accuracy", "random_accuracy", "faithfulness")
    return {k: {"value": v, "low": v - width, "high": v + width} for k in keys}


def test_faithfulness_two_panels_and_paper_markers_per_model_given():
    summaries = {"base": _summary(0.6), "ft": _summary(0.7)}
    fig = viz.plot_faithfulness(summaries, {"base": paper.FAITHFULNESS["Llama-7B"]})
    ax_acc, ax_f = fig.axes
    assert len(_errorbars(ax_acc)) == 3  # full model, circuit, random circuit
    assert len(_errorbars(ax_f)) == 1
    assert len(_paper_offsets(ax_acc)) == 3 and len(_paper_offsets(ax_f)) == 1
    assert [t.get_text() for t in ax_f.get_xticklabels()] == ["base", "ft"]


def test_faithfulness_nan_intervals_and_no_paper():
    s = _summary(0.0)
    s["faithfulness"] = {"value": NAN, "low": NAN, "high": NAN}  # F(M) = 0: no faithfulness
    fig = viz.plot_faithfulness({"base": s})
    assert len(fig.axes) == 2
    assert not any(c.get_gid() == "paper" for ax in fig.axes for c in ax.collections)


def test_minimality_rows_cap_scores_and_skip_unmeasurable_models(tmp_path):
    est = {"value": 0.5, "low": 0.4, "high": 0.6}
    measured = Circuit("a", {"value_fetcher": [(1, 0)]},
                       meta={"minimality": {"measurable": True, "circuit_accuracy": est, "chance": 0.14, "decision": "pruned"}})
    at_chance = Circuit("b", {"value_fetcher": [(1, 0)]},
                        meta={"minimality": {"measurable": False, "circuit_accuracy": est, "chance": 0.14, "decision": "kept all"}})
    heads = [{"group": "value_fetcher", "head": [1, 0], "score": 250.0, "kept": True},
             {"group": "value_fetcher", "head": [1, 2], "score": 0.5, "kept": False}]
    write_json(tmp_path / "minimality_a.json", {"heads": heads})
    write_json(tmp_path / "minimality_b.json", {"heads": heads})
    rows, decisions = viz.minimality_rows({"a": measured, "b": at_chance}, tmp_path, ["a", "b"])
    assert [d["model"] for d in decisions] == ["a", "b"] and decisions[1]["pruning"] == "kept all"
    assert {r["model"] for r in rows} == {"a"}  # b's candidates were at chance: no bars
    assert [r["score"] for r in rows] == [viz.MINIMALITY_CAP, 0.5] and rows[0]["head"] == "1.0"
