"""Embed documents on executors: an Arrow (pandas) UDF, the encoder loaded once per Python worker.

Windowing, precision and length bucketing are index/encoder.py's, shared with
the router so a text embeds the same way in the job and at query time.

Identical texts are embedded once: documents are hash-partitioned and sorted by
a hash of their text, so all copies of a text sit next to each other in one
task. Each UDF call embeds the distinct texts of its Arrow batch once, and
remembers the last text and vector of the batch before it (the same task) for a
run of copies that crosses the batch boundary. Memory: one Arrow batch
(spark.sql.execution.arrow.maxRecordsPerBatch rows) plus one vector. The
``reused`` column marks the rows whose vector was copied, not computed.

``embeddings_from`` (with a frozen tree): documents that run holds with the same id and text (xxhash64) take
its stored vector (its routed/ column) and skip the encoder, so their routes are the run's exactly.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql.functions import pandas_udf

from pipeline.config import JobConfig
from pipeline.counter import report
from pipeline.spark import shuffle_partitions

_last: dict = {}  # per worker process: the previous batch's last (task attempt, text, vector)


def encoder_device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def make_embed_udf(cfg: JobConfig, precision: str, threads: int, counter: tuple[str, int] | None = None):
    batch, windows, device = cfg.encoder_batch_size, cfg.max_windows, cfg.encoder_device

    @pandas_udf("struct<embedding:array<float>,reused:boolean>")
    def embed(texts: pd.Series) -> pd.DataFrame:
        import torch
        from pyspark import TaskContext
        from index.encoder import embed_texts, load_encoder

        if threads:
            torch.set_num_threads(threads)
        encoder = load_encoder(encoder_device(device), precision)  # cached: loaded once per worker process
        task = TaskContext.get().taskAttemptId() if TaskContext.get() else None
        texts = texts.tolist()
        first: dict[str, int] = {}
        src = np.array([first.setdefault(t, i) for i, t in enumerate(texts)])
        carried = _last.get("task") == task and _last.get("text") in first
        compute = [i for i in first.values() if not (carried and texts[i] == _last["text"])]
        vecs = np.empty((len(texts), 384), dtype=np.float32)
        vecs[compute] = embed_texts(
            encoder,
            [texts[i] for i in compute],
            batch_size=batch,
            max_windows=windows,
            on_batch=lambda n: report(counter, n),
        )
        if carried:
            vecs[first[_last["text"]]] = _last["vector"]
        vecs = vecs[src]
        reused = np.ones(len(texts), dtype=bool)
        reused[compute] = False
        report(counter, len(texts) - len(compute))
        if texts:
            _last.update(task=task, text=texts[-1], vector=vecs[-1].copy())
        return pd.DataFrame({"embedding": list(vecs), "reused": reused})

    return embed


def worker_threads(spark: SparkSession, cfg: JobConfig) -> int:
    """Torch threads per Python worker: the executor's cores shared by its concurrent tasks."""
    if cfg.encoder_threads:
        return cfg.encoder_threads
    conf = spark.sparkContext.getConf()
    cores_per_task = int(conf.get("spark.task.cpus", "1"))
    return max(1, cores_per_task)


def stored_embeddings(spark: SparkSession, run: str):
    """(doc_id, h = xxhash64 of the text, embedding) of ``run``'s routed documents."""
    text = spark.read.parquet(os.path.join(run, "documents")).select("doc_id", F.xxhash64("text").alias("h"))
    return text.join(spark.read.parquet(os.path.join(run, "routed")).select("doc_id", "embedding"), "doc_id")


def embed_stage(spark: SparkSession, cfg: JobConfig, run_dir: str, counter: tuple[str, int] | None = None) -> dict:
    """``counter``: the driver's ItemCounter address (pipeline/counter.py) for live progress."""
    from index.encoder import resolve_precision

    precision = resolve_precision(cfg.encoder_precision)  # on the driver: every executor uses the same
    docs = spark.read.parquet(os.path.join(run_dir, "documents"))
    n = docs.count()
    parts = shuffle_partitions(spark)
    udf = make_embed_udf(cfg, precision, worker_threads(spark, cfg), counter)
    h = F.xxhash64("text")
    todo, kept, n_kept, joined = docs.select("doc_id", "text"), None, 0, None
    if cfg.embeddings_from:
        # persisted for the count and the write: the join is read twice, not run twice
        joined = todo.withColumn("h", h).join(stored_embeddings(spark, cfg.embeddings_from), ["doc_id", "h"], "left")
        joined = joined.persist()
        kept = joined.filter(F.col("embedding").isNotNull()).select("doc_id", "embedding", F.lit(True).alias("reused"))
        todo = joined.filter(F.col("embedding").isNull()).select("doc_id", "text")
        n_kept = kept.count()
        report(counter, n_kept)
    out = (
        todo.repartition(parts, h)
        .sortWithinPartitions(h)
        .select("doc_id", udf("text").alias("e"))
        .select("doc_id", "e.embedding", "e.reused")
    )
    if kept is not None:
        out = out.unionByName(kept)
    out.write.mode("overwrite").parquet(os.path.join(run_dir, "embeddings"))
    if joined is not None:
        joined.unpersist()
    written = (
        spark.read.parquet(os.path.join(run_dir, "embeddings"))
        .agg(F.count("*").alias("n"), F.sum(F.col("reused").cast("long")).alias("reused"))
        .first()
    )
    if written["n"] != n:
        raise RuntimeError(f"embed: {n} documents in, {written['n']} embeddings out")
    return {
        "documents": n,
        "partitions": parts,
        "encoder_precision": precision,
        "embeddings_reused": int(written["reused"] or 0),
        "embeddings_from_run": n_kept,
    }
