"""The book runner: toc order, skipping unchanged chapters, clear failures, atomic outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pytest

from entity_tracking import runner
from entity_tracking.config import find_repo_root
from entity_tracking.io import atomic_write_text

REPO = find_repo_root(Path(__file__).parent)


def _notebook(path: Path, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile = "default"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# A chapter"), params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A two-chapter project: `first` writes a file, `second` reads it."""
    root = tmp_path / "proj"
    (root / "params").mkdir(parents=True)
    shutil.copy(REPO / "params" / "ci.yaml", root / "params" / "ci.yaml")
    (root / "_toc.yml").write_text(
        "format: jb-book\nroot: book/index\nchapters:\n  - file: book/first\n  - file: book/second\n"
    )
    (root / "book").mkdir()
    (root / "book" / "index.md").write_text("# Index\n")
    _notebook(
        root / "book" / "first.ipynb",
        "from pathlib import Path\n"
        "import os\n"
        "out = Path(os.environ['ENTITY_TRACKING_ROOT']) / 'results' / profile / 'first.txt'\n"
        "out.write_text('from first ' + profile)\n"
        "log = Path(os.environ['ENTITY_TRACKING_ROOT']) / 'runs.log'\n"
        "log.write_text(log.read_text() + 'first\\n' if log.exists() else 'first\\n')\n",
    )
    _notebook(
        root / "book" / "second.ipynb",
        "from pathlib import Path\n"
        "import os\n"
        "print((Path(os.environ['ENTITY_TRACKING_ROOT']) / 'results' / profile / 'first.txt').read_text())\n",
    )
    monkeypatch.setenv("ENTITY_TRACKING_ROOT", str(root))
    return root


class TestToc:
    def test_reading_order(self, project):
        names = [c.name for c in runner.chapters_from_toc(project)]
        assert names == ["book/index", "book/first", "book/second"]

    def test_missing_entry_is_named(self, project):
        (project / "book" / "second.ipynb").unlink()
        with pytest.raises(FileNotFoundError, match="book/second"):
            runner.chapters_from_toc(project)


class TestRun:
    def test_runs_in_order_and_passes_profile(self, project):
        out = runner.run_chapters("ci", project)
        assert [p.name for p in out] == ["first.ipynb", "second.ipynb"]
        nb = nbformat.read(out[1], as_version=4)
        printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
        assert "from first ci" in printed

    def test_unchanged_chapters_are_not_run_again(self, project):
        runner.run_chapters("ci", project)
        runner.run_chapters("ci", project)
        assert (project / "runs.log").read_text() == "first\n"
        runner.run_chapters("ci", project, force=True)
        assert (project / "runs.log").read_text() == "first\nfirst\n"

    def test_changed_params_rerun(self, project):
        runner.run_chapters("ci", project)
        p = project / "params" / "ci.yaml"
        p.write_text(p.read_text().replace("n_eval: 40", "n_eval: 41"))
        runner.run_chapters("ci", project)
        assert (project / "runs.log").read_text() == "first\nfirst\n"

    def test_changed_upstream_chapter_reruns_downstream(self, project, capsys):
        runner.run_chapters("ci", project)
        _notebook(project / "book" / "first.ipynb", "x = 1  # changed\n")
        capsys.readouterr()
        runner.run_chapters("ci", project)
        log = capsys.readouterr().out
        assert "second: running" in log

    def test_failure_names_chapter_and_notebook(self, project):
        _notebook(project / "book" / "second.ipynb", "raise ValueError('boom in second')\n")
        with pytest.raises(runner.ChapterFailed) as info:
            runner.run_chapters("ci", project)
        msg = str(info.value)
        assert "'second'" in msg and "boom in second" in msg
        failed = project / "results" / "ci" / "notebooks" / "second.failed.ipynb"
        assert str(failed) in msg and failed.exists()
        assert "boom in second" in failed.read_text()
        # the name a later chapter or run would trust was never written
        assert not (project / "results" / "ci" / "notebooks" / "second.ipynb").exists()

    def test_bad_profile_fails_before_any_chapter(self, project):
        p = project / "params" / "ci.yaml"
        p.write_text(p.read_text() + "colour: blue\n")
        with pytest.raises(Exception, match="colour"):
            runner.run_chapters("ci", project)
        assert not (project / "runs.log").exists()


class TestAtomicWrites:
    def test_interrupted_write_keeps_the_old_file(self, tmp_path):
        target = tmp_path / "a.json"
        atomic_write_text(target, json.dumps({"v": 1}))

        class Interrupt(Exception):
            pass

        from entity_tracking.io import atomic_path

        with pytest.raises(Interrupt):
            with atomic_path(target) as tmp:
                tmp.write_text('{"v": 2, "half')
                raise Interrupt
        assert json.loads(target.read_text()) == {"v": 1}
        assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
