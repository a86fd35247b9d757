"""Build and cache: every organism model of a profile, trained once and reused while its recipe hash
matches (the base, the arithmetic fine-tunes with their replicate seeds, the positive control).

>>> # model_dir, adapter_dir = ensure_built(profile.model("organism-lora"), ResultsPaths(root))
"""


from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterable, Literal

from ..config import GroundTruthSpec, ModelSpec, OrganismSpec
from ..io import ResultsPaths, atomic_dir, read_json, write_json
from .finetune import FINETUNE_VERSION, control_finetune, finetune
from .planted import ensure_planted, is_planted
from .train import train_organism, train_threads

log = logging.getLogger(__name__)

# 2: the base's pretraining arithmetic leaves out the fine-tunes' held-out problems (version 1
# pretrained on 108 of the 200 that every fine-tune's exact match is measured on)
RECIPE_VERSION = 2
def base_fields(spec: OrganismSpec) -> dict:
    """The fields of the base recipe: everything but the fine-tunes', except the two that define
    their held-out arithmetic problems (``max_digits``, ``ops``), which the base's pretraining
    leaves out; ``positional`` only when set and ``train_threads`` only when above 1, so the recipes
    from before those options existed keep their hashes."""
    d = spec.model_dump(mode="json")
    ft = d.pop("finetune", None) or {}
    # the base leaves out the fine-tunes' held-out problems, which these two fields define
    d["heldout_arithmetic"] = {"max_digits": ft.get("max_digits"), "ops": ft.get("ops")}
    d.pop("control", None)
    if d.get("train_threads") == 1:
        d.pop("train_threads")
    if d.get("positional") is None:
        d.pop("positional", None)
    return d


def recipe_hash(spec: OrganismSpec, kind: str = "organism") -> str:
    """SHA-256 (first 16 hex digits) of the recipe: the base fields, the recipe version and, for a
    fine-tune (``kind`` ``organism-lora``/``organism-full``/``organism-control``), its own fields
    as well (the arithmetic recipe without its replicate seeds, or the control's recipe)."""
    payload = {"version": RECIPE_VERSION, "base": base_fields(spec)}
    if kind == "organism-control":
        payload.update(kind=kind, control=spec.control.model_dump(mode="json"), ft_version=FINETUNE_VERSION)
    elif kind != "organism":
        # steps_lora is LoRA's alone, and unset it leaves the hashes from before it existed alone
        skip = {"replicate_seeds"}
        if kind == "organism-full" or spec.finetune.steps_lora is None:
            skip.add("steps_lora")
        payload.update(kind=kind, finetune=spec.finetune.model_dump(mode="json", exclude=skip),
                       ft_version=FINETUNE_VERSION)
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def base_dir(spec: OrganismSpec, paths: ResultsPaths) -> Path:
    """Where the base organism of this recipe lives: ``models/organism-base-<hash>``, shared by
    the base model and its fine-tunes."""
    return paths.models / f"organism-base-{recipe_hash(spec)}"


def is_cached(d: Path, h: str) -> bool:
    f = d / "recipe.json"
    if not f.is_file():
        return False
    try:
        return read_json(f).get("hash") == h
    except (OSError, ValueError):
        return False



def ensure_base(spec: OrganismSpec, paths: ResultsPaths, progress: bool = True) -> Path:
    """The base organism's directory, trained and saved on first use, reused while its recipe
    hash matches."""
    h = recipe_hash(spec)
    d = base_dir(spec, paths)
    if is_cached(d, h):
        return d
    with train_threads(spec.train_threads) as n_threads:
        res = train_organism(spec, progress=progress)
    with atomic_dir(d) as tmp:
        res.model.save_pretrained(tmp)
        res.tokenizer.save_pretrained(str(tmp))
        write_json(
            tmp / "recipe.json",
            {
                "kind": "organism",
                "hash": h,
                "recipe_version": RECIPE_VERSION,
                "recipe": base_fields(spec),
                "stage_end_steps": res.stage_steps,
                "val_accuracy": res.val_accuracy,
                "reached_target": res.reached_target,
                "train_seconds": round(res.seconds, 2),
                "torch_threads": n_threads,
                "history": res.history,
            },
        )
    return d


def ensure_built(spec: ModelSpec, paths: ResultsPaths, progress: bool = True) -> tuple[Path, Path | None]:
    """Build (or reuse) the organism model of ``spec``; returns ``(model_dir, adapter_dir)``.

    ``organism``: the base, adapter ``None``. ``organism-lora``: the base directory and the
    directory of the Goat-style LoRA adapter (``models/<name>``, with ``checkpoints/step-XXXX``).
    ``organism-full``: the FLoat-style fully fine-tuned model (``models/<name>``), adapter ``None``.
    ``organism-control``: the positive control, fully fine-tuned on entity tracking, likewise.
    """
    org = spec.organism or OrganismSpec()
    if spec.build == "organism":
        return ensure_base(org, paths, progress), None
    if spec.build == "organism-lora":
        base = ensure_base(org, paths, progress)
        return base, ensure_finetune(org, "lora", base, paths.models / spec.name, progress)
    if spec.build == "organism-full":
        base = ensure_base(org, paths, progress)
        return ensure_finetune(org, "full", base, paths.models / spec.name, progress), None
    if spec.build == "organism-control":
        base = ensure_base(org, paths, progress)
        return ensure_finetune(org, "control", base, paths.models / spec.name, progress), None
    raise ValueError(f"model '{spec.name}': build {spec.build!r} is not an organism build")


WORKERS_ENV = "ENTITY_TRACKING_TRAIN_WORKERS"


def replicates(spec: ModelSpec) -> list[ModelSpec]:
    """The replicate fine-tunes of an arithmetic fine-tune ``spec`` (``organism-lora`` or
    ``organism-full``): the same recipe with each of ``finetune.replicate_seeds`` as its seed,
    named ``<name>-seed<s>``; empty for every other model. The fine-tuning chapter puts intervals
    over seeds on the premise with them; every other chapter studies the profile's own seed."""
    if spec.build not in ("organism-lora", "organism-full"):
        return []
    org = spec.organism or OrganismSpec()
    out = []
    for s in org.finetune.replicate_seeds:
        if s == org.finetune.seed:
            continue
        variant = org.model_copy(update={"finetune": org.finetune.model_copy(update={"seed": s})})
        out.append(spec.model_copy(update={"name": f"{spec.name}-seed{s}", "organism": variant,
                                           "label": f"{spec.display} (seed {s})"}))
    return out


def _work(spec: ModelSpec) -> int:
    """A fine-tune's rough size (optimizer steps x rows per step), to start the longest first: the
    fine-tunes otherwise go in the profile's order and a short one started early leaves a long one
    alone on one core at the end."""
    org = spec.organism or OrganismSpec()
    if spec.build == "organism-control":
        return org.control.steps * org.control.batch_size
    kind = "lora" if spec.build == "organism-lora" else "full"
    return org.finetune.steps_of(kind) * org.finetune.batch_size


def _build_one(spec: ModelSpec, root: str) -> tuple[str, float]:
    """Child-process entry of :func:`build_all` (one torch thread, no progress bars)."""
    t = time.perf_counter()
    with train_threads(1):
        ensure_built(spec, ResultsPaths(Path(root)), progress=False)
    return spec.name, time.perf_counter() - t


def _build_planted(spec: dict, root: str) -> float:
    """Child-process entry of :func:`build_all` for the planted models (one torch thread)."""
    t = time.perf_counter()
    with train_threads(1):
        ensure_planted(GroundTruthSpec.model_validate(spec), ResultsPaths(Path(root)), progress=False)
    return time.perf_counter() - t


#: The name :func:`build_all` reports the planted models' build under.
PLANTED = "planted (ground truth)"


def build_all(specs: Iterable[ModelSpec], paths: ResultsPaths, workers: int | None = None,
              progress: bool = True, planted: GroundTruthSpec | None = None) -> dict[str, dict]:
    """Build (or reuse) every organism model of ``specs``: each base first, alone, with its
    recipe's ``train_threads``; then the fine-tunes, longest first, ``workers`` at a time in separate
    processes with one thread each (default ``$ENTITY_TRACKING_TRAIN_WORKERS`` or the number of CPU
    cores): independent runs, one per core.
    Returns ``{name: {"seconds": wall time, "cached": bool}}``; a build is deterministic given its
    recipe whatever the number of workers. Other models (hub, local, tiny) are left alone.

    ``planted``: also build the ground-truth chapter's planted models
    (:func:`entity_tracking.organism.planted.ensure_planted`), in a process of their own started
    first: the organism's base trains on one thread, and the planting takes the core it leaves
    (reported as :data:`PLANTED`).

    >>> # times = build_all(profile.models, ResultsPaths(root / "results" / "default"))
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    specs = [s for s in specs if s.build is not None and s.build.startswith("organism")]
    out: dict[str, dict] = {}
    side, planting = None, None
    if planted is not None and is_planted(planted, paths):
        out[PLANTED] = {"seconds": 0.0, "cached": True}
    elif planted is not None:
        side = ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"))
        planting = side.submit(_build_planted, planted.model_dump(mode="json"), str(paths.root))
    try:
        _build_organisms(specs, paths, workers, progress, out)
        if planting is not None:
            out[PLANTED] = {"seconds": planting.result(), "cached": False}
    finally:
        if side is not None:
            side.shutdown(cancel_futures=True)
    return out


def _build_organisms(specs: list[ModelSpec], paths: ResultsPaths, workers: int | None, progress: bool,
                     out: dict[str, dict]) -> None:
    """:func:`build_all`'s organism part: the bases in this process, then the fine-tunes."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    todo = []
    for s in specs:
        kind = s.build
        org = s.organism or OrganismSpec()
        if s.build == "organism":
            target = base_dir(org, paths)
        else:
            target = paths.models / s.name
        cached = is_cached(target, recipe_hash(org, kind)) and is_cached(base_dir(org, paths), recipe_hash(org))
        if cached:
            out[s.name] = {"seconds": 0.0, "cached": True}
            continue
        t = time.perf_counter()
        if not is_cached(base_dir(org, paths), recipe_hash(org)):  # bases first, in this process, alone
            ensure_base(org, paths, progress=progress)
        if s.build == "organism":
            out[s.name] = {"seconds": time.perf_counter() - t, "cached": False}
        else:
            todo.append(s)
    todo.sort(key=_work, reverse=True)  # stable: equal sizes keep the profile's order
    workers = max(1, min(len(todo), workers or int(os.environ.get(WORKERS_ENV, "0")) or os.cpu_count() or 1))
    if len(todo) == 1 or workers == 1:
        for s in tqdm(todo, desc="fine-tunes", disable=not progress):
            name, sec = _build_one(s, str(paths.root))
            out[name] = {"seconds": sec, "cached": False}
    elif todo:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_build_one, s, str(paths.root)) for s in todo]
            for f in tqdm(futures, desc=f"fine-tunes ({workers} at a time)", disable=not progress):
                name, sec = f.result()
                out[name] = {"seconds": sec, "cached": False}


def ensure_finetune(org: OrganismSpec, kind: Literal["lora", "full", "control"], base: Path, out_dir: Path,
                    progress: bool = True) -> Path:
    """The fine-tune of ``kind`` of the organism in ``base``, built in ``out_dir`` on first use and
    reused while its recipe hash (base recipe + fine-tune recipe) matches."""
    h = recipe_hash(org, f"organism-{kind}")
    if not is_cached(out_dir, h):
        meta = {"hash": h, "base_hash": recipe_hash(org)}
        with train_threads():
            if kind == "control":
                control_finetune(base, org.control, out_dir, org=org, progress=progress, extra_meta=meta)
            else:
                finetune(base, org.finetune, kind, out_dir, org=org, progress=progress, extra_meta=meta)
    return out_dir
