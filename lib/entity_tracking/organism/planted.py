"""Build and cache the planted models of the ground-truth chapter (issue 29): the paper's mechanism
trained into designated heads (:func:`.plant.plant_stages`, the 7-box curriculum
:data:`.plant.STAGES_7`), and two fine-tunes of it whose answer to the paper's question is known.

* ``base``: the planted model. Its ``ground_truth.json`` names the heads of each group (Position
  Detectors 1.0 1.1 at the query label, Position Transmitters 2.0 2.1 and Value Fetchers 3.0 3.1
  at the last token) and the scaffold (head 0.0, a position code, not a circuit node).
* ``enhance`` (fine-tune (a), "enhances"): the base with one group's value rows scaled down (the
  degraded base, ``enhance_base``), fine-tuned changing only that group's heads. Known answer: the
  same circuit, the gain carried by that group.
* ``route`` (fine-tune (b), "new route"): the base with another group degraded (``route_base``),
  fine-tuned changing only heads *outside* the circuit, every circuit head frozen. Known answer:
  the gain is carried by the new heads, and patching the base circuit recovers none of it (the new
  heads sit in the last layer, so no circuit head's input changes).

Each directory holds the weights, the tokenizer, ``recipe.json`` (hash, recipe, log, seconds, CPU,
threads), ``ground_truth.json`` and ``stream.npy``: the :func:`.plant.context_keys` of every prompt
its training drew (for a fine-tune, the base's and its own), which the chapter's overlap audit
compares with the book's prompts. A build is reused while its hash (the recipe, the stages, the
fine-tune's fields, :data:`PLANTED_VERSION`) matches.

>>> # models = ensure_planted(profile.ground_truth, ResultsPaths.for_profile("default"))
>>> # models.base, models.enhance_base, models.enhance
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import GroundTruthSpec, PlantedFinetuneSpec
from ..io import ResultsPaths, atomic_dir, cpu_name, read_json, write_json
from ..model.tokenizer import build_word_tokenizer
from . import plant as P
from .train import train_threads

__all__ = ["PLANTED_VERSION", "PlantedModels", "ensure_planted", "is_planted", "planted_dirs", "planted_hash", "planted_stages", "read_stream",
           "truth_json"]

#: Bump when a change of the trainer changes the planted weights.
PLANTED_VERSION = 1
STREAM_FILE = "stream.npy"


@dataclasses.dataclass(frozen=True)
class PlantedModels:
    """The directories of one planted build."""

    base: Path
    enhance_base: Path
    enhance: Path
    route_base: Path
    route: Path


def planted_stages(spec: GroundTruthSpec) -> list[dict]:
    """:data:`.plant.STAGES_7` with each stage's steps times ``spec.steps_scale`` (at least 1)."""
    return [{**s, "steps": max(1, round(s["steps"] * spec.steps_scale))} for s in P.STAGES_7]


def _recipe(spec: GroundTruthSpec) -> P.PlantRecipe:
    return dataclasses.replace(P.PLANTED, seed=spec.seed)


def planted_hash(spec: GroundTruthSpec, kind: str = "base") -> str:
    """SHA-256 (16 hex digits) of what fixes the planted model of ``kind`` (``base``, ``enhance``,
    ``route``): the recipe, the stages and, for a fine-tune, its fields."""
    payload: dict[str, Any] = {"version": PLANTED_VERSION, "recipe": dataclasses.asdict(_recipe(spec)),
                               "stages": planted_stages(spec)}
    if kind != "base":
        payload.update(kind=kind, finetune=getattr(spec, kind).model_dump(mode="json"))
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def truth_json(recipe: P.PlantRecipe, n_boxes: int, meta: Optional[dict] = None) -> dict:
    """The ground-truth file's content (read by
    :class:`entity_tracking.methods.planting.GroundTruth`): the designated heads of each group,
    where they act, the causal variable each implements, and the scaffold."""
    heads = recipe.designated()
    return {"heads": {g: [list(h) for h in hs] for g, hs in heads.items()},
            "positions": {g: P.GROUP_POSITION[g] for g in heads},
            "variables": {g: P.GROUP_VARIABLE[g] for g in heads},
            "n_layers": recipe.n_layers, "n_heads": recipe.n_heads,
            "meta": {"num_boxes": n_boxes,
                     "scaffold": {"position_code": [[0, 0]] if recipe.code_head else []},
                     "scaffold_note": "head 0.0 is trained to attend uniformly to BOS and the segment starts: an "
                                      "ordinal code meant to be the same in every prompt of one layout (ours; not a "
                                      "circuit node)",
                     **(meta or {})}}


def read_stream(model_dir: str | Path) -> set[int]:
    """The context keys of every prompt the planted model's training drew."""
    return set(int(k) for k in np.load(Path(model_dir) / STREAM_FILE))


def _cached(d: Path, h: str) -> bool:
    f = d / "recipe.json"
    try:
        return f.is_file() and read_json(f).get("hash") == h
    except (OSError, ValueError):
        return False


def _save(d: Path, model, tok, record: dict, truth: dict, stream: set[int]) -> None:
    with atomic_dir(d) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(str(tmp))
        write_json(tmp / "recipe.json", record)
        write_json(tmp / "ground_truth.json", truth)
        np.save(tmp / STREAM_FILE, np.array(sorted(stream), dtype=np.uint64))


def planted_dirs(spec: GroundTruthSpec, paths: ResultsPaths) -> PlantedModels:
    """Where the planted models of ``spec`` live (built or not): ``models/planted-<hash>`` and
    ``models/planted-<kind>-<hash>/{degraded,finetuned}``."""
    def ft(kind: str) -> Path:
        return paths.models / f"planted-{kind}-{planted_hash(spec, kind)}"

    return PlantedModels(paths.models / f"planted-{planted_hash(spec)}", ft("enhance") / "degraded",
                         ft("enhance") / "finetuned", ft("route") / "degraded", ft("route") / "finetuned")


def is_planted(spec: GroundTruthSpec, paths: ResultsPaths) -> bool:
    """Whether every planted model of ``spec`` is built and matches its recipe hash."""
    d = planted_dirs(spec, paths)
    return (_cached(d.base, planted_hash(spec)) and all(_cached(x, planted_hash(spec, "enhance")) for x in (d.enhance_base, d.enhance))
            and all(_cached(x, planted_hash(spec, "route")) for x in (d.route_base, d.route)))


def _finetune(kind: str, ft: PlantedFinetuneSpec, spec: GroundTruthSpec, base_dir: Path, paths: ResultsPaths,
              progress: bool) -> tuple[Path, Path]:
    from transformers import AutoModelForCausalLM

    h = planted_hash(spec, kind)
    dirs = planted_dirs(spec, paths)
    degraded, tuned = (dirs.enhance_base, dirs.enhance) if kind == "enhance" else (dirs.route_base, dirs.route)
    if _cached(degraded, h) and _cached(tuned, h):
        return degraded, tuned
    recipe = dataclasses.replace(_recipe(spec), **planted_stages(spec)[-1])
    base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    tok = build_word_tokenizer()
    group_heads = recipe.designated()[ft.group]
    trained = [tuple(h) for h in ft.heads] if ft.heads is not None else group_heads
    circuit = {h for hs in recipe.designated().values() for h in hs}
    if ft.heads is not None and circuit & set(trained):
        raise ValueError(f"ground_truth.{kind}.heads {sorted(circuit & set(trained))} are circuit heads: a new "
                         "route is trained outside the circuit")
    P.degrade_heads(base, group_heads, ft.scale)
    model = copy.deepcopy(base)
    stream = read_stream(base_dir)
    t0 = time.perf_counter()
    with train_threads() as n_threads:
        log = P.train_heads_only(model, recipe, trained, ft.steps, lr=ft.lr, seed=ft.seed,
                                 projections=tuple(ft.projections), progress=progress, stream=stream)
    answer = ("the gain is carried by the degraded group's own heads, retrained" if ft.heads is None else
              "the gain is carried by the trained heads outside the circuit; no circuit head's output changes")
    meta = {"finetune": {"kind": kind, "degraded_group": ft.group, "scale": ft.scale,
                         "trained_heads": [list(h) for h in trained], "projections": list(ft.projections),
                         "known_answer": answer}}
    truth = truth_json(recipe, recipe.num_boxes, meta)
    common = {"kind": f"planted-{kind}", "hash": h, "base_hash": planted_hash(spec), "finetune": ft.model_dump(mode="json")}
    _save(degraded, base, tok, {**common, "role": "degraded base"}, truth, read_stream(base_dir))
    _save(tuned, model, tok, {**common, "role": "fine-tuned", "log": log, "train_seconds": round(time.perf_counter() - t0, 1),
                              "cpu": cpu_name(), "torch_threads": n_threads}, truth, stream)
    return degraded, tuned


def ensure_planted(spec: GroundTruthSpec, paths: ResultsPaths, progress: bool = True) -> PlantedModels:
    """Build (or reuse) the planted base and its two fine-tunes; returns their directories."""
    h = planted_hash(spec)
    base = planted_dirs(spec, paths).base
    if not _cached(base, h):
        recipe, stages = _recipe(spec), planted_stages(spec)
        stream: set[int] = set()
        t0 = time.perf_counter()
        with train_threads() as n_threads:
            model, tok, log = P.plant_stages(recipe, stages, progress=progress, stream=stream)
        last = dataclasses.replace(recipe, **stages[-1])
        record = {"kind": "planted", "hash": h, "version": PLANTED_VERSION, "recipe": dataclasses.asdict(last),
                  "stages": stages, "log": log, "train_seconds": round(time.perf_counter() - t0, 1), "cpu": cpu_name(),
                  "torch_threads": n_threads}
        _save(base, model, tok, record, truth_json(last, last.num_boxes), stream)
    enhance_base, enhance = _finetune("enhance", spec.enhance, spec, base, paths, progress)
    route_base, route = _finetune("route", spec.route, spec, base, paths, progress)
    return PlantedModels(base, enhance_base, enhance, route_base, route)
