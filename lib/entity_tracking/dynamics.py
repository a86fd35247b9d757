"""The circuit across fine-tuning: accuracy, faithfulness and CMAP gain at every checkpoint.

The paper compares a base model with finished fine-tunes; when the enhancement appears during
fine-tuning is one of its open questions. Every fine-tune of the model organism keeps
checkpoints (``checkpoints/step-XXXX``), so each one can be treated as a model of its own:
its entity-tracking accuracy, the faithfulness of the **base** model's circuit inside it (with
the checkpoint's own mean activations), and how much of its gain over the base model each
circuit group carries when its head outputs are patched into the base model (output CMAP).
A checkpoint of a LoRA fine-tune is the base model plus that checkpoint's adapter (merged by
the loader); a checkpoint of a full fine-tune is a complete model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch

from .circuit import GROUPS, Circuit, Head
from .config import ModelSpec
from .io import ResultsPaths

__all__ = ["Checkpoint", "checkpoints", "checkpoint_row"]

_STEP = re.compile(r"step-(\d+)$")


class Checkpoint:
    """One checkpoint of a fine-tune, loadable like any profile model through :attr:`spec`."""

    def __init__(self, model: str, step: int, spec: ModelSpec):
        self.model, self.step, self.spec = model, step, spec

    def __repr__(self) -> str:
        return f"Checkpoint({self.model!r}, step {self.step})"


def checkpoints(spec: ModelSpec, paths: ResultsPaths) -> list[Checkpoint]:
    """The checkpoints of a fine-tuned organism build, in step order (empty for other models)."""
    if spec.build not in ("organism-lora", "organism-full", "organism-control"):
        return []
    from .models import model_sources

    model, adapter = model_sources(spec, paths)
    folder = Path(adapter if spec.build == "organism-lora" else model) / "checkpoints"
    out = []
    for d in sorted(folder.glob("step-*")) if folder.is_dir() else []:
        m = _STEP.search(d.name)
        if not m:
            continue
        step = int(m.group(1))
        if spec.build == "organism-lora":
            ck = ModelSpec(name=f"{spec.name}.step-{step}", role="finetuned", local_path=str(model), adapter=str(d))
        else:
            ck = ModelSpec(name=f"{spec.name}.step-{step}", role="finetuned", local_path=str(d))
        out.append(Checkpoint(spec.name, step, ck))
    return sorted(out, key=lambda c: c.step)


def checkpoint_row(base, model, eval_records: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]],
                   circuit: Circuit, *, batch_size: int = 32) -> dict[str, Any]:
    """Accuracy, base-circuit faithfulness and per-group CMAP gain share of ``model`` (a loaded
    checkpoint) against the loaded ``base`` model on the evaluation prompts."""
    from . import data as D
    from .ablation import Ablation, compute_means, evaluate
    from .cmap import heads_by_position, output_cmap
    from .patching import last_logits

    batch = D.encode_prompts(model.tokenizer, eval_records)
    target = batch["target"]
    acc = float((last_logits(model, batch, batch_size=batch_size).argmax(-1) == target).float().mean())
    base_acc = float((last_logits(base, batch, batch_size=batch_size).argmax(-1) == target).float().mean())
    means = compute_means(model, reference, batch_size=batch_size, progress=False)
    full, circ = evaluate(model, eval_records, means, [Ablation(), Ablation(keep=circuit)], batch_size=batch_size,
                          progress=False)
    row: dict[str, Any] = {"accuracy": acc, "base accuracy": base_acc,
                           "faithfulness": circ.accuracy / full.accuracy if full.accuracy > 0 else float("nan")}
    gain = acc - base_acc
    for g in GROUPS:
        if not circuit.groups[g]:
            row[f"CMAP share: {g}"] = float("nan")
            continue
        logits = output_cmap(base, model, batch, heads_by_position(circuit, [g]), batch_size=batch_size)
        patched = float((logits.argmax(-1) == target).float().mean())
        row[f"CMAP share: {g}"] = (patched - base_acc) / gain if abs(gain) > 1e-9 else float("nan")
    return row
