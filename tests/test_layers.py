"""The library's structure: layers that import only downwards, each module importable on its own.

The package docstring of :mod:`entity_tracking` names the layers; these tests hold the code to it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import entity_tracking

PKG = Path(entity_tracking.__file__).parent

#: The layers, lowest first: a module may import from its own layer or any layer before it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("config", "io", "schema"),
    ("task",),
    ("model",),
    ("organism",),
    ("load",),
    ("intervene",),
    ("methods",),
    ("book",),
)
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def modules() -> list[str]:
    out = []
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(PKG).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(("entity_tracking",) + parts))
    return out


def _layer(dotted: str) -> str:
    return dotted.split(".")[1] if dotted.count(".") else ""


def _imports(path: Path) -> list[tuple[ast.ImportFrom | ast.Import, str, bool]]:
    """Every import of the package in ``path``: (node, absolute module, inside a function)."""
    here = ".".join(("entity_tracking",) + path.relative_to(PKG).with_suffix("").parts)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("entity_tracking"):
                out.append((node, mod, id(node) in in_function))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("entity_tracking"):
                    out.append((node, a.name, id(node) in in_function))
    return out


FILES = sorted(PKG.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_go_down_the_layers_at_module_level(path):
    here = _layer(".".join(("entity_tracking",) + path.relative_to(PKG).with_suffix("").parts))
    for node, mod, inside in _imports(path):
        assert not inside, f"{path.name}:{node.lineno} imports {mod} inside a function"
        targets = [mod]
        if isinstance(node, ast.ImportFrom) and mod == "entity_tracking":
            targets = [f"entity_tracking.{a.name}" for a in node.names]
        for t in targets:
            if t == "entity_tracking" or not here:
                continue
            there = _layer(t)
            assert there in RANK, f"{path.name}:{node.lineno}: {t} is in no layer of {LAYERS}"
            assert RANK[there] <= RANK[here], (f"{path.name}:{node.lineno}: layer '{here}' imports {t} from the "
                                               f"higher layer '{there}'")
        if isinstance(node, ast.ImportFrom):
            private = [a.name for a in node.names if a.name.startswith("_")]
            assert not private, f"{path.name}:{node.lineno} imports private name(s) {private} from {mod}"


def private_accesses(source: str) -> list[str]:
    """Every ``obj._name`` in ``source`` that reaches into another module's object: a private
    attribute (one leading underscore, not a ``_protocol_`` name such as pandas'
    ``_repr_html_``) read or called on anything but ``self``, ``cls`` or ``super()``, whose name
    the module does not define itself (a function, class, variable, argument or attribute it
    assigns). ``"line: expression"`` each."""
    tree = ast.parse(source)
    own: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            own.add(node.attr)
        elif isinstance(node, ast.arg):
            own.add(node.arg)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or isinstance(node.ctx, ast.Store):
            continue
        name = node.attr
        if not name.startswith("_") or name.startswith("__") or name.endswith("_") or name in own:
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
            continue
        out.append(f"{node.lineno}: {ast.unparse(node)}")
    return out


def test_the_private_access_check_catches_a_planted_example():
    planted = (
        "from .model.arch import Arch\n"
        "def f(arch, lm, layer):\n"
        "    i = arch._layer_index(layer)\n"
        "    cfg = lm.arch._torch(lm.nn).config\n"
        "    return i, cfg, arch.layer_index(layer)\n"
    )
    assert private_accesses(planted) == ["3: arch._layer_index", "4: lm.arch._torch"]
    allowed = (
        "class A:\n"
        "    def __init__(self):\n"
        "        self._n = 1\n"
        "    def same(self, other: 'A'):\n"
        "        return self._n + other._n + super().__hash__() + len(self.__dict__)\n"
        "def shown(df):\n"
        "    return df._repr_html_()\n"
    )
    assert private_accesses(allowed) == []


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_no_module_reaches_into_another_modules_private_attributes(path):
    found = private_accesses(path.read_text())
    assert not found, f"{path.relative_to(PKG)} uses private attributes of other modules' objects: {found}"


def test_every_module_imports_on_its_own():
    """Each module imported first, in a fresh set of entity_tracking modules: a cycle fails here."""
    script = (
        "import importlib, sys\n"
        f"mods = {modules()!r}\n"
        "bad = []\n"
        "for m in mods:\n"
        "    for k in [k for k in sys.modules if k == 'entity_tracking' or k.startswith('entity_tracking.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{m}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(PKG.parent)})
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_layer_table_covers_every_package():
    top = {p.name.removesuffix(".py") for p in PKG.iterdir() if p.name != "__init__.py" and
           (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert top == set(RANK), f"layers {sorted(RANK)} vs packages and modules {sorted(top)}"
