"""Scoring the book's methods against planted ground truth (issue 29; the ground-truth chapter).

A planted model (:mod:`entity_tracking.organism.planted`) implements the paper's mechanism in
known heads (:class:`~entity_tracking.methods.planting.GroundTruth`). Each method of the book is
run on it exactly as its chapter runs it, and its answer is scored against the truth, always
beside a baseline that knows nothing: random head sets of the same sizes (precision, recall,
interchange accuracy), chance (``1 / num_boxes``), the model left alone.

* :func:`overlap_audit`: do the book's prompts occur in the planted trainer's stream?
* :func:`interchange_table`: interchange accuracy of each planted group against the causal
  model's counterfactual, beside random head sets of its size at the same position.
* :func:`recovery_table`: per-group precision and recall of a discovered circuit, beside random
  circuits of its group sizes.
* :func:`wide_circuit` and :func:`dcm_recovery`: DCM given every head at each group position, and
  how the heads it selects for each desideratum match the planted ones.

>>> t = GroundTruth({"position_detector": [(1, 0)], "value_fetcher": [(3, 0)]},
...                 {"position_detector": "query_label", "value_fetcher": "last"}, n_layers=4, n_heads=4)
>>> rows = recovery_table(t, {"position_detector": [(1, 0), (2, 1)], "value_fetcher": [(3, 0)]}, n_random=50)
>>> [(r["group"], r["precision"], r["recall"]) for r in rows][:2]
[('position_detector', 0.5, 1.0), ('value_fetcher', 1.0, 1.0)]
"""

from __future__ import annotations

import random
from typing import Any, Mapping, Sequence

import torch

from ..intervene.stats import bootstrap
from ..io import read_json
from ..organism.plant import context_keys, layout, prompt_ids
from ..schema import Head
from ..task.encoding import encode_pairs
from .ablation import model_accuracy
from .binding import accuracy_by_box, context_ablation
from .circuit import Circuit
from .cmap import HeadSet, head_sets
from .verdicts import CMAP_RECOVERY
from .planting import (GroundTruth, Recovery, counterfactual_targets, interchange_logits, recovery,
                       resample_ablated_logits)

__all__ = ["cmap_finding", "input_sets", "dcm_finding", "recovery_finding", "NEW_HEADS", "cmap_sets", "training_table", "share_of", "book_context_keys", "planted_checks", "dcm_recovery", "interchange_table", "overlap_audit", "random_recovery", "recovery_table",
           "resample_outside", "truth_circuit", "wide_circuit", "DESIDERATUM_VARIABLE"]

#: The causal variable a DCM desideratum isolates: ``positional`` moves the answer to the base's
#: object at the source's index (the position), ``object_value`` gives the source's object (the value).
DESIDERATUM_VARIABLE = {"positional": "position", "object_value": "value"}


def truth_circuit(truth: GroundTruth, model: str = "planted") -> Circuit:
    """The planted heads as a :class:`~entity_tracking.methods.circuit.Circuit` (for faithfulness
    and CMAP, which take circuits)."""
    return Circuit(model, {g: list(hs) for g, hs in truth.heads.items()}, positions=dict(truth.positions),
                   meta={"planted": True})


def overlap_audit(stream: set[int], keys_of: Mapping[str, Sequence[int]]) -> list[dict[str, Any]]:
    """For each named prompt set (``{name: context keys}``,
    :func:`entity_tracking.organism.plant.context_keys` of its prompts), how many of its contexts
    the planted trainer drew: ``{"prompts", "n", "contexts", "in_stream"}`` rows. Any hit means a
    "held-out" number was measured on a context the model trained on."""
    out = []
    for name, keys in keys_of.items():
        keys = [int(k) for k in keys]
        out.append({"prompts": name, "n": len(keys), "contexts": len(set(keys)),
                    "in_stream": len(set(keys) & stream)})
    return out


def _all_heads(n_layers: int, n_heads: int) -> list[Head]:
    return [(l, h) for l in range(n_layers) for h in range(n_heads)]


def _acc(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred == target).float()


def interchange_table(lm, truth: GroundTruth, pairs: Sequence[Mapping[str, Any]], *, n_random: int = 20,
                      seed: int = 0, n_resamples: int = 1000) -> list[dict[str, Any]]:
    """Interchange accuracy of each planted group on ``pairs`` (desiderata records): the group's
    heads take the source's outputs at the group's position, and the base run must give the causal
    model's counterfactual (:func:`~entity_tracking.methods.planting.counterfactual_targets`).
    Beside it: ``random``, the mean over ``n_random`` random head sets of the group's size at the
    same position (any heads, the planted ones included), and their paired ``excess``. The interval resamples pairs (the random sets' mean
    over the same resampled pairs, paired)."""
    rng = random.Random(seed)
    every = _all_heads(truth.n_layers, truth.n_heads)
    rows = []
    with torch.no_grad():
        for g, heads in truth.heads.items():
            target = counterfactual_targets(lm.tokenizer, pairs, truth.variable(g))
            pos = truth.positions[g]
            planted = _acc(interchange_logits(lm, pairs, heads, pos).argmax(-1).cpu(), target)
            draws = [_acc(interchange_logits(lm, pairs, sorted(rng.sample(every, len(heads))), pos).argmax(-1).cpu(),
                          target) for _ in range(n_random)]
            vec = torch.stack([planted, torch.stack(draws).mean(0)])
            est = bootstrap(vec, n_resamples=n_resamples, seed=seed)
            rnd = bootstrap(vec, lambda a: a[1], n_resamples=n_resamples, seed=seed)
            excess = bootstrap(vec, lambda a: a[0] - a[1], n_resamples=n_resamples, seed=seed)
            rows.append({"group": g, "variable": truth.variable(g), "heads": [list(h) for h in heads], "position": pos,
                         "interchange": est.as_dict(), "random": rnd.as_dict(), "excess": excess.as_dict(),
                         "n_pairs": len(pairs), "n_random": n_random})
    return rows


def resample_outside(lm, truth: GroundTruth, pairs: Sequence[Mapping[str, Any]], *, n_resamples: int = 1000,
                     seed: int = 0) -> dict[str, Any]:
    """SIIT's strict check: accuracy with every head outside the planted circuit resample-ablated
    (its output at every position from the pair's source), and the share of the clean accuracy it
    keeps, with intervals over pairs."""
    with torch.no_grad():
        logits, answers = resample_ablated_logits(lm, pairs, truth.outside())
    ablated = _acc(logits.argmax(-1).cpu(), answers.cpu())
    clean = torch.as_tensor(model_accuracy(lm, encode_pairs(lm.tokenizer, pairs)["base"]).correct).float()
    vec = torch.stack([ablated, clean])
    return {"ablated": bootstrap(vec, n_resamples=n_resamples, seed=seed).as_dict(),
            "clean": bootstrap(vec, lambda a: a[1], n_resamples=n_resamples, seed=seed).as_dict(),
            "kept": bootstrap(vec, lambda a: a[0] / a[1], n_resamples=n_resamples, seed=seed).as_dict(),
            "n_pairs": len(pairs), "outside": len(truth.outside())}


def random_recovery(truth: GroundTruth, sizes: Mapping[str, int], *, n_random: int = 1000, seed: int = 0
                    ) -> dict[str, dict[str, float]]:
    """Precision and recall of random circuits with ``sizes`` heads per group (each group drawn
    without replacement from the whole model, as a discovered circuit's groups may share heads at
    their different positions): per group, their mean and 95th percentile.
    A discovery method that knows nothing scores this."""
    rng = random.Random(seed)
    every = _all_heads(truth.n_layers, truth.n_heads)
    big = {g: k for g, k in sizes.items() if k > len(every)}
    if big:
        raise ValueError(f"random circuits: groups {big} hold more heads than the model's {len(every)}")
    scores: dict[str, dict[str, list[float]]] = {}
    for _ in range(n_random):
        groups = {g: rng.sample(every, k) for g, k in sizes.items()}
        for g, r in recovery(truth, groups).items():
            s = scores.setdefault(g, {"precision": [], "recall": []})
            s["precision"].append(r.precision)
            s["recall"].append(r.recall)

    def q95(xs):
        xs = sorted(x for x in xs if x == x)
        return xs[min(len(xs) - 1, int(0.95 * len(xs)))] if xs else float("nan")

    def mean(xs):
        xs = [x for x in xs if x == x]
        return sum(xs) / len(xs) if xs else float("nan")

    return {g: {"precision_mean": mean(s["precision"]), "precision_q95": q95(s["precision"]),
                "recall_mean": mean(s["recall"]), "recall_q95": q95(s["recall"])} for g, s in scores.items()}


def recovery_table(truth: GroundTruth, groups: Mapping[str, Sequence[Head]], *, n_random: int = 1000, seed: int = 0
                   ) -> list[dict[str, Any]]:
    """Per planted group (and ``"circuit"``, every head whatever its group), the precision and
    recall of ``groups`` (a discovered circuit's), beside random circuits of the same group sizes
    (:func:`random_recovery`). Groups the discovery found that nothing was planted in (the
    Structure Readers) count in ``"circuit"`` only."""
    found = recovery(truth, groups)
    rand = random_recovery(truth, {g: len(hs) for g, hs in groups.items()}, n_random=n_random, seed=seed)
    rows = []
    for g, r in found.items():
        rows.append({"group": g, "found": r.found, "planted": r.planted, "hits": r.hits, "precision": r.precision,
                     "recall": r.recall, **{f"random_{k}": v for k, v in rand.get(g, {}).items()}})
    return rows


def wide_circuit(n_layers: int, n_heads: int, positions: Mapping[str, str], model: str = "planted") -> Circuit:
    """A circuit whose every group holds every head of the model, each group at its position: DCM
    learns its masks over all heads, so which heads it selects is its own answer, not path
    patching's."""
    every = _all_heads(n_layers, n_heads)
    return Circuit(model, {g: list(every) for g in positions}, positions=dict(positions), meta={"wide": True})


def dcm_recovery(truth: GroundTruth, selected: Mapping[tuple[str, str], Sequence[Head]],
                 positions: Mapping[str, str], *, n_random: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """For each (group, desideratum) DCM learned a mask for, with its candidates at ``positions[group]``:
    the :class:`~entity_tracking.methods.planting.Recovery` of the selected heads against the heads
    planted at that position for the desideratum's variable (:data:`DESIDERATUM_VARIABLE`), beside
    random selections of the same size. A desideratum no head at that position was planted for has
    ``planted`` 0: every selected head there is a false find."""
    rng = random.Random(seed)
    every = _all_heads(truth.n_layers, truth.n_heads)
    rows = []
    for (g, d), heads in selected.items():
        var = DESIDERATUM_VARIABLE.get(d)
        if var is None:
            continue
        at = positions[g]
        planted = [h for grp, hs in truth.heads.items() if truth.positions[grp] == at and truth.variable(grp) == var
                   for h in hs]
        r = Recovery.of(heads, planted)
        draws = [Recovery.of(rng.sample(every, len(heads)), planted) for _ in range(n_random)] if heads else []
        prec = [x.precision for x in draws if x.precision == x.precision]
        rec = [x.recall for x in draws if x.recall == x.recall]
        rows.append({"position": at, "desideratum": d, "variable": var, "selected": [list(h) for h in heads],
                     "planted": [list(h) for h in planted], "hits": r.hits, "precision": r.precision,
                     "recall": r.recall,
                     "random_precision": sum(prec) / len(prec) if prec else float("nan"),
                     "random_recall": sum(rec) / len(rec) if rec else float("nan")})
    return rows


def book_context_keys(tokenizer, prompts: Sequence[Mapping[str, Any]]) -> list[int]:
    """The :func:`~entity_tracking.organism.plant.context_keys` of the book's prompt records (eval
    prompts, or one side of each pair), in the planted trainer's layout, for :func:`overlap_audit`."""
    by_n: dict[int, list[Mapping[str, Any]]] = {}
    for p in prompts:
        by_n.setdefault(len(p["objects"]), []).append(p)
    out: list[int] = []
    for n, ps in by_n.items():
        lay, _ = layout(n, tokenizer)
        out += context_keys(prompt_ids(tokenizer, ps, lay), lay)
    return out


def planted_checks(lm, truth: GroundTruth, eval_prompts: Sequence[Mapping[str, Any]], means,
                   pairs: Sequence[Mapping[str, Any]], *, n_random: int = 20, seed: int = 0,
                   n_resamples: int = 1000, batch_size: int = 32) -> dict[str, Any]:
    """The planted base's checks (issue 29), through the book's kernel on the book's prompts:
    accuracy per queried box and the context-ablation test of the binding chapter
    (``eval_prompts``, ``means`` of the mean-reference prompts; intervals over contexts), the
    interchange accuracy of each group (:func:`interchange_table`) and the strict check
    (:func:`resample_outside`) on ``pairs`` (``positional`` desiderata). JSON-ready; the keys
    :func:`~entity_tracking.methods.verdicts.planted_verdict` reads."""
    ctx = context_ablation(lm, eval_prompts, means, batch_size=batch_size, progress=False)
    summ = ctx.summary(n_resamples=n_resamples, seed=seed)
    boxes = accuracy_by_box(lm, eval_prompts, evaluation=ctx.evaluations["clean"], n_resamples=n_resamples,
                            seed=seed, progress=False)
    iia = interchange_table(lm, truth, pairs, n_random=n_random, seed=seed, n_resamples=n_resamples)
    strict = resample_outside(lm, truth, pairs, n_resamples=n_resamples, seed=seed)
    n_ctx = summ["clean"].n_clusters
    return {"clean": summ["clean"].as_dict(), "by_box": [b.estimate.value for b in boxes],
            "boxes": [b.as_dict() for b in boxes],
            "context_ablated": summ["context_ablated"].as_dict(),
            "context_kept": summ["retention_context_ablated"].as_dict(),
            "interchange": {r["group"]: r["interchange"] for r in iia}, "interchange_rows": iia,
            "outside_kept": strict["kept"], "strict": strict,
            "sample": (f"{len(eval_prompts)} prompts ({n_ctx} contexts, intervals over contexts); {len(pairs)} "
                       f"positional pairs (intervals over pairs); {n_random} random head sets per group")}


def share_of(rows: Sequence[Mapping[str, Any]], patched: str) -> dict[str, float]:
    """The share of the gain (``{"value", "low", "high"}``) of one patched set among
    :func:`entity_tracking.methods.cmap.gain_recovery` rows."""
    r = next((r for r in rows if r["patched"] == patched), None)
    if r is None:
        raise KeyError(f"no CMAP row patched {patched!r}; rows: {sorted({r['patched'] for r in rows})}")
    return {"value": r["share"], "low": r["share_low"], "high": r["share_high"]}


def training_table(models) -> "Any":
    """One row per planted model (a :class:`~entity_tracking.organism.planted.PlantedModels`): how
    it was trained (steps per stage, seconds, CPU, threads) and the trainer's last evaluation on
    its own held-out pairs (a pandas DataFrame)."""
    import pandas as pd

    rows = []
    for label, d in (("base", models.base), ("fine-tune (a), degraded base", models.enhance_base),
                     ("fine-tune (a)", models.enhance), ("fine-tune (b), degraded base", models.route_base),
                     ("fine-tune (b)", models.route)):
        rec = read_json(d / "recipe.json")
        last = (rec.get("log") or [{}])[-1]
        steps = ("+".join(str(s["steps"]) for s in rec["stages"]) if "stages" in rec
                 else str(rec["finetune"]["steps"]) if "log" in rec else "")
        rows.append({"model": label, "steps": steps, "seconds": rec.get("train_seconds", ""), "CPU": rec.get("cpu", ""),
                     "threads": rec.get("torch_threads", ""), "trainer's clean accuracy": last.get("clean", ""),
                     **{f"trainer's interchange, {g.split('_')[1]}": last.get(f"iia_{g}", "")
                        for g in ("position_detector", "position_transmitter", "value_fetcher")}})
    return pd.DataFrame(rows)


#: How CMAP tables name the heads a "new route" fine-tune trained outside the circuit.
NEW_HEADS = "new heads (outside the circuit)"


def cmap_sets(truth: GroundTruth, finetune: Mapping[str, Any]) -> dict[str, Mapping[str, Sequence[Head]]]:
    """The head sets CMAP patches from a planted fine-tune (its ground truth's ``meta["finetune"]``):
    the full planted circuit and each planted group (:func:`entity_tracking.methods.cmap.head_sets`)
    and, for a new route, the heads it trained (:data:`NEW_HEADS`, at the last token)."""
    sets: dict[str, Mapping[str, Sequence[Head]]] = dict(head_sets(truth_circuit(truth)))
    if finetune.get("kind") == "route":
        sets[NEW_HEADS] = {"last": [(int(l), int(h)) for l, h in finetune["trained_heads"]]}
    return sets


def _heads(hs: Sequence[Sequence[int]]) -> str:
    return " ".join(f"{l}.{h}" for l, h in hs) or "none"


def recovery_finding(readings: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """One sentence per reading of the path-patching sweep (``{reading: recovery_table rows}``),
    made of its numbers: what it found of the planted heads, and what else."""
    out = []
    for name, rows in readings.items():
        groups = [r for r in rows if r["group"] != "circuit"]
        union = next(r for r in rows if r["group"] == "circuit")
        recall = min(r["recall"] for r in groups)
        extra = union["found"] - union["hits"]
        what = ("finds every planted head in its own group" if recall == 1 else
                f"finds at least {recall:.0%} of each group's planted heads")
        pad = (f", and {extra} head(s) that were not planted (precision by group "
               + " / ".join(f"{r['precision']:.2f}" for r in groups)
               + f"; random circuits of the same sizes {union['random_precision_mean']:.2f} over the whole circuit)"
               if extra else ", and nothing else")
        out.append(f"**{name}**: {what}{pad}.")
    return " ".join(out)


def dcm_finding(rows: Sequence[Mapping[str, Any]]) -> str:
    """What DCM selected beyond the planted heads, desideratum by desideratum, from
    :func:`dcm_recovery` rows."""
    parts = []
    for r in rows:
        if not r["planted"] and not r["selected"]:
            parts.append(f"for `{r['desideratum']}` at the {r['position']} nothing was planted and DCM selects nothing")
            continue
        extra = [h for h in r["selected"] if h not in r["planted"]]
        missed = [h for h in r["planted"] if h not in r["selected"]]
        parts.append(f"for `{r['desideratum']}` at the {r['position']} it selects {_heads(r['selected'])} (planted "
                     f"{_heads(r['planted'])}" + (f"; also {_heads(extra)}" if extra else "")
                     + (f"; missed {_heads(missed)}" if missed else "") + ")")
    return "DCM, given every head: " + "; ".join(parts) + "."


def input_sets(truth: GroundTruth) -> dict[str, HeadSet]:
    """The head sets whose inputs (query, key, value) input CMAP patches from a planted fine-tune:
    each planted group whose heads act at the last token, whole (the CMAP chapter's
    :func:`entity_tracking.methods.cmap.input_sets` are DCM selections, which the planted model's
    known groups make unnecessary)."""
    sets = [HeadSet({pos: list(truth.heads[g])}, g) for g, pos in truth.positions.items() if pos == "last"]
    return {s.label: s for s in sets}


def cmap_finding(truth: GroundTruth, rows_by_finetune: Mapping[str, Sequence[Mapping[str, Any]]],
                 finetunes: Mapping[str, Mapping[str, Any]]) -> str:
    """Which planted groups' outputs recover most of each fine-tune's gain (output CMAP rows of
    :func:`entity_tracking.methods.cmap.gain_recovery`; "most": :data:`~entity_tracking.methods.verdicts.CMAP_RECOVERY`'s
    holds), beside the planted groups whose heads the fine-tune trained (``finetunes[name]``, its
    ground truth's ``meta["finetune"]``): a group downstream of a retrained one recovers the gain
    too, since its outputs inherit what its inputs gained."""
    parts = []
    for ft, rows in rows_by_finetune.items():
        trained = {tuple(h) for h in finetunes[ft]["trained_heads"]}
        changed = [g for g, hs in truth.heads.items() if trained & set(hs)]
        most = [r["group"] for r in rows if r["kind"] == "output" and r.get("group") and r["share"] == r["share"]
                and r["share"] >= CMAP_RECOVERY.holds]
        names = lambda gs: ", ".join(g.replace("_", " ") + "s" for g in gs)  # noqa: E731
        what = f"its fine-tuning retrained the {names(changed)}" if changed else "its fine-tuning retrained no planted head"
        parts.append(f"in {ft} ({what}), output CMAP recovers at least {CMAP_RECOVERY.holds:g} of the gain from "
                     + (f"the {names(most)}" if most else "no planted group"))
    text = "; ".join(parts) + "."
    return text[:1].upper() + text[1:]
