"""Greedy descent: the ONLY routing code. The Spark job, the router and the trainer call it.

At each level a point moves to the child c of its current node that minimises
``||x - c||^2 + bias_c``. Written as a max inner product on augmented vectors,
``argmax_c  x.c - (||c||^2 + bias_c)/2``, so it is exactly what a FAISS
IndexFlatIP over ``[c, -(||c||^2 + bias_c)/2]`` answers for ``[x, 1]``.

Cost: p*k dot products per point. Points are grouped by their current node so
each group is one BLAS matmul against that node's k children.
"""
from __future__ import annotations

import numpy as np

from index.tree import Tree


def augmented_centroids(centroids: np.ndarray, biases: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C^T [dim, n], offset [n]) so that score = x @ C^T + offset; argmax score is the routing choice."""
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    offset = -0.5 * (np.einsum("nd,nd->n", c, c) + biases.astype(np.float32))
    return np.ascontiguousarray(c.T), offset.astype(np.float32)


class Descender:
    """Precomputed per-level matrices for fast repeated routing with one tree."""

    def __init__(self, tree: Tree):
        self.k, self.depth = tree.k, tree.depth
        self.dim = tree.dim
        # per parent node, its children's [dim, k] block contiguous: a strided column slice
        # of one [dim, k^l] matrix touches a new page per row and is several times slower
        self.levels = []
        for c, b in zip(tree.centroids, tree.biases):
            ct, off = augmented_centroids(c, b)
            blocks = np.ascontiguousarray(ct.reshape(self.dim, -1, self.k).transpose(1, 0, 2))
            self.levels.append((blocks, off.reshape(-1, self.k)))

    def best_child(self, x: np.ndarray, level: int, parent: int) -> np.ndarray:
        """Child index (0..k-1) at ``level`` (1-based) for points x [n, dim] that all sit under node ``parent``."""
        blocks, off = self.levels[level - 1]
        return np.argmax(x @ blocks[parent] + off[parent], axis=1).astype(np.int32)

    def step(self, x: np.ndarray, parent_local: np.ndarray, level: int) -> np.ndarray:
        """Child index (0..k-1) at ``level`` (1-based) for points x whose parent has local index ``parent_local``."""
        out = np.empty(x.shape[0], dtype=np.int32)
        order = np.argsort(parent_local, kind="stable")
        sorted_parents = parent_local[order]
        starts = np.flatnonzero(np.r_[True, sorted_parents[1:] != sorted_parents[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for s, e in zip(starts, ends):
            idx = order[s:e]
            out[idx] = self.best_child(x[idx], level, int(sorted_parents[s]))
        return out

    def route(self, x: np.ndarray, levels: int | None = None) -> np.ndarray:
        """Paths [N, levels] of child indices for L2-normalised embeddings x [N, dim]."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"embeddings of shape {x.shape}; the tree expects [N, {self.dim}]")
        levels = self.depth if levels is None else levels
        paths = np.zeros((x.shape[0], levels), dtype=np.int32)
        if x.shape[0]:
            self._descend(x, np.arange(x.shape[0]), 0, 1, paths)
        return paths

    def _descend(self, x: np.ndarray, rows: np.ndarray, parent: int, level: int, paths: np.ndarray) -> None:
        """Depth first: the points of one node are made contiguous once, then each child recurses on a slice.

        Same matmuls on the same rows in the same order as ``step`` (stable sorts keep
        input order within a node), so the paths are bitwise those of level-by-level
        ``step``; but the rows of a node stay in cache while its subtree is routed.
        """
        child = self.best_child(x, level, parent)
        paths[rows, level - 1] = child
        if level == paths.shape[1]:
            return
        order = np.argsort(child.astype(np.uint16), kind="stable")  # 16-bit keys: numpy radix-sorts
        x, rows = x[order], rows[order]
        bounds = np.r_[0, np.cumsum(np.bincount(child, minlength=self.k))]
        for c in np.flatnonzero(bounds[1:] > bounds[:-1]):
            s, e = bounds[c], bounds[c + 1]
            self._descend(x[s:e], rows[s:e], parent * self.k + int(c), level + 1, paths)


def route(tree: Tree, x: np.ndarray) -> np.ndarray:
    """Root-to-leaf paths [N, p] for embeddings x [N, dim]."""
    return Descender(tree).route(x)
