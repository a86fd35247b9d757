"""A chapter opened on its own, with no earlier results, builds what it needs and completes."""

from __future__ import annotations

from pathlib import Path

import papermill as pm
import pytest

from entity_tracking.config import find_repo_root

REPO = find_repo_root(Path(__file__).parent)


def test_faithfulness_chapter_runs_alone_on_ci(tmp_path, monkeypatch):
    results = tmp_path / "results"
    monkeypatch.setenv("ENTITY_TRACKING_RESULTS", str(results))
    monkeypatch.setenv("ENTITY_TRACKING_ROOT", str(REPO))
    out = tmp_path / "faithfulness.ipynb"
    pm.execute_notebook(str(REPO / "book" / "faithfulness.ipynb"), str(out), parameters={"profile": "ci"},
                        kernel_name="python3", cwd=str(tmp_path), progress_bar=False)
    # the earlier chapters it reads from were executed on the way
    assert (results / "ci" / "notebooks" / "data.ipynb").exists()
    assert (results / "ci" / "notebooks" / "circuit.ipynb").exists()
    assert (results / "ci" / "metrics" / "faithfulness.json").exists()
    assert "earlier chapters not yet run" in out.read_text()
