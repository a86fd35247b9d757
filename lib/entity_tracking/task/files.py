"""The data chapter's files: where they live, how they are built from a profile and read back.

>>> # paths = build_datasets(profile, ResultsPaths(root), tokenizer); prompts = load_eval_prompts(paths)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..config import find_repo_root
from ..io import ResultsPaths, read_json, read_jsonl, write_json, write_jsonl
from .arithmetic import make_arithmetic
from .prompts import SCHEMA_VERSION, SPLITS, DataError, build_vocabulary
from .samplers import (
    DESIDERATA,
    make_desiderata,
    make_eval_prompts,
    make_mean_reference_prompts,
    make_path_patching_pairs,
)

__all__ = ["DESIDERATA_DIR", "FILES", "build_datasets", "data_dir", "load_arithmetic", "load_desiderata", "load_eval_prompts", "load_manifest", "load_mean_reference", "load_path_patching"]

# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

FILES = {
    "eval": "eval.jsonl",
    "path_patching": "path_patching.jsonl",
    "mean_reference": "mean_reference.jsonl",
    "arithmetic": "arithmetic.jsonl",
    "manifest": "manifest.json",
}
DESIDERATA_DIR = "desiderata"


def data_dir(where: ResultsPaths | str | os.PathLike) -> Path:
    """The data folder of a :class:`ResultsPaths` or a folder path."""
    return where.data if isinstance(where, ResultsPaths) else Path(where)


def _need(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; build the data first "
                                f"(entity_tracking.data.build_datasets, or run the data chapter)")
    return path


def load_manifest(where: ResultsPaths | str | os.PathLike) -> dict[str, Any]:
    """The manifest of a data folder; checks the schema version."""
    m = read_json(_need(data_dir(where) / FILES["manifest"]))
    if m.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"data in {data_dir(where)} has schema {m.get('schema_version')}, "
                        f"this code reads {SCHEMA_VERSION}; rebuild it")
    return m


def load_eval_prompts(where: ResultsPaths | str | os.PathLike) -> list[dict[str, Any]]:
    """Evaluation prompts (``eval.jsonl``)."""
    return read_jsonl(_need(data_dir(where) / FILES["eval"]))


def load_path_patching(where: ResultsPaths | str | os.PathLike) -> list[dict[str, Any]]:
    """Path-patching (base, corrupt source) pairs (``path_patching.jsonl``)."""
    return read_jsonl(_need(data_dir(where) / FILES["path_patching"]))


def load_mean_reference(where: ResultsPaths | str | os.PathLike) -> list[dict[str, Any]]:
    """Mean-ablation reference prompts (``mean_reference.jsonl``)."""
    return read_jsonl(_need(data_dir(where) / FILES["mean_reference"]))


def load_desiderata(where: ResultsPaths | str | os.PathLike, name: str,
                    split: str | None = None) -> list[dict[str, Any]]:
    """Pairs of one desideratum, optionally one split (``"train"``, ``"eval"``, ``"test"``)."""
    if name not in DESIDERATA:
        raise DataError(f"unknown desideratum {name!r}; known: {sorted(DESIDERATA)}")
    if split is not None and split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    rows = read_jsonl(_need(data_dir(where) / DESIDERATA_DIR / f"{name}.jsonl"))
    return rows if split is None else [r for r in rows if r["split"] == split]


def load_arithmetic(where: ResultsPaths | str | os.PathLike) -> list[dict[str, Any]]:
    """Arithmetic question/answer records (``arithmetic.jsonl``)."""
    return read_jsonl(_need(data_dir(where) / FILES["arithmetic"]))


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    blob += json.dumps([getattr(tokenizer, "bos_token", None), getattr(tokenizer, "eos_token", None),
                        getattr(tokenizer, "pad_token", None)])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("Box")["input_ids"]
    return bos is not None and len(ids) > 0 and ids[0] == bos


def _display_path(name: str) -> str:
    """A tokenizer's name_or_path without this machine's absolute prefix."""
    p = Path(name)
    if p.is_absolute():
        try:

            return str(p.resolve().relative_to(find_repo_root()))
        except Exception:
            return p.name
    return name


def build_datasets(profile, paths: ResultsPaths | str | os.PathLike, tokenizer,
                   force: bool = False) -> dict[str, Path]:
    """Write every file of a profile's ``data:`` section into ``paths.data``; return their paths.

    ``profile`` is a :class:`entity_tracking.config.Profile` (or its ``DataSpec``). Files: see
    :data:`FILES` plus ``desiderata/<name>.jsonl`` for each of :data:`DESIDERATA`; the returned
    keys are ``"eval"``, ``"path_patching"``, ``"mean_reference"``, ``"arithmetic"``,
    ``"desiderata/<name>"`` and ``"manifest"``. If the manifest says the files were built from
    the same spec, tokenizer and schema, nothing is rebuilt unless ``force``.
    """
    spec = getattr(profile, "data", profile)
    out_dir = data_dir(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    k = spec.num_boxes
    spec_dict = spec.model_dump() if hasattr(spec, "model_dump") else dict(spec)
    fingerprint = hashlib.sha256(json.dumps(
        {"spec": spec_dict, "tokenizer": _tokenizer_fingerprint(tokenizer), "schema": SCHEMA_VERSION},
        sort_keys=True).encode()).hexdigest()[:16]
    result: dict[str, Path] = {key: out_dir / f for key, f in FILES.items()}
    for name in DESIDERATA:
        result[f"{DESIDERATA_DIR}/{name}"] = out_dir / DESIDERATA_DIR / f"{name}.jsonl"
    man_path = result["manifest"]
    if not force and man_path.is_file() and all(p.is_file() for p in result.values()):
        try:
            if read_json(man_path).get("fingerprint") == fingerprint:
                return result
        except (OSError, ValueError):
            pass

    vocab = build_vocabulary(tokenizer, spec.objects, num_boxes=k, min_objects=2 * k + 1)
    seed = spec.seed
    eval_ = make_eval_prompts(tokenizer, spec.n_eval, k, seed, vocab)
    n_tokens = eval_[0]["n_tokens"]
    pp = make_path_patching_pairs(tokenizer, spec.n_path_patching, k, seed, vocab)
    mean = make_mean_reference_prompts(tokenizer, spec.n_mean_reference, k, seed, vocab, n_tokens=n_tokens)
    des = {name: make_desiderata(tokenizer, name, spec.n_desiderata, k, seed, vocab) for name in DESIDERATA}
    arith = make_arithmetic(spec.n_arithmetic, spec.arithmetic_max_digits, seed)

    write_jsonl(result["eval"], eval_)
    write_jsonl(result["path_patching"], pp)
    write_jsonl(result["mean_reference"], mean)
    write_jsonl(result["arithmetic"], arith)
    for name, rows in des.items():
        write_jsonl(result[f"{DESIDERATA_DIR}/{name}"], rows)
    counts = {"eval": len(eval_), "path_patching": len(pp), "mean_reference": len(mean), "arithmetic": len(arith)}
    counts.update({f"{DESIDERATA_DIR}/{n}": len(r) for n, r in des.items()})
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fingerprint,
        "profile": getattr(profile, "name", None),
        "seed": seed,
        "num_boxes": k,
        "spec": spec_dict,
        "prompt_tokens": n_tokens,
        "tokenizer": {
            "name": _display_path(getattr(tokenizer, "name_or_path", "") or ""),
            "class": type(tokenizer).__name__,
            "fingerprint": _tokenizer_fingerprint(tokenizer),
            "bos_token": getattr(tokenizer, "bos_token", None),
            "adds_bos": _adds_bos(tokenizer),
            "padding_side": getattr(tokenizer, "padding_side", None),
        },
        "vocabulary": {
            "objects": list(vocab.objects),
            "labels": list(vocab.labels),
            "rejected_objects": list(vocab.rejected_objects),
            "rejected_labels": list(vocab.rejected_labels),
        },
        "counts": counts,
        "splits": {s: sum(r["split"] == s for r in next(iter(des.values()))) for s in SPLITS},
        "files": {key: str(p.relative_to(out_dir)) for key, p in result.items()},
    }
    write_json(man_path, manifest)
    return result
