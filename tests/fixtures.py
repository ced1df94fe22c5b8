"""A tiny run directory (docs/FORMATS.md) for trainer tests: random tree, random tokens, real parquet + manifest.

``make_run_dir(root)`` writes tree/, tokenizer.json, shards/l1=<i1>/ and manifest.json; leaves get
different numbers of sequences so that bin packing by tokens is not trivial.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index.rundir import SHARD_SCHEMA, write_manifest
from index.tree import Tree, local_index
from pipeline import tokenizer
from pipeline.tokenizer import EOT_ID, PAD_ID


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trainer_args(runs: str | list[str], out: str, *sets: str, config: str = "tiny") -> list[str]:
    """train/main.py and its arguments (``sets``: ``section.key=value`` overrides), after any launcher."""
    runs = [runs] if isinstance(runs, str) else list(runs)
    args = [os.path.join(ROOT, "train", "main.py"), "--config", config, "--data", *runs, "--out", str(out)]
    return args + [a for s in sets for a in ("--set", s)]


PROMPTS = {"hydrogen": "the atomic number of hydrogen is", "tree": "memory blocks on a tree"}  # tiny_export's probes


def write_tokenizer(path: str, vocab_size: int) -> int:
    """The project's byte-level BPE (pipeline/tokenizer.py) on two sentences; returns its real vocabulary size."""
    tok = tokenizer.train_bpe(["the atomic number of hydrogen is one", "memory blocks on a tree"] * 20, vocab_size)
    tok.save(path)
    return tok.get_vocab_size()


def make_run_dir(
    root: str,
    k: int = 2,
    depth: int = 2,
    seq_len: int = 16,
    seed: int = 0,
    seqs_per_leaf: list[int] | None = None,
    dim: int = 8,
    row_group_size: int | None = None,
) -> str:
    """Write a run directory under ``root`` and return its path (``row_group_size``: rows per Parquet row group)."""
    rng = np.random.default_rng(seed)
    n_leaves = k**depth
    if seqs_per_leaf is None:
        seqs_per_leaf = [6 + 3 * (i % 3) for i in range(n_leaves)]
    os.makedirs(root, exist_ok=True)
    tree = Tree(
        k=k,
        depth=depth,
        dim=dim,
        centroids=[rng.standard_normal((k**l, dim)).astype(np.float32) for l in range(1, depth + 1)],
        biases=[np.zeros(k**l, dtype=np.float32) for l in range(1, depth + 1)],
    )
    tree.save(os.path.join(root, "tree"))
    vocab = write_tokenizer(os.path.join(root, "tokenizer.json"), 300)

    # one leaf's path from its local index (mixed radix, most significant first)
    leaf_paths = np.array([[(leaf // k ** (depth - 1 - l)) % k for l in range(depth)] for leaf in range(n_leaves)])
    rows, seq_id = [], 0
    for leaf, n in enumerate(seqs_per_leaf):
        for j in range(n):
            toks = rng.integers(2, vocab, size=seq_len + 1).astype(np.int32)
            n_valid = seq_len + 1 if j < n - 1 else int(rng.integers(seq_len // 2, seq_len + 1))
            toks[n_valid:] = PAD_ID
            rows.append(
                {
                    "seq_id": seq_id,
                    "path": leaf_paths[leaf].astype(np.int32).tolist(),
                    "leaf": leaf,
                    "tokens": toks.tolist(),
                    "n_valid": n_valid,
                    "doc_ids": [f"doc{seq_id}"],
                }
            )
            seq_id += 1
    for i1 in range(k):
        part = [r for r in rows if r["path"][0] == i1]
        if part:
            d = os.path.join(root, "shards", f"l1={i1}")
            os.makedirs(d, exist_ok=True)
            pq.write_table(
                pa.Table.from_pylist(part[::-1], schema=SHARD_SCHEMA),
                os.path.join(d, "part-00000.parquet"),
                row_group_size=row_group_size,
            )

    paths = np.array([r["path"] for r in rows])
    valid = np.array([r["n_valid"] - 1 for r in rows])
    levels = []
    for l in range(1, depth + 1):
        local = local_index(paths, k, l)
        levels.append(
            {
                "level": l,
                "nodes": k**l,
                "max_child_fraction": 0.0,
                "node_documents": np.bincount(local, minlength=k**l).tolist(),
                "node_tokens": np.bincount(local, weights=valid, minlength=k**l).astype(int).tolist(),
            }
        )
    manifest = {
        "documents_in": len(rows),
        "documents_routed": len(rows),
        "documents_quarantined": 0,
        "tree_version": tree.version,
        "k": k,
        "depth": depth,
        "seq_len": seq_len,
        "vocab_size": vocab,
        "eot_id": EOT_ID,
        "pad_id": PAD_ID,
        "sequences": len(rows),
        "tokens": int(valid.sum()),
        "levels": levels,
        "seed": seed,
        "config": {},
    }
    write_manifest(root, manifest)
    return root
