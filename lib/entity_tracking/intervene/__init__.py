"""The intervention layer: running a model with its activations changed, and the statistics every
method reports.

:mod:`.patching` holds the kernel: :func:`~.patching.run` executes a batch with a list of writes
(replace, blend or mean-ablate a head's or the residual stream's activation) and returns logits,
caches and keys/values; every intervention of the book goes through it. :class:`~.patching.KVPrefix`
caches the keys and values of a shared prompt prefix. :mod:`.stats` holds :class:`~.stats.Estimate` and the paired bootstrap.
"""
