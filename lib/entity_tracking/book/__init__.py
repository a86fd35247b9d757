"""The book layer: what the chapters call to set up, show and record, and the runner that executes
them with papermill (``python -m entity_tracking.book.runner --profile default``).

:mod:`.chapter` (setup, models, verdict tables), :mod:`.runner` (execution, caching by
fingerprint, the Jupyter Book build), :mod:`.figures` (seaborn figures), :mod:`.browser` (the
rendered-page check).
"""
