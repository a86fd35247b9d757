"""The model layer: what differs between architectures, in one table, and the models built here.

:mod:`.arch` maps every supported family (Llama, Qwen2, Gemma3, ...) to its module paths, head
geometry (GQA) and BOS handling; nothing else in the library names a module path. :mod:`.tokenizer`
is the project's word-level tokenizer and :mod:`.tiny` the tiny random models of each family on
which every architecture's code path is tested.
"""
