"""Fit the tree level by level over Spark, and route every document down it.

For level l, each node of level l-1 (its *parent*) gets k children:
  1. count documents per parent (k^(l-1) numbers reach the driver);
  2. keep a seeded hash sample of at most ``sample_per_node`` points per parent;
  3. ``groupBy(parent).applyInPandas``: index/kmeans.fit_children on each
     sample, all parents of the level in parallel on executors;
  4. the k^l centroids and biases come back to the driver, are broadcast, and
     every document descends one level with index/route.py (the same code the
     router runs), on executors;
  5. the assignment is written to ``work/level_<l>`` (a resume point) and the
     per-child counts give the level's balance figure.
With ``--tree RUN_A`` (``route_stage``) nothing is fitted: every document
descends all levels of RUN_A's tree in one pass and the counts per node are
summed up from the leaves.
The driver holds only centroids, biases and per-node counts: never documents
or the embedding matrix. Per executor task the memory bound is one parent's
sample (sample_per_node x dim x 4 bytes, 197 MB at the paper's 128k x 384).
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from index.kmeans import KMeansParams, fit_children
from index.route import Descender
from index.tree import Tree
from pipeline.config import JobConfig
from pipeline.spark import with_lookup

FIT_SCHEMA = T.StructType([
    T.StructField("parent", T.LongType()),
    T.StructField("centroids", T.ArrayType(T.ArrayType(T.FloatType()))),
    T.StructField("biases", T.ArrayType(T.FloatType())),
    T.StructField("sample", T.LongType()),
])


def node_seed(seed: int, level: int, parent: int) -> int:
    return int(np.random.SeedSequence([seed, level, parent]).generate_state(1)[0])


def hash_uniform(seed: int, level: int):
    """A uniform [0,1) number per document that depends only on (doc_id, seed, level)."""
    h = F.xxhash64("doc_id", F.lit(seed), F.lit(level))
    return (F.abs(h % F.lit(1 << 30)).cast("double") / float(1 << 30))


def fit_level(df: DataFrame, level: int, counts: dict[int, int], cfg: JobConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """Fit the children of every parent of ``level``; returns centroids [k^l, d], biases [k^l], sample size."""
    k = cfg.k
    params = KMeansParams(k=k, balance_factor=cfg.balance_factor, batch_size=cfg.em_batch_size, steps=cfg.em_steps)
    seed = cfg.seed

    def fit_group(pdf: pd.DataFrame) -> pd.DataFrame:
        pdf = pdf.sort_values("doc_id")  # Spark does not order a group: sort for determinism
        parent = int(pdf["node"].iloc[0])
        x = np.stack(pdf["embedding"].to_numpy()).astype(np.float32)
        ch = fit_children(x, params, seed=node_seed(seed, level, parent), node_size=counts[parent])
        return pd.DataFrame({"parent": [parent], "centroids": [[c.tolist() for c in ch.centroids]],
                             "biases": [ch.biases.tolist()], "sample": [len(x)]})

    fractions = {parent: min(1.0, cfg.sample_per_node / n) for parent, n in counts.items()}
    sampled = with_lookup(df, "node", fractions, "keep_p", "double").filter(hash_uniform(cfg.seed, level) < F.col("keep_p"))
    fitted = sampled.select("doc_id", "node", "embedding").groupBy("node").applyInPandas(fit_group, FIT_SCHEMA)
    centroids = biases = None
    sample = 0
    for row in fitted.toLocalIterator():  # k^(l-1) rows of k centroids each
        c = np.asarray(row["centroids"], dtype=np.float32)
        if centroids is None:
            centroids = np.zeros((k ** level, c.shape[1]), dtype=np.float32)
            biases = np.zeros(k ** level, dtype=np.float32)
        p = row["parent"]
        centroids[p * k:(p + 1) * k] = c
        biases[p * k:(p + 1) * k] = row["biases"]
        sample += row["sample"]
    # a parent with no documents keeps zero centroids: descent through it is still defined (child 0)
    return centroids, biases, sample


def descend(df: DataFrame, spark: SparkSession, tree: Tree) -> DataFrame:
    """Append the child index at level ``tree.depth`` to every document's path; update ``node``."""
    level, k = tree.depth, tree.k
    bc = spark.sparkContext.broadcast(tree)

    def step(batches):
        descender = Descender(bc.value)
        for pdf in batches:
            x = np.stack(pdf["embedding"].to_numpy()).astype(np.float32)
            child = descender.step(x, pdf["node"].to_numpy(np.int64), level)
            parents = np.stack(pdf["path"].to_numpy()).reshape(len(pdf), level - 1)
            pdf["path"] = list(np.column_stack([parents, child]).astype(np.int32))
            pdf["node"] = pdf["node"].to_numpy(np.int64) * k + child
            yield pdf

    return df.mapInPandas(step, df.schema)


def node_counts(df: DataFrame, n_nodes: int) -> np.ndarray:
    """Documents per node (column ``node``) of one level."""
    counts = np.zeros(n_nodes, dtype=np.int64)
    for r in df.groupBy("node").count().collect():
        counts[r["node"]] = r["count"]
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
    return {"level": level, "nodes": cfg.k ** level, "sample_points": sample, "max_child_fraction": worst,
            "mean_max_child_fraction": mean, "cap": cfg.balance_factor / cfg.k, "node_documents": counts.tolist()}


def load_frozen_tree(cfg: JobConfig) -> tuple[Tree, str]:
    """``--tree``: a run directory or its tree/; returns the tree and the run's tokenizer.json path."""
    tree_dir = cfg.tree if os.path.exists(os.path.join(cfg.tree, "tree.json")) else os.path.join(cfg.tree, "tree")
    try:
        tree = Tree.load(tree_dir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--tree {cfg.tree}: {e}") from None
    return tree, os.path.join(os.path.dirname(os.path.abspath(tree_dir)), "tokenizer.json")


def route_stage(spark: SparkSession, cfg: JobConfig, run_dir: str, tree: Tree) -> dict:
    """Route every document down a frozen tree (no fitting); writes work/level_<depth> and tree/."""
    bc = spark.sparkContext.broadcast(tree)

    def step(batches):
        descender = Descender(bc.value)
        for pdf in batches:
            x = np.stack(pdf["embedding"].to_numpy()).astype(np.float32)
            node = np.zeros(len(pdf), dtype=np.int64)
            pdf["path"] = list(descender.descend(x, node, 0, tree.depth))
            pdf["node"] = node
            yield pdf

    df = (spark.read.parquet(os.path.join(run_dir, "embeddings"))
          .select("doc_id", "embedding", F.array().cast("array<int>").alias("path"), F.lit(0).cast("long").alias("node")))
    out = os.path.join(run_dir, "work", f"level_{tree.depth}")
    df.mapInPandas(step, df.schema).write.mode("overwrite").parquet(out)
    counts = sum_up(node_counts(spark.read.parquet(out), tree.k ** tree.depth), tree.k, tree.depth)
    tree.save(os.path.join(run_dir, "tree"))
    return {"tree_version": tree.version, "tree_from": cfg.tree,
            "levels": [level_summary(l + 1, c, 0, cfg) for l, c in enumerate(counts)]}


def fit_stage(spark: SparkSession, cfg: JobConfig, run_dir: str, stages) -> dict:
    """Fit all levels (each its own resumable stage) and write tree/."""
    work = os.path.join(run_dir, "work")
    df = (spark.read.parquet(os.path.join(run_dir, "embeddings"))
          .select("doc_id", "embedding", F.array().cast("array<int>").alias("path"), F.lit(0).cast("long").alias("node")))
    dim = len(df.first()["embedding"])
    centroids, biases, level_stats = [], [], []
    parent_counts = {0: df.count()}
    for level in range(1, cfg.depth + 1):
        out = os.path.join(work, f"level_{level}")

        def run_level():
            c, b, sample = fit_level(df, level, parent_counts, cfg)
            partial = Tree(k=cfg.k, depth=level, dim=dim, centroids=centroids + [c], biases=biases + [b])
            descend(df, spark, partial).write.mode("overwrite").parquet(out)
            np.savez(os.path.join(work, f"level_{level}.npz"), centroids=c, biases=b)
            return level_summary(level, node_counts(spark.read.parquet(out), cfg.k ** level), sample, cfg)

        stats = stages.run(spark, f"fit_level_{level}", run_level, total_items=sum(parent_counts.values()))
        z = np.load(os.path.join(work, f"level_{level}.npz"))
        centroids.append(z["centroids"])
        biases.append(z["biases"])
        level_stats.append(stats)
        df = spark.read.parquet(out)
        parent_counts = {i: n for i, n in enumerate(stats["node_documents"]) if n > 0}
    tree = Tree(k=cfg.k, depth=cfg.depth, dim=dim, centroids=centroids, biases=biases,
                counts=[np.asarray(s["node_documents"]) for s in level_stats],
                config={"seed": cfg.seed, "sample_per_node": cfg.sample_per_node, "balance_factor": cfg.balance_factor,
                        "em_batch_size": cfg.em_batch_size, "em_steps": cfg.em_steps, "max_windows": cfg.max_windows,
                        "encoder": "all-MiniLM-L6-v2", "encoder_precision": cfg.encoder_precision})
    tree.save(os.path.join(run_dir, "tree"))
    return {"tree_version": tree.version, "levels": level_stats}
