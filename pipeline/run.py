"""The job: read -> embed -> fit (level by level) or route (--tree) -> tokenize and pack -> verify -> manifest.
Each stage resumes."""

from __future__ import annotations

import json
import os
import sys
import time

from pyspark.sql import SparkSession

from index.encoder import resolve_precision
from index.rundir import read_manifest, write_manifest
from pipeline import manifest
from pipeline.config import JobConfig
from corpora.bbc import write_bbc
from pipeline.counter import ItemCounter
from pipeline.embed import embed_stage
from pipeline.fit import fit_stage, load_frozen_tree, route_stage
from pipeline.pack import pack_stage
from pipeline.read import list_inputs, read_stage
from pipeline.spark import size_partitions, spark_session
from pipeline.stages import Stages, fmt_duration

DEMO_INPUT = "data/bbcnews.jsonl"


def resolve_demo(cfg: JobConfig) -> JobConfig:
    """No --input: the BBC demo corpus with its own ids."""
    if not cfg.input:
        cfg.input = [os.path.abspath(write_bbc(DEMO_INPUT))]
        cfg.id_column = cfg.id_column or "id"
    return cfg


def resolve_tree(cfg: JobConfig):
    """--tree RUN_A: the tree, and from it k, depth, windowing and balance; RUN_A's tokenizer unless --tokenizer."""
    if not cfg.tree:
        return None
    tree, tokenizer = load_frozen_tree(cfg)
    cfg.k, cfg.depth = tree.k, tree.depth
    cfg.max_windows = int(tree.config.get("max_windows", cfg.max_windows))  # embed as the tree's run did
    cfg.balance_factor = float(tree.config.get("balance_factor", cfg.balance_factor))
    if not cfg.tokenizer:
        if not os.path.exists(tokenizer):
            raise SystemExit(f"--tree {cfg.tree}: no {tokenizer} next to the tree; give --tokenizer")
        cfg.tokenizer = tokenizer
    print(
        f"frozen tree {tree.version} from {cfg.tree}: k={tree.k} depth={tree.depth} max_windows={cfg.max_windows}, "
        f"tokenizer {cfg.tokenizer}; nothing is fitted",
        file=sys.stderr,
        flush=True,
    )
    return tree


def run(cfg: JobConfig, spark: SparkSession | None = None) -> dict:
    cfg = resolve_demo(cfg)
    tree = resolve_tree(cfg)
    if cfg.embeddings_from and read_manifest(cfg.embeddings_from)["tree_version"] != tree.version:
        raise SystemExit(f"embeddings_from={cfg.embeddings_from}: not a run of the tree {tree.version} (--tree)")
    # recorded resolved, the router reads it; a frozen tree fixes it too: its documents were embedded so
    cfg.encoder_precision = (
        tree.config.get("encoder_precision", "fp32") if tree is not None else resolve_precision(cfg.encoder_precision)
    )
    spark = spark or spark_session()
    run_dir = cfg.output
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(cfg.__dict__, f, indent=2)
    t0 = time.time()
    stages = Stages(run_dir, cfg.fingerprint())
    files = list_inputs(spark, cfg.input, cfg.passes)
    passes_of = {f.uri: cfg.passes[f.entry] for f in files} if cfg.passes else {}
    parallelism = size_partitions(spark, sum(f.size for f in files))
    print(
        f"shuffle partitions: {parallelism['shuffle_partitions']} ({parallelism['from']}); adaptive execution "
        f"{spark.conf.get('spark.sql.adaptive.enabled')}",
        file=sys.stderr,
        flush=True,
    )
    read = stages.run(spark, "read", lambda: dict(read_stage(spark, cfg, run_dir, files), **parallelism))
    n = read["documents_valid"]
    with ItemCounter(spark.sparkContext.getConf().get("spark.driver.host", "127.0.0.1")) as counter:
        embed = stages.run(
            spark,
            "embed",
            lambda: embed_stage(spark, cfg, run_dir, counter.address),
            total_items=n,
            done_items=lambda: counter.done,
        )
    if tree is None:
        fit = fit_stage(spark, cfg, run_dir, stages)
        routing = fit.pop("stages")
    else:
        fit = stages.run(spark, "route", lambda: route_stage(spark, cfg, run_dir, tree), total_items=n)
        routing = ["route"]
    pack = stages.run(spark, "pack", lambda: pack_stage(spark, cfg, run_dir, passes_of), total_items=n)
    names = ["read", "embed", *routing, "pack"]
    seconds = {name: round(stages.seconds(name), 2) for name in names}
    checksums = manifest.verify(spark, run_dir, read["input_rows_checksum"])
    m = manifest.build(cfg, read, fit, pack, seconds, checksums)
    m["embeddings_reused"] = embed.get("embeddings_reused", 0)  # identical texts embedded once (pipeline/embed.py)
    m["embeddings_from_run"] = embed.get("embeddings_from_run", 0)  # of them, stored vectors of embeddings_from
    write_manifest(run_dir, m)
    print(summary(m) + f"\ntotal {fmt_duration(time.time() - t0)} (this invocation)", file=sys.stderr, flush=True)
    return m


def summary(m: dict) -> str:
    lines = [
        f"documents: {m['documents_in']} in = {m['documents_routed']} routed + {m['documents_quarantined']} "
        "quarantined "
        f"{m['quarantine_reasons'] or ''}; {m['documents_distinct']} distinct (copies are one document to the index)"
        + (f"; {m['documents_packed']} packed with --passes {m['config']['passes']}" if m["config"]["passes"] else ""),
        f"tree {m['tree_version']}: k={m['k']} depth={m['depth']}; {m['sequences']} sequences of {m['seq_len']}+1 "
        "tokens, "
        f"{m['tokens']:,} document tokens",
    ]
    for lv in m["levels"]:
        lines.append(
            f"  level {lv['level']}: {lv['nodes']} nodes, {sum(1 for d in lv['node_documents'] if d)} non-empty, "
            f"largest child {lv['max_child_fraction']:.3f} of its parent (cap {lv['cap']:.3f})"
        )
    lines.append("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in m["stages"].items()))
    return "\n".join(lines)
