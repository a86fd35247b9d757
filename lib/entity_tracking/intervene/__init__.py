"""The intervention layer: running a model with its activations changed, and the statistics every
method reports.

:mod:`.patching` holds the kernel: :func:`~.patching.run` executes a batch with a list of patches
(replace a head's or the residual stream's activation, from a cache or a given tensor) and
returns logits and caches; :class:`~.patching.KVPrefix` caches the keys and values of a shared
prompt prefix. :mod:`.stats` holds :class:`~.stats.Estimate` and the paired bootstrap.
"""
