"""Imports follow the data: index/ needs nothing from pipeline/, train/ or hmem/; nothing below hmem/ imports it.

(pipeline/pack.py still reads a transformers tokenizer folder through train.hf; that arrow goes when the
tokenizer loader moves to a module of its own.)"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BELOW = {"index": {"pipeline", "train", "hmem"}, "pipeline": {"hmem"}, "train": {"hmem"},
         "corpora": {"hmem"}}


def imported(path: str) -> set[str]:
    """Top-level packages a module imports, lazily or not."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(BELOW))
def test_no_import_runs_back_up(package):
    bad = {}
    for name in sorted(os.listdir(os.path.join(ROOT, package))):
        if name.endswith(".py"):
            up = imported(os.path.join(ROOT, package, name)) & BELOW[package]
            if up:
                bad[f"{package}/{name}"] = sorted(up)
    assert not bad, f"imports against the data flow: {bad}"
