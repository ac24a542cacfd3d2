"""The house's floors: faces (what a person or a scheduler calls) → stages (the Ray jobs) → core
(audio, features, models, the pieces stages share) → ground (formats, storage, config). Every
import of melbatch's own modules points to its own floor or one below, and nothing imports in a
circle. A new module must be given a floor here (and in the README's Development section)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "melbatch"
FLOORS = {
    "face": ["cli", "options", "demo", "submit", "report", "review", "similar"],
    "stage": ["featurize", "train", "trainloop", "trainout", "trainset", "classify", "scan"],
    "core": ["model", "weights", "augment", "features", "staging", "labels", "pictures", "audio", "runs", "console",
             "samples", "candidates", "detections", "portable", "timeline",
             "multilabel", "cpu"],
    "ground": ["shards", "ledger", "storage", "config", "__init__"],
}
LEVEL = {m: i for i, floor in enumerate(FLOORS.values()) for m in floor}


def _imports(module: str) -> set[str]:
    """melbatch modules ``module`` imports, at the top or inside functions."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("melbatch"):
            if node.module == "melbatch":
                found |= {a.name for a in node.names if a.name in LEVEL}
                found.add("__init__")
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("melbatch.")}
    return found - {module}


def test_every_module_has_a_floor():
    assert {p.stem for p in PACKAGE.glob("*.py")} == set(LEVEL)


def test_every_arrow_points_down_or_across():
    up = [(m, dep) for m in LEVEL for dep in _imports(m) if LEVEL[dep] < LEVEL[m]]
    assert not up, f"imports that point up a floor: {up}"


def test_no_circles():
    graph = {m: _imports(m) for m in LEVEL}
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
