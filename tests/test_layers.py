"""Imports follow the data: index/ (ground floor: the tree, run-directory and index formats, the router)
< corpora/ < pipeline/ < train/ < hmem/ (the CLIs that combine index and model). A module imports only
its own layer and the ones below, lazily or not, and no chain of module imports comes back to where it
started. jobs/, bench/ and tests/ are scripts on top and may import anything."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ["index", "corpora", "pipeline", "train", "hmem"]


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def imported(path: str) -> set[str]:
    """Project modules a module imports, lazily or not (``from pkg import mod`` counts as pkg.mod when it is one).
    Imports under ``if TYPE_CHECKING:`` are annotations only and never run, so they are left out."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] in LAYERS}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in LAYERS:
                subs = {f"{node.module}.{a.name}" for a in node.names}
                out |= {s for s in subs if s in MODULES} or {node.module}
    return out


MODULES = {
    module_name(os.path.join(d, f)): os.path.join(d, f)
    for layer in LAYERS
    for d, _, files in os.walk(os.path.join(ROOT, layer))
    for f in files
    if f.endswith(".py")
}
GRAPH = {m: imported(p) & set(MODULES) - {m} for m, p in MODULES.items()}


@pytest.mark.parametrize("layer", LAYERS)
def test_no_import_runs_back_up(layer):
    above = set(LAYERS[LAYERS.index(layer) + 1 :])
    bad = {
        m: sorted(d for d in deps if d.split(".")[0] in above) for m, deps in GRAPH.items() if m.split(".")[0] == layer
    }
    bad = {m: d for m, d in bad.items() if d}
    assert not bad, f"imports against the data flow ({' < '.join(LAYERS)}): {bad}"


def test_no_import_cycle():
    """Depth-first search; a grey node met again closes a cycle, printed as its chain of modules."""
    state, stack = {}, []

    def visit(m):
        state[m] = "grey"
        stack.append(m)
        for d in sorted(GRAPH[m]):
            if state.get(d) == "grey":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d) :] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "black"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_the_checks_can_fail():
    """The graph sees real edges: train/ reads the tree through index/, and hmem/ sits on both."""
    assert "index.tree" in GRAPH["train.memory"]
    assert {"index.router", "train.evaluate"} <= GRAPH["hmem.ask"]
