"""Fit the k children of one node: k-means++ init, mini-batch EM, the balance rule.

Pure numpy, one node at a time; the Spark job calls ``fit_children`` once per
node inside an executor (pipeline/fit.py), on a bounded sample of that node's
points.

Method (paper, ../shared/PAPER.md): k-means++ initialisation, then ``steps``
EM steps, each on ``batch_size`` fresh points of the sample (the sample is
cycled when it is smaller; when it fits in one batch every step is a full
Lloyd step). After each E-step the balance rule moves a random part of any
child holding more than balance_factor/k of the assignments to the smallest
child. Centroids are updated with per-centre learning rate 1/n (Sculley's
mini-batch k-means).

Beyond the paper: the balance rule above only shapes the centroids. New points
are routed by nearest centroid, which can still overfill a child. So after EM
we fit one additive bias per child (routing minimises ||x-c||^2 + bias) such
that nearest-with-bias assignment of the sample respects the cap. When the
sample is a subsample of the node, the cap is tightened by ``margin_sigmas``
binomial standard deviations so that it also holds for the unseen points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class KMeansParams:
    k: int
    balance_factor: float = 1.5
    batch_size: int = 6400
    steps: int = 20
    bias_iters: int = 200
    margin_sigmas: float = 3.0


@dataclass
class Children:
    centroids: np.ndarray  # [k, dim] float32
    biases: np.ndarray  # [k] float32
    sample_counts: np.ndarray  # [k] assignments of the sample under the final rule
    cap: int  # the per-child cap that the biases aimed for on the sample


def sq_dists(x: np.ndarray, c: np.ndarray, xx: np.ndarray | None = None) -> np.ndarray:
    """||x - c||^2 for all pairs, [N, k]; ``xx``: the rows' squared norms [N, 1] when already known."""
    xx = (x * x).sum(1, keepdims=True) if xx is None else xx
    d = xx - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]
    return np.maximum(d, 0.0)


def child_sums(x: np.ndarray, assign: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-child float64 sums of the rows of x, each child's members added row after row in row order: the
    bits of np.add.at, which was 3/4 of a whole tree fit (np.add.reduceat along rows is 3x slower than this)."""
    rows = x[np.argsort(assign, kind="stable")]
    sums = np.zeros((len(counts), x.shape[1]), dtype=np.float64)
    start = 0
    for j, end in enumerate(np.cumsum(counts).astype(np.int64)):
        if end > start:
            sums[j] = rows[start:end].sum(0, dtype=np.float64)
        start = end
    return sums


def kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator, xx: np.ndarray | None = None) -> np.ndarray:
    n = x.shape[0]
    centres = [x[rng.integers(n)]]
    d2 = sq_dists(x, centres[0][None], xx)[:, 0]
    for _ in range(1, k):
        total = d2.sum()
        # all remaining points coincide with a centre: any point is as good as another
        i = rng.integers(n) if total <= 0 else rng.choice(n, p=d2 / total)
        centres.append(x[i])
        d2 = np.minimum(d2, sq_dists(x, x[i][None], xx)[:, 0])
    return np.stack(centres).astype(np.float32)


def child_cap(n_points: int, k: int, balance_factor: float) -> int:
    """Most points one child may hold: floor(balance_factor/k * n), at least 1."""
    return max(1, int(np.floor(balance_factor * n_points / k + 1e-9)))


def rebalance(assign: np.ndarray, k: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """The paper's rule: move a random part of an overfull child's points to the smallest child."""
    assign = assign.copy()
    counts = np.bincount(assign, minlength=k)
    while counts.max() > cap:
        big, small = int(counts.argmax()), int(counts.argmin())
        move = min(counts[big] - cap, cap - counts[small])
        if move <= 0:
            break
        members = np.flatnonzero(assign == big)
        chosen = rng.choice(members, size=move, replace=False)
        assign[chosen] = small
        counts[big] -= move
        counts[small] += move
    return assign


def fit_biases(d: np.ndarray, cap: int, iters: int) -> np.ndarray:
    """Per-child additive biases so that argmin(d + b) (d = ||x-c||^2, [N, k]) gives every child at most ``cap``
    points.

    Each round takes the most overfull child and evicts exactly its surplus: its
    bias rises by the surplus-th smallest margin to the members' best child that
    still has room. Measuring the margin against children with room (not merely
    the second choice) stops two full neighbours from trading points back and
    forth in tiny steps; the evicted points may still overfill a full neighbour,
    whose bias then rises in a later round.
    """
    k = d.shape[1]
    b = np.zeros(k, dtype=np.float64)
    for _ in range(iters):
        cost = d + b
        assign = cost.argmin(1)
        counts = np.bincount(assign, minlength=k)
        if counts.max() <= cap:
            break
        j = int(counts.argmax())
        members = np.flatnonzero(assign == j)
        others = cost[members].copy()
        others[:, counts >= cap] = np.inf
        if np.isinf(others).all():  # no child has room: fall back to the second choice
            others = cost[members].copy()
            others[:, j] = np.inf
        margin = np.sort(others.min(1) - cost[members, j])
        surplus = counts[j] - cap
        # the surplus points with the smallest margin leave; tiny epsilon breaks the tie
        b[j] += margin[surplus - 1] + 1e-5 * (1.0 + abs(margin[surplus - 1]))
    return b.astype(np.float32)


def fit_children(points: np.ndarray, params: KMeansParams, seed: int, node_size: int | None = None) -> Children:
    """Fit k children on ``points`` (a sample of a node holding ``node_size`` points in all)."""
    x = np.ascontiguousarray(points, dtype=np.float32)
    n, k = x.shape[0], params.k
    if n == 0:
        raise ValueError("fit_children needs at least one point")
    node_size = n if node_size is None else node_size
    rng = np.random.default_rng(seed)
    xx = (x * x).sum(1, keepdims=True)
    c = kmeans_pp(x, k, rng, xx)
    full = n <= params.batch_size
    counts = np.zeros(k, dtype=np.float64)
    order = rng.permutation(n)
    pos = 0
    for _ in range(params.steps):
        if full:
            batch = x
            counts[:] = 0.0  # a full Lloyd step: the new centre is the batch mean
        else:
            if pos + params.batch_size > n:
                order, pos = rng.permutation(n), 0
            batch = x[order[pos : pos + params.batch_size]]
            pos += params.batch_size
        assign = sq_dists(batch, c, xx if full else None).argmin(1)
        assign = rebalance(assign, k, child_cap(len(batch), k, params.balance_factor), rng)
        m = np.bincount(assign, minlength=k).astype(np.float64)
        sums = child_sums(batch, assign, m)
        empty = np.flatnonzero(m == 0)
        members = np.flatnonzero(assign == m.argmax())
        n_reseed = min(empty.size, members.size - 1)
        if n_reseed > 0:  # re-seed dead children on random points of the largest one
            c[empty[:n_reseed]] = batch[rng.choice(members, size=n_reseed, replace=False)]
        upd = m > 0
        c[upd] = ((counts[upd, None] * c[upd] + sums[upd]) / (counts[upd] + m[upd])[:, None]).astype(np.float32)
        counts += m
    cap = child_cap(n, k, params.balance_factor)
    if node_size > n:  # a subsample: leave room for sampling noise on the unseen points
        q = params.balance_factor / k
        cap = max(1, int(np.floor(cap - params.margin_sigmas * np.sqrt(n * q * (1 - q)))))
    d = sq_dists(x, c, xx)
    b = fit_biases(d, cap, params.bias_iters)
    final = (d + b).argmin(1)
    return Children(centroids=c, biases=b, sample_counts=np.bincount(final, minlength=k), cap=cap)
