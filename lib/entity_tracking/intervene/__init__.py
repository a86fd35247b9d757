"""The intervention layer: running a model with its activations changed, and the statistics every
method reports.

:mod:`.patching` holds the kernel: :func:`~.patching.run` runs prompts with a list of writes
(replace, blend or mean-ablate a head's or the residual stream's activation) and returns logits
and caches; every intervention of the book goes through it. How the runs go fast is a
:class:`~.patching.Session`'s business (a model on one batch of prompts: the clean keys and
values a run may start from, blocks it may skip, batching); methods state only what to write
and what to read. :mod:`.metrics` holds what a patching experiment scores (a callable);
:mod:`.stats` holds :class:`~.stats.Estimate`, the per-prompt :class:`~.stats.Evaluation` and
the paired bootstrap over contexts.
"""
