"""Spark plumbing shared by the stages: the session, and small driver-side tables joined in by broadcast."""
from __future__ import annotations

import os
import sys

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F


def spark_session(app: str = "hmem-cluster-corpus", **conf: str) -> SparkSession:
    """Uses the master spark-submit was given (local[*] when none); ``conf`` adds Spark settings."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app)
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = (builder
             .config("spark.log.level", "WARN")
             .config("spark.sql.execution.arrow.pyspark.enabled", "true")
             .config("spark.sql.execution.arrow.maxRecordsPerBatch", "1024")
             .config("spark.sql.shuffle.partitions", "16")
             .config("spark.ui.showConsoleProgress", "false")
             .getOrCreate())
    spark.sparkContext.setLogLevel("WARN")
    return spark


def with_lookup(df: DataFrame, key: str, mapping: dict, name: str, value_type: str) -> DataFrame:
    """Add column ``name`` = mapping[df.key] through a broadcast join (the mapping has one row per tree node)."""
    spark = df.sparkSession
    table = spark.createDataFrame([(int(k), v) for k, v in mapping.items()], f"{key} long, {name} {value_type}")
    return df.join(F.broadcast(table), key, "left")
