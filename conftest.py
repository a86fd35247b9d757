"""The names the library's docstring examples use, so that every example runs as a doctest.

``make test`` collects the examples of ``lib/entity_tracking`` (``--doctest-modules``). They are
written against a reader's session -- a loaded model ``lm`` and its prompts -- so this file gives
them one, built offline in a second: a tiny random Llama (4 layers x 8 heads) with the project's
word-level tokenizer, a second one of other weights (``ft``, a stand-in fine-tune), eight 3-box
evaluation prompts (``batch``) and eight positional desiderata pairs (``pairs``, ``base``,
``source``), and a few values made from them. Only doctests ask for them.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def _doctest_names(tmp_path_factory) -> dict:
    from entity_tracking import task as D
    from entity_tracking.config import ModelSpec, TinySpec
    from entity_tracking.intervene.patching import run
    from entity_tracking.load import load_model
    from entity_tracking.methods.circuit import Circuit
    from entity_tracking.model.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("doctest-models")
    models = {}
    for name, seed in (("lm", 0), ("ft", 1)):
        path = build_tiny_model(TinySpec(n_layers=4, n_heads=8, d_model=64, d_mlp=128, seed=seed), root / name)
        models[name] = load_model(ModelSpec(name=name, local_path=str(path)), verbose=False)
    lm = models["lm"]
    batch = D.encode_prompts(lm.tokenizer, D.make_eval_prompts(lm.tokenizer, 8, num_boxes=3, seed=0))
    pairs = D.encode_pairs(lm.tokenizer, D.make_desiderata(lm.tokenizer, "positional", 8, num_boxes=3, seed=1),
                           padding_side="right")
    base, source = pairs["base"], pairs["source"]
    L = lm.arch.n_layers
    clean = run(lm, reads=[("z", l) for l in range(L)] + [("q", 1), ("k", 1)], batch=batch)
    rows = torch.arange(8)
    last = batch["last_position"]
    z_source = run(lm, reads=[("z", 3)], batch=source).cache["z", 3]
    return {
        **models,
        "torch": torch,
        "arch": lm.arch,
        "batch": batch,
        "pairs": pairs,
        "base": base,
        "source": source,
        "seq": int(batch["input_ids"].shape[1]),
        "means": torch.stack([clean.cache["z", l].mean(0) for l in range(L)]),  # [n_layers, seq, n_heads, d_head]
        "pos": base["last_position"],
        "source_z": z_source[torch.arange(8), source["last_position"]][:, None, [0, 5]],  # [batch, 1, 2, d_head]
        "target": int(base["target"][0]),
        "values": torch.zeros(8, 1, 1, lm.arch.d_head),
        "heads": [(1, 0), (2, 3)],
        "circuit": Circuit("lm", {"value_fetcher": [(3, 1), (2, 4)], "position_detector": [(1, 2)]}),
        "q": clean.cache["q", 1][rows, last][:, None],  # [batch, 1, n_heads, d_head] at the last token
        "k": clean.cache["k", 1],  # [batch, seq, n_kv_heads, d_head]
    }


@pytest.fixture(autouse=True)
def _names_for_doctests(request):
    """Hand the examples their names (doctests only: other tests never build these models)."""
    if type(request.node).__name__ == "DoctestItem":
        request.getfixturevalue("doctest_namespace").update(request.getfixturevalue("_doctest_names"))
