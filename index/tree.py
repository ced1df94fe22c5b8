"""The tree: centroids per level, node ids, block ids, version; save/load.

This module owns the on-disk tree format (``RUN/tree/``) and the numbering of
nodes and memory blocks. Everyone (Spark job, router, trainer) uses it.

Node numbering. The tree is a complete k-ary tree of depth p. A node at level
``l`` (1-based; the root is level 0 and owns no block) is named by its path
prefix ``(i1..il)``; its *local index* within the level is the mixed-radix
number ``i1*k^(l-1) + ... + il``, so its parent is ``local // k`` and its
children are ``local*k + c``. The *global block id* of that node is
``offset(l) + local`` with ``offset(l) = k + k^2 + ... + k^(l-1)``; the tree
owns ``n_tree_blocks = k + ... + k^p`` blocks. The generic memory (one block
per level, shared by all paths) gets ids ``n_tree_blocks + l - 1``.

Routing rule (see index/route.py): at each level the child ``c`` minimising
``||x - centroid_c||^2 + bias_c`` is taken. The bias is 0 for plain k-means;
the fitter (index/kmeans.py) raises it for children that would otherwise take
more than balance_factor/k of their parent's points, so the balance rule also
holds for documents routed after fitting, not just for the fitting sample.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np

FORMAT = "hmem-tree/1"


def level_offset(level: int, k: int) -> int:
    """Global block id of the first node of ``level`` (1-based)."""
    return sum(k**m for m in range(1, level))


def n_tree_blocks(k: int, depth: int) -> int:
    return level_offset(depth + 1, k)


def local_index(paths: np.ndarray, k: int, level: int) -> np.ndarray:
    """Local index at ``level`` of each path in ``paths`` [N, >=level]."""
    paths = np.asarray(paths, dtype=np.int64)
    out = np.zeros(paths.shape[0], dtype=np.int64)
    for l in range(level):
        out = out * k + paths[:, l]
    return out


def path_block_ids(paths: np.ndarray, k: int) -> np.ndarray:
    """Global block ids [N, p] of the nodes on each root-to-leaf path [N, p]."""
    paths = np.atleast_2d(np.asarray(paths, dtype=np.int64))
    local = np.zeros(paths.shape[0], dtype=np.int64)
    out = np.empty_like(paths)
    for l in range(paths.shape[1]):
        local = local * k + paths[:, l]
        out[:, l] = level_offset(l + 1, k) + local
    return out


def generic_block_ids(k: int, depth: int) -> np.ndarray:
    """Ids of the generic memory's blocks, one per level."""
    return n_tree_blocks(k, depth) + np.arange(depth, dtype=np.int64)


def block_level(block_id: int, k: int, depth: int) -> int:
    """1-based level of a global block id (tree or generic)."""
    n = n_tree_blocks(k, depth)
    if block_id >= n:
        return block_id - n + 1
    level = 1
    while block_id >= level_offset(level + 1, k):
        level += 1
    return level


@dataclass
class Tree:
    """A fitted tree. ``centroids[l]`` is [k^(l+1), dim] for level l+1, in local-index order."""

    k: int
    depth: int
    dim: int
    centroids: list[np.ndarray]
    biases: list[np.ndarray]
    counts: list[np.ndarray] = field(default_factory=list)  # documents routed to each node
    config: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.centroids) != self.depth or len(self.biases) != self.depth:
            raise ValueError(f"tree of depth {self.depth} needs {self.depth} centroid and bias levels")
        for l, (c, b) in enumerate(zip(self.centroids, self.biases)):
            n = self.k ** (l + 1)
            if c.shape != (n, self.dim) or b.shape != (n,):
                raise ValueError(
                    f"level {l + 1}: centroids {c.shape} / biases {b.shape}, expected ({n}, {self.dim}) / ({n},)"
                )
        self.centroids = [np.ascontiguousarray(c, dtype=np.float32) for c in self.centroids]
        self.biases = [np.ascontiguousarray(b, dtype=np.float32) for b in self.biases]

    @property
    def version(self) -> str:
        """Content hash of everything routing depends on; a model records it and the router checks it."""
        h = hashlib.sha256(f"{FORMAT}:{self.k}:{self.depth}:{self.dim}".encode())
        for c, b in zip(self.centroids, self.biases):
            h.update(c.tobytes())
            h.update(b.tobytes())
        return h.hexdigest()[:16]

    @property
    def n_blocks(self) -> int:
        return n_tree_blocks(self.k, self.depth)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        arrays = {}
        for l in range(self.depth):
            arrays[f"centroids_{l + 1}"] = self.centroids[l]
            arrays[f"biases_{l + 1}"] = self.biases[l]
            if self.counts:
                arrays[f"counts_{l + 1}"] = np.asarray(self.counts[l], dtype=np.int64)
        tmp = os.path.join(directory, "tree.npz.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, os.path.join(directory, "tree.npz"))
        meta = {
            "format": FORMAT,
            "version": self.version,
            "k": self.k,
            "depth": self.depth,
            "dim": self.dim,
            "n_blocks": self.n_blocks,
            "config": self.config,
        }
        with open(os.path.join(directory, "tree.json"), "w") as f:
            json.dump(meta, f, indent=2)

    @classmethod
    def load(cls, directory: str) -> "Tree":
        meta_path = os.path.join(directory, "tree.json")
        npz_path = os.path.join(directory, "tree.npz")
        for p in (meta_path, npz_path):
            if not os.path.exists(p):
                raise FileNotFoundError(
                    f"{p} is missing: is {directory} the tree/ folder of a finished cluster_corpus run?"
                )
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {meta.get('format')!r}, this code reads {FORMAT!r}")
        try:
            z = np.load(npz_path)
            d = meta["depth"]
            tree = cls(
                k=meta["k"],
                depth=d,
                dim=meta["dim"],
                centroids=[z[f"centroids_{l}"] for l in range(1, d + 1)],
                biases=[z[f"biases_{l}"] for l in range(1, d + 1)],
                counts=[z[f"counts_{l}"] for l in range(1, d + 1)] if "counts_1" in z else [],
                config=meta.get("config", {}),
            )
        except (KeyError, ValueError, OSError) as e:
            raise ValueError(f"{npz_path} is corrupt or incomplete ({e}); rerun jobs/cluster_corpus.py") from e
        if tree.version != meta["version"]:
            raise ValueError(
                f"{directory}: tree.npz hashes to {tree.version} but tree.json says {meta['version']}; the files "
                "come from different runs"
            )
        return tree

    def to_meta(self) -> dict:
        return {"k": self.k, "depth": self.depth, "dim": self.dim, "version": self.version}
