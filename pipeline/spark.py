"""Spark plumbing shared by the stages: the session, its parallelism, checksums, and small driver-side
tables joined in by broadcast.

Parallelism is never fixed in code. ``spark.sql.shuffle.partitions`` is what a user gave
(``spark-submit --conf``) or, when they gave nothing, ``size_partitions`` sets it from the
input size (about 128 MB per partition) and the cluster's default parallelism. Adaptive query
execution is on, so Spark coalesces shuffle partitions that turn out small.
"""

from __future__ import annotations

import os
import sys

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

LOG_LEVEL = "WARN"  # the job's Spark log level: warnings and errors, not the INFO flood
PARTITION_BYTES = 128 << 20  # input bytes per shuffle partition when the user sets no count
# defaults, each applied only when the user's --conf does not set the key
DEFAULTS = {
    "spark.sql.adaptive.enabled": "true",
    "spark.sql.adaptive.advisoryPartitionSizeInBytes": str(PARTITION_BYTES),
}


def spark_session(app: str = "hmem-cluster-corpus", **conf: str) -> SparkSession:
    """Uses the master spark-submit was given (local[*] when none); ``conf`` adds Spark settings.
    Nothing here overrides a key set by ``spark-submit --conf`` (a builder option would)."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app)
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = (
        builder.config("spark.log.level", "WARN")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "1024")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel(LOG_LEVEL)
    given = spark.sparkContext.getConf()
    for key, value in DEFAULTS.items():
        if not given.contains(key):
            spark.conf.set(key, value)
    return spark


def size_partitions(spark: SparkSession, input_bytes: int) -> dict:
    """Set spark.sql.shuffle.partitions to max(2 x default parallelism, input bytes / 128 MB) unless the
    user set it; returns what the wide stages use and where it came from (recorded in stages/read.json)."""
    if spark.sparkContext.getConf().contains("spark.sql.shuffle.partitions"):
        return {"shuffle_partitions": shuffle_partitions(spark), "from": "--conf"}
    n = max(2 * spark.sparkContext.defaultParallelism, -(-input_bytes // PARTITION_BYTES))
    spark.conf.set("spark.sql.shuffle.partitions", str(n))
    return {"shuffle_partitions": n, "from": f"max(2 x default parallelism, {input_bytes:,} input bytes / 128 MB)"}


def shuffle_partitions(spark: SparkSession) -> int:
    """Partitions of the compute-heavy repartitions (embed, tokenize): an explicit count, which AQE keeps."""
    return int(spark.conf.get("spark.sql.shuffle.partitions"))


SALTS = (1, 2)


def checksum_aggs(*cols: str) -> list:
    """Aggregate expressions of the checksum of ``cols`` (for ``agg``, grouped or not; ``checksum_of`` reads them)."""
    return [F.sum(F.xxhash64(*cols, F.lit(salt)).cast("decimal(38,0)")).alias(f"_checksum{salt}") for salt in SALTS]


def checksum_of(row) -> str:
    return "".join(f"{int(row[f'_checksum{salt}'] or 0) % (1 << 64):016x}" for salt in SALTS)


def checksum(df: DataFrame, *cols: str) -> str:
    """Order-independent 128-bit checksum of the rows' ``cols``: two sums of 64-bit hashes mod 2^64, as hex.
    Sums add up (``add_checksums``: the checksum of a union of disjoint sets), and a duplicated row plus a
    dropped one changes it, where a count would not."""
    return checksum_of(df.agg(*checksum_aggs(*cols)).first())


def add_checksums(*sums: str) -> str:
    """The checksum of the union of disjoint row sets, from theirs."""
    halves = [sum(int(s[i : i + 16], 16) for s in sums) % (1 << 64) for i in (0, 16)]
    return "".join(f"{h:016x}" for h in halves)


def with_lookup(df: DataFrame, key: str, mapping: dict, name: str, value_type: str) -> DataFrame:
    """Add column ``name`` = mapping[df.key] through a broadcast join (the mapping has one row per tree node)."""
    spark = df.sparkSession
    table = spark.createDataFrame([(int(k), v) for k, v in mapping.items()], f"{key} long, {name} {value_type}")
    return df.join(F.broadcast(table), key, "left")
