"""Fit the tree top-down over Spark, then route every document down it.

The embeddings (``RUN/embeddings``) are written once, by the embed stage, and only
read here: a document's node at any level is recomputed by descending the levels
fitted so far (index/route.py, the router's own code: p*k dot products per point,
far cheaper than writing the embedding again), and paths travel in a narrow table.

Level by level while nodes are large (``fit_level_<l>``, l = 1, 2, ...):
  1. one pass over the embeddings descends every document to its level l-1 node
     (its *parent*) and keeps a seeded hash sample of at most ``sample_per_node``
     points per parent (the parents' sizes come from step 3 of level l-1);
  2. ``groupBy(parent).applyInArrow``: index/kmeans.fit_children on each sample,
     all parents of the level in parallel on executors; the k^l centroids and
     biases come back to the driver;
  3. one pass counts the documents per level-l node (k^l numbers reach the driver).
Then, once every node of the level reached holds at most ``local_fit_rows``
documents and there are at least as many nodes as task slots
(``fit_subtrees``): one shuffle groups the documents by node and each task fits
the rest of its node's subtree in one process, as a single-process FAISS loop
would, with the same sampling, seeds and fitting as steps 1-3: the tree does not
depend on where this switch happens (tests/test_fit.py checks it).
Finally ``route`` descends every document through the whole tree and writes
``work/routed`` (doc_id, path, leaf). With ``--tree RUN_A`` only ``route`` runs.

Memory: the driver holds centroids, biases and per-node counts, never documents
or the embedding matrix. An executor task holds one parent's sample
(sample_per_node x dim x 4 bytes, 197 MB at the paper's 128k x 384) or one
subtree of at most ``local_fit_rows`` documents (about 4.6 KB each with its
copies: 1.2 GB at the default 2^18).
"""

from __future__ import annotations

import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from index.docindex import embedding_matrix
from index.kmeans import KMeansParams, fit_children
from index.route import Descender
from index.tree import Tree
from pipeline.config import JobConfig

# centroids and biases travel as float32 bytes: as Python float lists, 65,536 x 384 of them took 1.2 GB on the driver
FIT_SCHEMA = "level int, parent long, centroids binary, biases binary, sample long, child_counts array<long>"
SAMPLE_SCHEMA = "node long, doc_id string, h long, embedding array<float>"
FIT_ARROW = pa.schema(
    [
        ("level", pa.int32()),
        ("parent", pa.int64()),
        ("centroids", pa.binary()),
        ("biases", pa.binary()),
        ("sample", pa.int64()),
        ("child_counts", pa.list_(pa.int64())),
    ]
)


def node_seed(seed: int, level: int, parent: int) -> int:
    return int(np.random.SeedSequence([seed, level, parent]).generate_state(1)[0])


def level_uniform(h: np.ndarray, level: int) -> np.ndarray:
    """A uniform [0,1) number per document from its hash ``h`` = xxhash64(doc_id, seed), one per level
    (splitmix64 finaliser): the sampling decision is the same in a Spark pass and in a subtree task."""
    with np.errstate(over="ignore"):
        z = h.astype(np.uint64) + np.uint64(level) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def read_embeddings(spark: SparkSession, run_dir: str, seed: int | None = None) -> DataFrame:
    """(doc_id, embedding), plus ``h`` = xxhash64(doc_id, seed) for sampling when a seed is given."""
    df = spark.read.parquet(os.path.join(run_dir, "embeddings"))
    if seed is None:
        return df.select("doc_id", "embedding")
    return df.select("doc_id", F.xxhash64("doc_id", F.lit(seed)).alias("h"), "embedding")


def params_of(cfg: JobConfig) -> KMeansParams:
    return KMeansParams(k=cfg.k, balance_factor=cfg.balance_factor, batch_size=cfg.em_batch_size, steps=cfg.em_steps)


def descended(batches, tree: Tree | None, dim: int, level: int):
    """Per Arrow batch of embeddings: (batch, each point's node index within ``level`` (0 at the root), paths
    [N, level]), descended by the router's kernel through the first ``level`` levels of ``tree``."""
    descender = Descender(tree) if level else None
    for b in batches:
        x = embedding_matrix(b.column("embedding"), dim, "embeddings")
        node = np.zeros(len(x), dtype=np.int64)
        paths = descender.descend(x, node, 0, level) if level else None
        yield b, node, paths


def in_sample(h: np.ndarray, level: int, node_size, cfg: JobConfig) -> np.ndarray:
    """The seeded sample of a node's points its children are fitted on: at most about sample_per_node."""
    return level_uniform(h, level) < np.minimum(1.0, cfg.sample_per_node / np.maximum(node_size, 1))


def fit_row(sample: np.ndarray, level: int, parent: int, node_size: int, cfg: JobConfig) -> dict:
    """Fit one parent's children on its sample (rows in doc-id order); a FIT_SCHEMA row without child counts."""
    if not len(sample):  # no point drawn (vanishingly rare): zero centroids, as a parent no group reaches
        c, b = np.zeros((cfg.k, sample.shape[1]), np.float32), np.zeros(cfg.k, np.float32)
    else:
        ch = fit_children(sample, params_of(cfg), seed=node_seed(cfg.seed, level, parent), node_size=node_size)
        c, b = ch.centroids, ch.biases
    return {
        "level": level,
        "parent": parent,
        "centroids": c.tobytes(),
        "biases": b.tobytes(),
        "sample": len(sample),
        "child_counts": None,
    }


def children_of(row, k: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A FIT_SCHEMA row's (centroids [k, dim], biases [k])."""
    return np.frombuffer(row["centroids"], np.float32).reshape(k, dim), np.frombuffer(row["biases"], np.float32)


def sorted_group(table: pa.Table, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A group's (embeddings, hashes) in doc-id order: Spark does not order a group, the fit must not depend on it."""
    table = table.take(pc.sort_indices(table, [("doc_id", "ascending")]))
    return embedding_matrix(table.column("embedding"), dim, "embeddings"), table.column("h").to_numpy()


class Levels:
    """The fitted levels so far: centroids, biases, per-node counts and sample sizes, level by level."""

    def __init__(self, cfg: JobConfig, dim: int, n: int):
        self.cfg, self.dim = cfg, dim
        self.centroids, self.biases, self.counts, self.samples = [], [], [np.array([n], dtype=np.int64)], []

    def add(self, rows) -> None:
        """Install one level from its FIT_SCHEMA rows (one per fitted parent; a parent without documents keeps
        zero centroids: descent through it is still defined)."""
        k, n = self.cfg.k, self.cfg.k ** (len(self.centroids) + 1)
        c, b, counts = np.zeros((n, self.dim), np.float32), np.zeros(n, np.float32), np.zeros(n, np.int64)
        sample = 0
        for r in rows:
            p = r["parent"]
            c[p * k : (p + 1) * k], b[p * k : (p + 1) * k] = children_of(r, k, self.dim)
            if r["child_counts"] is not None:  # a subtree task counted them; else count_level does
                counts[p * k : (p + 1) * k] = r["child_counts"]
            sample += r["sample"]
        self.centroids.append(c)
        self.biases.append(b)
        self.counts.append(counts)
        self.samples.append(sample)

    def tree(self) -> Tree:
        return Tree(
            k=self.cfg.k,
            depth=len(self.centroids),
            dim=self.dim,
            centroids=list(self.centroids),
            biases=list(self.biases),
        )

    def save(self, work: str, level: int) -> None:
        np.savez(
            os.path.join(work, f"level_{level}.npz"),
            centroids=self.centroids[level - 1],
            biases=self.biases[level - 1],
            counts=self.counts[level],
            sample=self.samples[level - 1],
        )

    def load(self, work: str, level: int) -> None:
        z = np.load(os.path.join(work, f"level_{level}.npz"))
        self.centroids.append(z["centroids"])
        self.biases.append(z["biases"])
        self.counts.append(z["counts"])
        self.samples.append(int(z["sample"]))

    def summary(self, level: int) -> dict:
        return level_summary(level, self.counts[level], self.samples[level - 1], self.cfg)


def fit_level(spark: SparkSession, emb: DataFrame, levels: Levels, level: int) -> list:
    """Steps 1-2 of the module doc for one level: its FIT_SCHEMA rows (k^(level-1) at most reach the driver)."""
    cfg, dim = levels.cfg, levels.dim
    bc = spark.sparkContext.broadcast((levels.tree() if level > 1 else None, levels.counts[level - 1]))

    def sample(batches):
        tree, counts = bc.value
        for b, node, _ in descended(batches, tree, dim, level - 1):
            keep = in_sample(b.column("h").to_numpy(), level, counts[node], cfg)
            yield pa.RecordBatch.from_arrays(
                [pa.array(node[keep]), *(b.column(c).filter(keep) for c in ("doc_id", "h", "embedding"))],
                names=["node", "doc_id", "h", "embedding"],
            )

    def fit(table: pa.Table) -> pa.Table:
        parent = table.column("node")[0].as_py()
        x, _ = sorted_group(table, dim)
        return pa.Table.from_pylist([fit_row(x, level, parent, int(bc.value[1][parent]), cfg)], schema=FIT_ARROW)

    return emb.mapInArrow(sample, SAMPLE_SCHEMA).groupBy("node").applyInArrow(fit, FIT_SCHEMA).collect()


def count_level(spark: SparkSession, emb: DataFrame, tree: Tree) -> np.ndarray:
    """Step 3: documents per node of the tree's last level (one pass; k^depth numbers reach the driver)."""
    bc = spark.sparkContext.broadcast(tree)
    depth, dim, n = tree.depth, tree.dim, tree.k**tree.depth

    def count(batches):
        for _, node, _ in descended(batches, bc.value, dim, depth):
            c = np.bincount(node, minlength=n)
            nz = np.flatnonzero(c)
            yield pa.RecordBatch.from_arrays([pa.array(nz), pa.array(c[nz])], names=["node", "n"])

    counts = np.zeros(n, dtype=np.int64)
    per_batch = emb.select("embedding").mapInArrow(count, "node long, n long")
    for r in per_batch.groupBy("node").agg(F.sum("n").alias("n")).collect():
        counts[r["node"]] = r["n"]
    return counts


def fit_subtrees(spark: SparkSession, emb: DataFrame, levels: Levels, top: int) -> list:
    """Levels top+1..depth: one task per level-``top`` node fits its whole subtree (see the module doc).
    Returns FIT_SCHEMA rows with child counts for every parent it fitted."""
    cfg, dim, k = levels.cfg, levels.dim, levels.cfg.k
    bc = spark.sparkContext.broadcast(levels.tree() if top else None)

    def tag(batches):
        for b, node, _ in descended(batches, bc.value, dim, top):
            yield pa.RecordBatch.from_arrays(
                [pa.array(node), *(b.column(c) for c in ("doc_id", "h", "embedding"))],
                names=["node", "doc_id", "h", "embedding"],
            )

    def fit(table: pa.Table) -> pa.Table:
        root = table.column("node")[0].as_py()
        x, h = sorted_group(table, dim)
        local = np.zeros(len(x), dtype=np.int64)  # each point's node within the subtree, at the current level
        rows = []
        for level in range(top + 1, cfg.depth + 1):
            first = root * k ** (level - 1 - top)  # the subtree's first node at level-1
            order = np.argsort(local, kind="stable")  # members of each node stay in doc-id order
            bounds = np.searchsorted(local[order], np.arange(k ** (level - 1 - top) + 1))
            child = np.zeros(len(x), dtype=np.int64)
            for j in np.flatnonzero(np.diff(bounds)):
                idx = order[bounds[j] : bounds[j + 1]]
                xi = x[idx]
                row = fit_row(xi[in_sample(h[idx], level, len(idx), cfg)], level, first + j, len(idx), cfg)
                c, b = children_of(row, k, dim)
                one = Tree(k=k, depth=1, dim=dim, centroids=[c], biases=[b])
                child[idx] = Descender(one).route(xi)[:, 0]
                rows.append(dict(row, child_counts=np.bincount(child[idx], minlength=k).tolist()))
            local = local * k + child
        return pa.Table.from_pylist(rows, schema=FIT_ARROW)

    return emb.mapInArrow(tag, SAMPLE_SCHEMA).groupBy("node").applyInArrow(fit, FIT_SCHEMA).collect()


def route(spark: SparkSession, run_dir: str, tree: Tree) -> np.ndarray:
    """Every document's path through the whole tree -> ``work/routed`` (doc_id, path, leaf); returns the
    documents per leaf."""
    bc = spark.sparkContext.broadcast(tree)
    depth, dim = tree.depth, tree.dim

    def step(batches):
        for b, leaf, paths in descended(batches, bc.value, dim, depth):
            flat = pa.array(paths.ravel())
            path = pa.ListArray.from_arrays(pa.array(np.arange(0, paths.size + 1, depth, dtype=np.int32)), flat)
            yield pa.RecordBatch.from_arrays(
                [b.column("doc_id"), path, pa.array(leaf)], names=["doc_id", "path", "leaf"]
            )

    out = os.path.join(run_dir, "work", "routed")
    read_embeddings(spark, run_dir).mapInArrow(step, "doc_id string, path array<int>, leaf long").write.mode(
        "overwrite"
    ).parquet(out)
    counts = np.zeros(tree.k**depth, dtype=np.int64)
    for r in spark.read.parquet(out).groupBy("leaf").count().collect():
        counts[r["leaf"]] = r["count"]
    return counts


def balance(counts: np.ndarray, k: int) -> tuple[float, float]:
    """The largest child's share of its parent, worst and mean over non-empty parents."""
    per_parent = counts.reshape(-1, k)
    totals = per_parent.sum(1)
    frac = per_parent.max(1)[totals > 0] / totals[totals > 0]
    return float(frac.max()), float(frac.mean())


def sum_up(leaves: np.ndarray, k: int, depth: int) -> list[np.ndarray]:
    """Per-node totals of every level (1..depth), summed up from the leaves' values."""
    levels = [np.asarray(leaves, dtype=np.int64)]
    for _ in range(depth - 1):
        levels.insert(0, levels[0].reshape(-1, k).sum(1))
    return levels


def level_summary(level: int, counts: np.ndarray, sample: int, cfg: JobConfig) -> dict:
    worst, mean = balance(counts, cfg.k)
    return {
        "level": level,
        "nodes": cfg.k**level,
        "sample_points": sample,
        "max_child_fraction": worst,
        "mean_max_child_fraction": mean,
        "cap": cfg.balance_factor / cfg.k,
        "node_documents": counts.tolist(),
    }


def load_frozen_tree(cfg: JobConfig) -> tuple[Tree, str]:
    """``--tree``: a run directory or its tree/; returns the tree and the run's tokenizer.json path. The driver
    reads it with plain file I/O (and ships it to the tasks itself), so it must be a local or mounted path."""
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", cfg.tree)
    if scheme and scheme.group(1).lower() != "file":
        raise SystemExit(
            f"--tree {cfg.tree}: the tree is read from a local or mounted path, not {scheme.group(1)}://; "
            "copy the run's tree/ and tokenizer.json to local disk (e.g. hadoop fs -get) and pass that"
        )
    if scheme:
        cfg.tree = cfg.tree[len("file://") :]
    tree_dir = cfg.tree if os.path.exists(os.path.join(cfg.tree, "tree.json")) else os.path.join(cfg.tree, "tree")
    try:
        tree = Tree.load(tree_dir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--tree {cfg.tree}: {e}") from None
    return tree, os.path.join(os.path.dirname(os.path.abspath(tree_dir)), "tokenizer.json")


def route_stage(spark: SparkSession, cfg: JobConfig, run_dir: str, tree: Tree) -> dict:
    """Route every document down a frozen tree (no fitting); writes work/routed and tree/."""
    counts = sum_up(route(spark, run_dir, tree), tree.k, tree.depth)
    tree.save(os.path.join(run_dir, "tree"))
    return {
        "tree_version": tree.version,
        "tree_from": cfg.tree,
        "levels": [level_summary(l + 1, c, 0, cfg) for l, c in enumerate(counts)],
    }


def go_local(counts: np.ndarray, cfg: JobConfig, slots: int) -> bool:
    """Fit the rest of the tree per subtree once every node fits one task and the nodes fill the task slots."""
    return counts.max() <= cfg.local_fit_rows and np.count_nonzero(counts) >= slots


def fit_top_levels(spark: SparkSession, emb: DataFrame, levels: Levels, work: str, stages, n: int) -> int:
    """The ``fit_level_<l>`` stages, one level at a time while nodes are too large or too few to fit per subtree
    (``go_local``); returns the last level fitted this way."""
    cfg = levels.cfg
    slots = spark.sparkContext.defaultParallelism
    level = 0
    while level < cfg.depth and not go_local(levels.counts[level], cfg, slots):
        level += 1

        def run_level(level=level):
            levels.add(fit_level(spark, emb, levels, level))
            levels.counts[level] = count_level(spark, emb, levels.tree())
            levels.save(work, level)
            return levels.summary(level)

        stages.run(spark, f"fit_level_{level}", run_level, total_items=n)
        if len(levels.centroids) < level:  # resumed: the stage was done before
            levels.load(work, level)
    return level


def fit_subtree_levels(
    spark: SparkSession, emb: DataFrame, levels: Levels, work: str, stages, n: int, top: int
) -> None:
    """The ``fit_subtrees`` stage: levels top+1..depth, one task per level-``top`` subtree."""
    cfg = levels.cfg

    def run_subtrees():
        rows = fit_subtrees(spark, emb, levels, top)
        for l in range(top + 1, cfg.depth + 1):
            levels.add(r for r in rows if r["level"] == l)
            levels.save(work, l)
        return {"levels": [levels.summary(l) for l in range(top + 1, cfg.depth + 1)], "from_level": top}

    stages.run(spark, "fit_subtrees", run_subtrees, total_items=n)
    for l in range(len(levels.centroids) + 1, cfg.depth + 1):  # resumed: the stage was done before
        levels.load(work, l)


def fitted_tree(levels: Levels) -> Tree:
    """The fitted levels as a Tree with its per-node counts and the settings that fitted it (tree.json records
    them; a frozen tree's run reads the encoder precision from there)."""
    cfg = levels.cfg
    tree = levels.tree()
    tree.counts = levels.counts[1:]
    tree.config = {
        "seed": cfg.seed,
        "sample_per_node": cfg.sample_per_node,
        "balance_factor": cfg.balance_factor,
        "em_batch_size": cfg.em_batch_size,
        "em_steps": cfg.em_steps,
        "max_windows": cfg.max_windows,
        "encoder": "all-MiniLM-L6-v2",
        "encoder_precision": cfg.encoder_precision,
    }
    return tree


def route_fitted(spark: SparkSession, run_dir: str, tree: Tree) -> dict:
    """The ``route`` stage after a fit: every document down the new tree, which must land as the fit counted
    them; then tree/ is written."""
    leaves = route(spark, run_dir, tree)
    if not np.array_equal(leaves, tree.counts[-1]):  # the fit's own counts: the same descent, the same bits
        raise RuntimeError(
            f"route: documents per leaf differ from the fit's ({np.abs(leaves - tree.counts[-1]).sum()}"
            " moved); the embeddings changed during the job. Delete RUN/work and rerun"
        )
    tree.save(os.path.join(run_dir, "tree"))
    return {"tree_version": tree.version}


def fit_stage(spark: SparkSession, cfg: JobConfig, run_dir: str, stages) -> dict:
    """Fit the tree (stages fit_level_<l>..., then fit_subtrees), write tree/, then the ``route`` stage."""
    work = os.path.join(run_dir, "work")
    os.makedirs(work, exist_ok=True)
    emb = read_embeddings(spark, run_dir, cfg.seed)
    n, dim = emb.count(), len(emb.select("embedding").first()[0])  # parquet metadata, one row
    levels = Levels(cfg, dim, n)
    top = fit_top_levels(spark, emb, levels, work, stages, n)
    if top < cfg.depth:
        fit_subtree_levels(spark, emb, levels, work, stages, n, top)
    tree = fitted_tree(levels)
    stages.run(spark, "route", lambda: route_fitted(spark, run_dir, tree), total_items=n)
    names = [f"fit_level_{l}" for l in range(1, top + 1)] + ["fit_subtrees"] * (top < cfg.depth) + ["route"]
    return {
        "tree_version": tree.version,
        "levels": [levels.summary(l) for l in range(1, cfg.depth + 1)],
        "fitted_in_subtrees_from_level": top,
        "stages": names,
    }
