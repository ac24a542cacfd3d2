"""The house's floors: faces (what a person or a scheduler calls) → stages (the Ray jobs) → core
(audio, labels, models, the pieces stages share) → ground (formats, storage, config, the console).

``ls melbatch/`` is the architecture: each folder holds one concept and stands on one floor, and the
few modules at the top are the ground. Every import of melbatch's own modules points to its own floor
or one below, and nothing imports in a circle. A new folder or top-level module must be given a floor
here (and on the design page)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "melbatch"
FLOORS = {
    "face": ["cli", "look"],
    "stage": ["stages", "train"],
    "core": ["audio", "labels", "model", "testing"],
    "ground": ["config", "console", "ledger", "listing", "shards", "storage", "__init__"],
}
LEVEL = {entry: i for i, floor in enumerate(FLOORS.values()) for entry in floor}


def _modules() -> dict[str, Path]:
    """Every module by its dotted name under melbatch (``audio.decode``, ``cli.__init__``, ``config``)."""
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}


MODULES = _modules()


def _resolve(dotted: str) -> str:
    """``melbatch.audio.decode`` → ``audio.decode``; a package → its ``__init__``."""
    name = dotted.removeprefix("melbatch").lstrip(".")
    if not name:
        return "__init__"
    return name if name in MODULES else f"{name}.__init__"


def _imports(module: str) -> set[str]:
    """melbatch modules ``module`` imports by name, at the top or inside functions."""
    tree = ast.parse(MODULES[module].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "melbatch":
            for alias in node.names:  # `from melbatch.audio import decode` names a module, else an attribute
                sub = f"{node.module}.{alias.name}"
                found.add(_resolve(sub) if _resolve(sub) in MODULES else _resolve(node.module))
        elif isinstance(node, ast.Import):
            found |= {_resolve(a.name) for a in node.names if a.name.split(".")[0] == "melbatch"}
    return found - {module}


def _floor(module: str) -> int:
    return LEVEL[module.split(".")[0]]


def test_every_folder_and_top_module_has_a_floor():
    top = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir()
                                                   if p.is_dir() and (p / "__init__.py").exists()}
    assert top == set(LEVEL)
    assert len(top) <= 15, "ls melbatch/ is the architecture: group modules into a concept folder"


def test_every_folder_says_what_it_holds():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc) > 60, f"{init.parent.name}/__init__.py: a docstring naming what the folder holds"
        assert not [p for p in init.parent.iterdir() if p.is_dir() and p.name != "__pycache__"], \
            f"{init.parent.name}/ holds a folder: concepts are one level deep"


def test_every_arrow_points_down_or_across():
    up = [(m, dep) for m in MODULES for dep in _imports(m) if _floor(dep) < _floor(m)]
    assert not up, f"imports that point up a floor: {up}"


def test_the_import_graph_is_read_whole():
    """The other tests read what they should: the graph has the arrows we know of."""
    assert {"audio.logmel", "audio.decode", "config.__init__"} <= _imports("audio.objects")
    assert "cli.commands" in _imports("cli.__init__")
    assert "__init__" in _imports("stages.featurize")  # from melbatch import URI


def test_no_circles():
    graph = {m: _imports(m) for m in MODULES}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(graph[m]):
            assert state.get(dep) != 1, f"circle: {' -> '.join([*path, m, dep])}"
            if dep not in state:
                visit(dep, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
