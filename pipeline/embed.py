"""Embed documents on executors: an Arrow (pandas) UDF, the encoder loaded once per Python worker.

Windowing is index/encoder.py's choice (first 256 word pieces, or the mean of the
first ``max_windows`` windows), shared with the router so a text embeds the same
way in the job and at query time.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession
from pyspark.sql.functions import pandas_udf

from pipeline.config import JobConfig
from pipeline.spark import shuffle_partitions


def encoder_device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_embed_udf(cfg: JobConfig, threads: int):
    batch, windows, device = cfg.encoder_batch_size, cfg.max_windows, cfg.encoder_device

    @pandas_udf("array<float>")
    def embed(texts: pd.Series) -> pd.Series:
        import torch
        from index.encoder import embed_texts, load_encoder
        if threads:
            torch.set_num_threads(threads)
        model = load_encoder(encoder_device(device))  # cached: loaded once per worker process
        vecs = embed_texts(model, texts.tolist(), batch_size=batch, max_windows=windows)
        return pd.Series(list(vecs.astype(np.float32)))

    return embed


def worker_threads(spark: SparkSession, cfg: JobConfig) -> int:
    """Torch threads per Python worker: the executor's cores shared by its concurrent tasks."""
    if cfg.encoder_threads:
        return cfg.encoder_threads
    conf = spark.sparkContext.getConf()
    cores_per_task = int(conf.get("spark.task.cpus", "1"))
    return max(1, cores_per_task)


def embed_stage(spark: SparkSession, cfg: JobConfig, run_dir: str) -> dict:
    docs = spark.read.parquet(os.path.join(run_dir, "documents"))
    n = docs.count()
    parts = shuffle_partitions(spark)
    udf = make_embed_udf(cfg, worker_threads(spark, cfg))
    out = (docs.select("doc_id", "text").repartition(parts, "doc_id")
           .select("doc_id", udf("text").alias("embedding")))
    out.write.mode("overwrite").parquet(os.path.join(run_dir, "embeddings"))
    written = spark.read.parquet(os.path.join(run_dir, "embeddings")).count()
    if written != n:
        raise RuntimeError(f"embed: {n} documents in, {written} embeddings out")
    return {"documents": n, "partitions": parts}
