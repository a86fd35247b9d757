"""What the benchmarks share: a random Llama of the CPU model organism's size (4 layers x 8 heads,
d_model 128, d_mlp 512) with the project's word-level tokenizer, and their common options."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch


def add_options(ap: argparse.ArgumentParser) -> None:
    """``--boxes``, ``--threads`` and ``--scale``, as every benchmark of the organism takes them."""
    ap.add_argument("--boxes", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1, as the book's kernels: on a shared machine, idle threads "
                         "spin and inflate both times unevenly)")
    ap.add_argument("--scale", type=float, default=4.0,
                    help="multiplies the random weight matrices, so that heads have visible effects")


def organism_sized(args: argparse.Namespace):
    """The random organism-sized model, loaded like a profile model, its weight matrices scaled by
    ``args.scale``; sets ``args.threads`` torch threads and the hub offline first."""
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from entity_tracking.config import ModelSpec, TinySpec
    from entity_tracking.model.tiny import build_tiny_model
    from entity_tracking.load import load_model

    spec = TinySpec(family="llama", n_layers=4, n_heads=8, d_model=128, d_mlp=512, seed=0)
    with tempfile.TemporaryDirectory(prefix="bench-organism-sized-") as root:
        lm = load_model(ModelSpec(name="organism-sized", local_path=str(build_tiny_model(spec, Path(root) / "m"))),
                        verbose=False)
    with torch.no_grad():
        for p in lm.hf.parameters():
            if p.dim() == 2:
                p.mul_(args.scale)
    return lm
