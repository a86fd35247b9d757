"""The book runner: toc order, skipping unchanged chapters, clear failures, atomic outputs."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest

from entity_tracking.book import runner
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


def _chapter(root: Path, stem: str, needs: list[str], body: str = "") -> None:
    """A chapter that declares ``needs`` like the book's, then runs ``body``."""
    _notebook(root / "book" / f"{stem}.ipynb",
              "from pathlib import Path\nfrom entity_tracking.book.chapter import setup_chapter\n"
              f"ctx = setup_chapter({stem!r}, profile, needs={needs!r})\n" + body)


def _meets(me: str, other: str) -> str:
    """Chapter code that passes only while ``other`` runs at the same time: each leaves a mark and
    waits (a minute at most) for the other's."""
    return (f"(ctx.paths.root / {me + '.started'!r}).write_text('')\n"
            "import time\nt0 = time.time()\n"
            f"while not (ctx.paths.root / {other + '.started'!r}).exists():\n"
            "    assert time.time() - t0 < 60, 'ran alone'\n    time.sleep(0.1)\n")


@pytest.fixture
def diamond(project) -> Path:
    """``first``; ``left`` and ``right`` need only ``first`` and must meet; ``last`` needs both."""
    (project / "_toc.yml").write_text("format: jb-book\nroot: book/index\nchapters:\n" + "".join(
        f"  - file: book/{c}\n" for c in ("first", "left", "right", "last")))
    _chapter(project, "left", ["first"], _meets("left", "right"))
    _chapter(project, "right", ["first"], _meets("right", "left"))
    _chapter(project, "last", ["left", "right"],
             "assert (ctx.paths.root / 'left.started').exists() and (ctx.paths.root / 'right.started').exists()\n")
    return project


class TestChaptersAtOnce:
    def test_needs_come_from_each_setup_call(self, diamond):
        needs = runner.chapter_needs(runner._execution_order(diamond))
        assert needs == {"first": set(), "left": {"first"}, "right": {"first"}, "last": {"left", "right"}}
        toc = [c for c in runner.chapters_from_toc(REPO) if c.is_notebook]
        shipped = runner.chapter_needs([c for c in toc if c.stem != "index"] + [c for c in toc if c.stem == "index"])
        assert shipped["data"] == set() and shipped["cmap"] >= {"circuit", "dcm"}
        assert shipped["index"] == set(shipped) - {"index"}, "the landing page waits for every chapter"

    def test_independent_chapters_run_together_and_dependents_wait(self, diamond):
        runs = runner.execute_chapters("ci", diamond, jobs=2, progress=False)
        assert [r.chapter.stem for r in runs] == ["first", "left", "right", "last"]
        assert {r.status for r in runs} == {"ran"}

    def test_a_failure_starts_nothing_else_and_names_the_chapter(self, diamond):
        _chapter(diamond, "right", ["first"], _meets("right", "left") + "raise ValueError('boom in right')\n")
        with pytest.raises(runner.ChapterFailed, match="'right'.*boom in right"):
            runner.execute_chapters("ci", diamond, jobs=2, progress=False)
        stamps = diamond / "results" / "ci" / ".stamps"
        assert (stamps / "left.json").exists(), "the chapter running beside the failure finished"
        assert not (stamps / "right.json").exists() and not (stamps / "last.json").exists()
        assert (diamond / "results" / "ci" / "notebooks" / "right.failed.ipynb").exists()


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


class _Tty(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self):
        return True


def _cell(kind: str, source: str, tags=(), outputs=None) -> dict:
    cell = {"cell_type": kind, "metadata": {"tags": list(tags)} if tags else {}, "source": source}
    if kind == "code":
        cell["outputs"] = outputs or []
    return cell


class TestReaders:
    """One display rule for every notebook, and outputs free of warnings, bars and machine paths."""

    def test_display_rule(self):
        long = "\n".join(f"x{i} = {i}" for i in range(runner.SHORT_CELL_LINES + 1))
        short = "\n".join(f"x{i} = {i}" for i in range(runner.SHORT_CELL_LINES))
        boot = runner.bootstrap_source("https://example.org/fork")
        nb = {"cells": [
            _cell("markdown", "# Title\n" + long),
            _cell("code", boot, ["hide-input"]),
            _cell("code", 'profile = "default"', ["parameters"]),
            _cell("code", 'profile = "ci"', ["injected-parameters"]),
            _cell("code", long),
            _cell("code", short + "\n\n\n"),
            _cell("code", long, ["show-input"]),
            _cell("code", long, ["remove-input"]),
        ]}
        runner.prepare_for_readers(nb)
        tags = [c["metadata"].get("tags", []) for c in nb["cells"]]
        assert tags == [[], ["hide-input", "remove-cell"], ["parameters", "remove-cell"],
                        ["injected-parameters", "remove-cell"], ["hide-input"], [], ["show-input"], ["remove-input"]]
        again = json.loads(json.dumps(nb))
        assert runner.prepare_for_readers(again) == nb, "the rule is idempotent"

    def test_warnings_bars_and_paths_leave_the_outputs(self, tmp_path, monkeypatch):
        root = tmp_path / "checkout"
        monkeypatch.delenv("ENTITY_TRACKING_RESULTS", raising=False)
        warning = ("/opt/venv/lib/python3.11/site-packages/transformers/modeling_utils.py:3303: FutureWarning: "
                   "`x` is deprecated.\n  warnings.warn(\n")
        bar = "\rLoading weights:   0%|          | 0/21 [00:00<?, ?it/s]\rLoading weights: 100%|##| 21/21 [00:01<00:00, 20.1it/s]\n"
        nb = {"metadata": {"papermill": {"input_path": str(root / "book" / "a.ipynb")}}, "cells": [_cell("code", "x", outputs=[
            {"output_type": "stream", "name": "stderr", "text": warning + bar + "organism: accuracy 0.1\n"},
            {"output_type": "stream", "name": "stderr", "text": bar},
            {"output_type": "stream", "name": "stdout", "text": f"wrote {root}/results/ci/a.json\n"},
            {"output_type": "display_data", "metadata": {}, "data": {
                "application/vnd.jupyter.widget-view+json": {"model_id": "m"},
                "text/plain": "evaluate (tiny):   0%|          | 0/3 [00:00<?, ?it/s]"}},
            {"output_type": "display_data", "metadata": {}, "data": {
                "application/vnd.jupyter.widget-view+json": {"model_id": "w"},
                "text/plain": "interactive(children=(Dropdown(),))"}},
            {"output_type": "execute_result", "metadata": {}, "execution_count": 1,
             "data": {"text/plain": f"PosixPath('{root}/results/ci/metrics/a.json')"}},
            {"output_type": "execute_result", "metadata": {}, "execution_count": 2,
             "data": {"text/html": f"<td>{Path.home()}/models</td>", "text/plain": "t"}},
        ])]}
        nb["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {"version_major": 2, "state": {
            "m": {"state": {"children": ["IPY_MODEL_b"]}}, "b": {"state": {"value": "3/3 [00:01<00:00, 2.44it/s]"}},
            "w": {"state": {"children": ["IPY_MODEL_d"]}}, "d": {"state": {"options": ["a"]}}}}}
        runner.clean_outputs(nb, root)
        outs = nb["cells"][0]["outputs"]
        assert set(nb["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]) == {"w", "d"}
        text = json.dumps(nb)
        assert "Warning" not in text and "it/s]" not in text and "site-packages" not in text
        assert str(root) not in text and str(Path.home()) not in text
        assert [o.get("name") or o["output_type"] for o in outs] == ["stderr", "stdout", "display_data", "execute_result"]
        assert outs[0]["text"] == "organism: accuracy 0.1\n", "a message that is not a warning stays"
        assert outs[1]["text"] == "wrote results/ci/a.json\n"
        assert "interactive" in outs[2]["data"]["text/plain"], "a widget that is not a bar stays"
        assert outs[3]["data"]["text/html"] == "<td>~/models</td>"
        assert nb["metadata"]["papermill"]["input_path"] == "book/a.ipynb"
        assert runner.clean_outputs(json.loads(json.dumps(nb)), root) == nb, "cleaning is idempotent"

    def test_executed_chapters_are_prepared_for_readers(self, project):
        _notebook(project / "book" / "first.ipynb",
                  "import sys, warnings\n"
                  "warnings.warn('careful', FutureWarning)\n"
                  "from tqdm.auto import tqdm\n"
                  "for _ in tqdm(range(3)): pass\n"
                  "print('root is', __import__('os').environ['ENTITY_TRACKING_ROOT'])\n")
        out = runner.run_chapters("ci", project, only=["first"])[0]
        nb = json.loads(out.read_text())
        text = json.dumps([c.get("outputs", []) for c in nb["cells"]])
        assert "careful" not in text and "it/s" not in text and str(project) not in text
        assert "root is ." in text
        assert ["parameters", "remove-cell"] in [c["metadata"].get("tags") for c in nb["cells"]]
        assert ["hide-input"] in [c["metadata"].get("tags") for c in nb["cells"]]


class TestProgress:
    def _sections_notebook(self, path: Path) -> None:
        nb = nbformat.v4.new_notebook()
        params = nbformat.v4.new_code_cell('profile = "default"')
        params.metadata["tags"] = ["parameters"]
        nb.cells = [nbformat.v4.new_markdown_cell("# A chapter"), params,
                    nbformat.v4.new_markdown_cell("## Building the data\ntext"), nbformat.v4.new_code_cell("x = 1"),
                    nbformat.v4.new_markdown_cell("### a subsection (not a section)"), nbformat.v4.new_code_cell("y = 2"),
                    nbformat.v4.new_markdown_cell("## Measuring"), nbformat.v4.new_code_cell("z = 3")]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, path)

    def test_a_line_per_section_when_not_a_terminal(self, project, capsys):
        self._sections_notebook(project / "book" / "second.ipynb")
        runner.run_chapters("ci", project)
        log = capsys.readouterr().out
        assert "\r" not in log
        lines = [line for line in log.splitlines() if line.startswith("[2/2] second:") and "cells" in line]
        # parameters, injected parameters, then one line per section
        assert [line.split(" · ")[1] for line in lines] == ["A chapter", "Building the data", "Measuring"], lines
        assert lines[0].startswith("[2/2] second: 0/5 cells") and lines[-1].startswith("[2/2] second: 4/5 cells")

    def test_one_updating_line_on_a_terminal(self):
        nb = {"cells": [_cell("markdown", "# T"), _cell("code", "a"), _cell("markdown", "## S"), _cell("code", "b")]}
        stream = _Tty()
        with runner._Progress("[1/1] t", nb, stream=stream) as p:
            p.cell_start(1)
            p.cell_complete(1)
            p.cell_start(3)
            p.cell_complete(3)
        text = stream.getvalue()
        assert "\n" not in text and text.count("\r") >= 4
        assert "[1/1] t: 2/2 cells · S · 0:00" in text

    def test_chapters_at_once_share_one_line_and_messages_go_above_it(self):
        nb = {"cells": [_cell("markdown", "# T"), _cell("code", "a"), _cell("markdown", "## S"), _cell("code", "b")]}
        stream = _Tty()
        board = runner._Board(stream)
        with runner._Progress("[2/3] left", nb, board=board) as a, runner._Progress("[3/3] right", nb, board=board):
            a.cell_start(3)
            board.say("[2/3] left: done")
            shown = stream.getvalue().rsplit("\r", 1)[-1]
        assert "[2/3] left: 0/2 cells · S · 0:00  |  [3/3] right: 0/2 cells" in shown
        assert stream.getvalue().count("\n") == 1 and "\r[2/3] left: done\n" in stream.getvalue()

    def test_summary_names_each_chapter_time_and_page(self, project, capsys):
        assert runner.main(["--profile", "ci", "--no-book"]) == 0
        log = capsys.readouterr().out
        rows = {line.split()[0]: line for line in log.splitlines() if line.startswith("  ")}
        assert set(rows) == {"first", "second"}
        assert re.search(r"^  first\s+\d+:\d\d\s", rows["first"])
        assert "total " in log and str(project / "results" / "ci" / "notebooks" / "second.ipynb") in log


class TestProfileAnywhere:
    def test_a_profile_outside_params_reaches_every_chapter(self, project, tmp_path, monkeypatch):
        mine = tmp_path / "elsewhere" / "mine.yaml"
        mine.parent.mkdir()
        shutil.copy(project / "params" / "ci.yaml", mine)
        monkeypatch.delenv("ENTITY_TRACKING_PROFILES", raising=False)
        _notebook(project / "book" / "second.ipynb",
                  "from entity_tracking.config import load_profile\n"
                  "prof = load_profile(profile)\n"
                  "print('chapter got', profile, prof.name)\n")
        out = runner.run_chapters(str(mine), project)
        assert out[0] == project / "results" / "mine" / "notebooks" / "first.ipynb"
        assert (project / "results" / "mine" / "first.txt").read_text() == "from first mine"
        assert "chapter got mine mine" in out[1].read_text()
        assert "ENTITY_TRACKING_PROFILES" not in __import__("os").environ, "the runner's own environment is restored"

    def test_a_listed_file_wins_over_params_by_name(self, project, tmp_path, monkeypatch):
        from entity_tracking.config import profile_path

        mine = tmp_path / "ci.yaml"
        mine.write_text((project / "params" / "ci.yaml").read_text())
        assert profile_path("ci", project) == project / "params" / "ci.yaml"
        monkeypatch.setenv("ENTITY_TRACKING_PROFILES", str(mine))
        assert profile_path("ci", project) == mine.resolve()


class TestRepositoryUrl:
    def test_the_shipped_notebooks_clone_the_configured_repository(self):
        assert runner.sync_bootstrap(REPO, check=True) == []
        url = runner.repository_url(REPO)
        for ch in runner.chapters_from_toc(REPO):
            if ch.is_notebook and ch.stem != "index":
                cells = [c for c in json.loads(ch.source.read_text())["cells"] if runner.is_bootstrap(c)]
                assert len(cells) == 1 and url in "".join(cells[0]["source"]), ch.name

    def test_sync_rewrites_only_the_bootstrap_cell(self, project):
        (project / "_config.yml").write_text("title: t\nrepository:\n  url: https://example.org/old\n")
        nb_path = project / "book" / "first.ipynb"
        nb = json.loads(nb_path.read_text())
        nb["cells"].insert(1, nbformat.v4.new_code_cell(runner.bootstrap_source("https://example.org/old")))
        nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        before = json.loads(nb_path.read_text())
        assert runner.sync_bootstrap(project) == []
        (project / "_config.yml").write_text("title: t\nrepository:\n  url: https://example.org/fork\n")
        assert runner.sync_bootstrap(project, check=True) == [nb_path]
        assert runner.sync_bootstrap(project) == [nb_path]
        after = json.loads(nb_path.read_text())
        src = "".join(after["cells"][1]["source"])
        assert "https://example.org/fork" in src and "example.org/old" not in src
        compile(src, "bootstrap", "exec")
        after["cells"][1]["source"] = before["cells"][1]["source"]
        assert after == before, "nothing but the bootstrap cell changed"


def test_tables_hide_only_a_row_number_index():
    import pandas as pd

    from entity_tracking.book.chapter import table_html

    plain = table_html(pd.DataFrame({"model": ["a", "b"], "acc": [0.5, 0.25]}))
    assert "<th>model</th>" in plain and "<th>0</th>" not in plain and "<th></th>" not in plain
    named = table_html(pd.DataFrame({"acc": [0.5]}, index=pd.Index(["a"], name="model")))
    assert "<th>a</th>" in named
