"""entity_tracking: kernels behind the book reproducing Prakash et al. (ICLR 2024),
"Fine-Tuning Enhances Existing Mechanisms: A Case Study on Entity Tracking".

The layers, each importing only from the ones above it in this list (data flows one way):

``config``, ``io``, ``schema``
    params profiles; atomic results files; the shared names (heads, groups, positions, sites).
``task``
    the entity-tracking prompts and their spans, samplers and desiderata, arithmetic, encoding, files.
``model``
    the architecture table (the only place module paths live), the word-level tokenizer, tiny models.
``organism``
    the CPU model organism: curriculum, training, fine-tuning, build and cache.
``load``
    one function from a profile's model spec to a loaded nnsight model.
``intervene``
    the intervention kernel (run a model with writes; a session that runs them fast), patching
    metrics and shared statistics.
``methods``
    the paper's methods and ours: the circuit type, path patching, mean ablation, DCM, CMAP,
    attention, binding, training dynamics, the paper's numbers and the verdict rules.
``book``
    chapter setup, the runner that executes the chapters with papermill, figures, the browser check.
"""

__version__ = "0.1.0"
