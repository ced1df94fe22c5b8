"""Router throughput, one core: greedy descent (index/route.py + _descend.c) vs brute-force nearest leaf.

    python -m bench.router_throughput [--k 16] [--depth 4] [--n 1048576]

Random L2-normalised centroids and embeddings (dim 384). Threads are pinned to 1
for BLAS and FAISS; times are process CPU seconds, so waiting for a shared core
does not count. Baseline: FAISS IndexFlatIP over all k^p leaf centroids, top 1.
Last line: embeddings_per_s_per_core of the descent.
"""

from __future__ import annotations

import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"  # before numpy loads BLAS

import argparse
import time

import faiss
import numpy as np

from index.route import Descender, kernel_isa
from index.tree import Tree


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def per_s(f, n: int) -> float:
    t = time.process_time()
    f()
    return n / (time.process_time() - t)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--n", type=int, default=1 << 20)
    p.add_argument("--dim", type=int, default=384)
    args = p.parse_args()
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    tree = Tree(
        k=args.k,
        depth=args.depth,
        dim=args.dim,
        centroids=[unit(rng, args.k**l, args.dim) for l in range(1, args.depth + 1)],
        biases=[np.zeros(args.k**l, dtype=np.float32) for l in range(1, args.depth + 1)],
    )
    x = unit(rng, args.n, args.dim)
    descender = Descender(tree)
    descender.route(x[:4096])  # warm
    descent = per_s(lambda: descender.route(x), args.n)
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(tree.centroids[-1])
    nb = min(args.n, 16384)  # the baseline is ~k^(p-1)/p times slower: a slice is enough
    brute = per_s(lambda: flat.search(x[:nb], 1), nb)
    print(
        f"k={args.k} depth={args.depth} n={args.n} dim={args.dim} threads=1 (process CPU time), kernel {kernel_isa()}"
    )
    print(f"brute_force_nearest_leaf_per_s {brute:.0f}  ({args.k**args.depth} leaf centroids, FAISS IndexFlatIP)")
    print(f"speedup_over_brute_force {descent / brute:.1f}")
    print(f"embeddings_per_s_per_core {descent:.0f}")


if __name__ == "__main__":
    main()
