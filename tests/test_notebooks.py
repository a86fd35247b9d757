"""Notebooks call and show: every rule a chapter applies lives in ``lib/`` (CONTRIBUTING, "A chapter").

A chapter's code cells may load, call the library, arrange tables and draw figures. They may not
define a function (``def``, ``lambda``, ``class``), compare a result with a number typed into the
cell (a threshold: it belongs in :mod:`entity_tracking.methods.verdicts` with its reason), draw
such a number as a reference line, or parse the library's labels and keys back out of strings
(the library hands out structured keys instead). The checks read each cell's syntax tree, so a
comment or a string that mentions ``def`` does not trip them.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from entity_tracking.config import find_repo_root

REPO = find_repo_root(Path(__file__).parent)
NOTEBOOKS = sorted((REPO / "book").glob("*.ipynb"))

#: String methods that take a label apart: the library should have handed out its parts.
PARSING_METHODS = frozenset({"split", "rsplit", "partition", "rpartition", "startswith", "endswith", "removeprefix",
                             "removesuffix"})
#: Modules and pandas accessors that parse strings.
PARSING_NAMES = frozenset({"re", "str"})
#: Drawing calls whose first argument is a reference value (a threshold line).
REFERENCE_LINES = frozenset({"axhline", "axvline"})


def code_cells(path: Path) -> list[tuple[int, str]]:
    """``(cell index, source)`` of every code cell, IPython magics and shell lines blanked."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        out.append((i, "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in src.splitlines())))
    return out


def _is_number(node: ast.AST) -> bool:
    return (isinstance(node, ast.Constant) and isinstance(node.value, (int, float))
            and not isinstance(node.value, bool))


def _is_negated_number(node: ast.AST) -> bool:
    return isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and _is_number(node.operand)


def violations(source: str) -> list[str]:
    """What in one cell's source is logic rather than a call: each as ``"line N: what"``."""
    tree = ast.parse(source)
    out = []
    for node in ast.walk(tree):
        where = f"line {getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append(f"{where}: defines function {node.name}()")
        elif isinstance(node, ast.ClassDef):
            out.append(f"{where}: defines class {node.name}")
        elif isinstance(node, ast.Lambda):
            out.append(f"{where}: defines a lambda")
        elif isinstance(node, ast.Compare):
            numbers = [n for n in [node.left, *node.comparators] if _is_number(n) or _is_negated_number(n)]
            if any(not (_is_number(n) and n.value == 0) for n in numbers):
                out.append(f"{where}: compares with a number typed into the cell (a threshold)")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            attr, owner = node.func.attr, node.func.value
            if attr in REFERENCE_LINES and node.args and (_is_number(node.args[0]) or _is_negated_number(node.args[0])):
                if not (_is_number(node.args[0]) and node.args[0].value in (0, 1)):
                    out.append(f"{where}: draws a reference line at a number typed into the cell")
            if attr in PARSING_METHODS:
                out.append(f"{where}: parses a string (.{attr})")
            if isinstance(owner, ast.Name) and owner.id == "re":
                out.append(f"{where}: parses a string (re.{attr})")
            if isinstance(owner, ast.Attribute) and owner.attr == "str":
                out.append(f"{where}: parses a string (.str.{attr})")
    return sorted(set(out))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_cells_hold_no_logic(path):
    found = [f"cell {i}, {v}" for i, src in code_cells(path) for v in violations(src)]
    assert not found, f"{path.name} holds logic that belongs in lib/:\n" + "\n".join(found)


def test_the_check_catches_each_kind_of_logic():
    cases = {
        "def fmt(e):\n    return f'{e.value:.2f}'": "defines function fmt()",
        "rows.sort(key=lambda r: r['x'])": "defines a lambda",
        "class Row:\n    pass": "defines class Row",
        "ok = share >= 0.8": "compares with a number",
        "ok = -0.5 < score": "compares with a number",
        "ax.axvline(0.8, ls='--')": "draws a reference line",
        "group, _, desideratum = key.partition('/')": "parses a string (.partition)",
        "long['group'] = long['group'].str.replace('CMAP share: ', '')": "parses a string (.str.replace)",
        "m = re.match(r'(\\w+) \\(DCM', label)": "parses a string (re.match)",
    }
    for source, expected in cases.items():
        found = violations(source)
        assert any(expected in v for v in found), (source, found)


def test_calls_and_displays_pass_the_check():
    fine = ("# def and lambda in a comment\n"
            "text = 'a def, a lambda, 0.8 in a string'\n"
            "table = pd.DataFrame([{'model': n, 'accuracy': f'{e:.2f}'} for n, e in results.items() if n != base])\n"
            "ax.axhline(chance, ls='--')\n"
            "ax.axvline(verdicts.FAITHFUL.holds)\n"
            "ax.set_ylim(0, 1.05)\n"
            "if len(rows) > 0 and not rows:\n    pass\n"
            "%matplotlib inline\n")
    cleaned = "\n".join("" if line.lstrip().startswith("%") else line for line in fine.splitlines())
    assert violations(cleaned) == []


def test_there_are_notebooks_to_check():
    assert {p.stem for p in NOTEBOOKS} >= {"data", "circuit", "faithfulness", "dcm", "cmap", "finetuning"}
