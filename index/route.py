"""Greedy descent: the ONLY routing code. The Spark job, the router and the trainer call it.

At each level a point moves to the child c of its current node that minimises
``||x - c||^2 + bias_c``, i.e. maximises ``x.c - (||c||^2 + bias_c)/2`` (the
same choice a FAISS IndexFlatIP over ``[c, -(||c||^2 + bias_c)/2]`` makes for
``[x, 1]``).

The arithmetic is index/_descend.c (built by ``pip install -e .``): each score
is accumulated with fused multiply-adds in a fixed order, so a point's path is
the same bits whatever batch it is routed in and on every CPU. Cost: p*k dot
products per point, about 1M points/s per core at k=16, p=4, d=384
(bench/router_throughput.py).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
from pathlib import Path

import numpy as np

from index.tree import Tree

LANES = 16  # the kernel scores children 16 at a time: k is padded to a multiple


def _load_kernel() -> ctypes.CDLL:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (here / f"_descend{suffix}").exists():
            lib = ctypes.CDLL(str(here / f"_descend{suffix}"))
            break
    else:
        raise ImportError(
            f"the routing kernel index/_descend*.so is not built in {here}: "
            "run `pip install -e .` (or `make install`) from the repository root"
        )
    lib.hm_descend.restype = ctypes.c_int
    lib.hm_descend.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 6 + [ctypes.c_void_p] * 4
    lib.hm_offsets.restype = None
    lib.hm_offsets.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.hm_isa.restype = ctypes.c_char_p
    lib.hm_set_isa.argtypes = [ctypes.c_char_p]
    lib.hm_isa_name.restype = ctypes.c_char_p
    lib.hm_isa_name.argtypes = [ctypes.c_int]
    return lib


def _isa_names() -> tuple[str, ...]:
    names = []
    while (name := _KERNEL.hm_isa_name(len(names))) is not None:
        names.append(name.decode())
    return tuple(names)


_KERNEL = _load_kernel()
ISAS = _isa_names()  # the instruction sets compiled into the kernel, best first (this CPU may lack some)


def kernel_isa(use: str | None = None) -> str:
    """The instruction set the kernel runs (the best this CPU has; results are the same bits on all).
    ``use`` switches to another of ``ISAS`` for this process (tests compare them); ValueError if unsupported."""
    if use is not None and _KERNEL.hm_set_isa(use.encode()):
        raise ValueError(f"kernel instruction set {use!r} is unknown or not supported by this CPU; one of {ISAS}")
    return _KERNEL.hm_isa().decode()


def offsets(centroids: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """-(||c||^2 + bias)/2 per centroid [n]: the kernel's fixed-order fmaf chain (hm_offsets), the only place
    these numbers are computed, so the job, the router and the trainer get the same bits."""
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    b = np.ascontiguousarray(biases, dtype=np.float32)
    if c.ndim != 2 or b.shape != (c.shape[0],):
        raise ValueError(f"centroids {c.shape} and biases {b.shape} do not match")
    out = np.empty(c.shape[0], dtype=np.float32)
    _KERNEL.hm_offsets(c.ctypes.data, b.ctypes.data, c.shape[0], c.shape[1], out.ctypes.data)
    return out


class Descender:
    """One tree's centroids laid out for the kernel: per node, its k children as a [dim, kp] block."""

    def __init__(self, tree: Tree):
        self.k, self.depth, self.dim = tree.k, tree.depth, tree.dim
        self.kp = -(-self.k // LANES) * LANES
        self.blocks, self.offsets = [], []
        for c, b in zip(tree.centroids, tree.biases):
            c = np.asarray(c, dtype=np.float32)
            parents = c.shape[0] // self.k
            block = np.zeros((parents, self.dim, self.kp), dtype=np.float32)
            block[:, :, : self.k] = c.reshape(parents, self.k, self.dim).transpose(0, 2, 1)
            off = np.full((parents, self.kp), -np.inf, dtype=np.float32)  # padding lanes never win
            off[:, : self.k] = offsets(c, b).reshape(parents, self.k)
            self.blocks.append(block)
            self.offsets.append(off)
        pointers = ctypes.c_void_p * self.depth
        self._blocks = pointers(*[a.ctypes.data for a in self.blocks])
        self._offsets = pointers(*[a.ctypes.data for a in self.offsets])

    def descend(self, x: np.ndarray, node: np.ndarray, first: int, last: int) -> np.ndarray:
        """Child indices [N, last-first] taken at levels first+1..last (1-based) by points x that sit at
        ``node`` (their node's index within level ``first``); ``node`` is updated in place to level ``last``."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"embeddings of shape {x.shape}; the tree expects [N, {self.dim}]")
        if not 0 <= first <= last <= self.depth:
            raise ValueError(f"levels {first}..{last} outside the tree's 0..{self.depth}")
        assert node.dtype == np.int64 and node.flags.c_contiguous and node.shape == (x.shape[0],)
        if len(node) and (node.min() < 0 or node.max() >= self.k**first):
            raise ValueError(f"node indices must lie in 0..{self.k**first - 1} at level {first}")
        paths = np.zeros((x.shape[0], last - first), dtype=np.int32)
        if x.shape[0] and last > first:
            if _KERNEL.hm_descend(
                x.ctypes.data,
                x.shape[0],
                self.dim,
                self.k,
                self.kp,
                first,
                last,
                self._blocks,
                self._offsets,
                node.ctypes.data,
                paths.ctypes.data,
            ):
                raise MemoryError(f"routing kernel: no scratch memory for {x.shape[0]} points")
        return paths

    def step(self, x: np.ndarray, parent_local: np.ndarray, level: int) -> np.ndarray:
        """Child index (0..k-1) at ``level`` (1-based) for points x whose parent has local index ``parent_local``."""
        node = np.array(parent_local, dtype=np.int64)
        return self.descend(x, node, level - 1, level)[:, 0]

    def route(self, x: np.ndarray, levels: int | None = None) -> np.ndarray:
        """Paths [N, levels] of child indices for L2-normalised embeddings x [N, dim]."""
        node = np.zeros(len(x), dtype=np.int64)
        return self.descend(x, node, 0, self.depth if levels is None else levels)


def route(tree: Tree, x: np.ndarray) -> np.ndarray:
    """Root-to-leaf paths [N, p] for embeddings x [N, dim]."""
    return Descender(tree).route(x)
