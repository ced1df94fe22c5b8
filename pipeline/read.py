"""Read and validate inputs: stable document ids, and a quarantine with a reason for every rejected row.

Counts in equal counts out: every input row ends up in ``documents/`` or in
``quarantine/`` (columns source, row, doc_id, reason, preview), never dropped.
Reasons: invalid_json, invalid_utf8, missing_text, empty_text, too_large,
missing_id, duplicate_id (the later (source, row) occurrence of an id).

Row numbers are computed without a shuffle or a pass through Python: Spark's
``_metadata`` gives each row its file and split, ``monotonically_increasing_id``
its position inside the task, and a small per-split count table turns that into
the row number inside the file. Derived ids are ``sha1("<file name>:<row>")[:16]``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipeline.config import JobConfig

TEXT_EXT = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")
PARQUET_EXT = (".parquet",)


class InputError(SystemExit):
    """A problem the user must fix in the input; exits non-zero with the message."""


@dataclass(frozen=True)
class InputFile:
    path: str
    kind: str  # "jsonl" | "parquet"
    size: int


def list_inputs(spark: SparkSession, patterns: list[str]) -> list[InputFile]:
    """Expand files, directories and globs through Hadoop's FileSystem (so any URL Spark reads works)."""
    jvm = spark.sparkContext._jvm
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    found: list[InputFile] = []

    def visit(status):
        p = status.getPath().toString()
        if status.isDirectory():
            for child in status.getPath().getFileSystem(conf).listStatus(status.getPath()):
                visit(child)
            return
        name = os.path.basename(p)
        if name.startswith(("_", ".")):
            return
        kind = "jsonl" if name.endswith(TEXT_EXT) else "parquet" if name.endswith(PARQUET_EXT) else None
        if kind is None:
            raise InputError(f"{p}: unknown input type; expected one of {TEXT_EXT + PARQUET_EXT}")
        found.append(InputFile(p, kind, status.getLen()))

    for pattern in patterns:
        path = jvm.org.apache.hadoop.fs.Path(pattern)
        statuses = path.getFileSystem(conf).globStatus(path)
        if not statuses:
            raise InputError(f"--input {pattern}: no such file or directory")
        for s in statuses:
            visit(s)
    return sorted(set(found), key=lambda f: f.path)


def with_row_numbers(df: DataFrame) -> DataFrame:
    """Add ``source`` (file path) and ``row`` (0-based line/row inside that file)."""
    df = df.select("*", F.col("_metadata.file_path").alias("source"),
                   F.col("_metadata.file_block_start").alias("_split"),
                   F.monotonically_increasing_id().alias("_mid"))
    splits = df.groupBy("source", "_split").agg(F.count("*").alias("_n"), F.min("_mid").alias("_first"))
    before = Window.partitionBy("source").orderBy("_split").rowsBetween(Window.unboundedPreceding, -1)
    splits = splits.withColumn("_offset", F.coalesce(F.sum("_n").over(before), F.lit(0)))
    df = df.join(F.broadcast(splits.select("source", "_split", "_first", "_offset")), ["source", "_split"])
    return df.withColumn("row", F.col("_mid") - F.col("_first") + F.col("_offset")).drop("_split", "_mid", "_first", "_offset")


def read_raw(spark: SparkSession, files: list[InputFile], cfg: JobConfig) -> DataFrame:
    """All input rows as (source, row, text, given_id, reason-so-far)."""
    parts = []
    jsonl = [f.path for f in files if f.kind == "jsonl"]
    if jsonl:
        schema = f"`{cfg.text_column}` string" + (f", `{cfg.id_column}` string" if cfg.id_column else "") + ", _corrupt string"
        df = with_row_numbers(spark.read.text(jsonl))
        df = df.withColumn("j", F.from_json("value", schema, {"columnNameOfCorruptRecord": "_corrupt", "mode": "PERMISSIVE"}))
        parts.append(df.select(
            "source", "row",
            F.col("j")[cfg.text_column].alias("text"),
            (F.col("j")[cfg.id_column] if cfg.id_column else F.lit(None).cast("string")).alias("given_id"),
            F.when(~F.is_valid_utf8("value"), "invalid_utf8")
             .when(F.col("j").isNull() | F.col("j._corrupt").isNotNull(), "invalid_json")
             .alias("reason"),
            F.col("j").isNull().alias("_unparsed")))
    for f in files:
        if f.kind != "parquet":
            continue
        cols = spark.read.parquet(f.path).columns
        for c in filter(None, [cfg.text_column, cfg.id_column]):
            if c not in cols:
                raise InputError(f"{f.path}: no column {c!r} (columns: {cols}); set --text-column / --id-column")
    parquet = [f.path for f in files if f.kind == "parquet"]
    if parquet:
        df = with_row_numbers(spark.read.parquet(*parquet))
        text = F.col(cfg.text_column).cast("string")
        parts.append(df.select(
            "source", "row", text.alias("text"),
            (F.col(cfg.id_column).cast("string") if cfg.id_column else F.lit(None).cast("string")).alias("given_id"),
            F.when(text.isNotNull() & ~F.is_valid_utf8(text), "invalid_utf8").otherwise(F.lit(None).cast("string")).alias("reason"),
            F.lit(False).alias("_unparsed")))
    out = parts[0]
    for p in parts[1:]:
        out = out.unionByName(p)
    return out


def check_text_column(raw: DataFrame, cfg: JobConfig) -> list[dict]:
    """Per-file row counts; a file whose parsed rows all lack the text column is a user error, not data."""
    stats = (raw.groupBy("source")
             .agg(F.count("*").alias("rows"),
                  F.sum(F.when(~F.col("_unparsed"), 1).otherwise(0)).alias("parsed"),
                  F.sum(F.when(F.col("text").isNotNull(), 1).otherwise(0)).alias("with_text"))
             .collect())
    for s in stats:
        if s["parsed"] > 0 and s["with_text"] == 0:
            raise InputError(f"{s['source']}: none of its {s['rows']} rows has the text column {cfg.text_column!r}; "
                             "set --text-column to the field that holds the document text")
    return [s.asDict() for s in stats]


def validate(raw: DataFrame, cfg: JobConfig) -> DataFrame:
    """Assign ids and the first failing reason; duplicates keep their first (source, row) occurrence."""
    name = F.element_at(F.split("source", "/"), -1)
    derived = F.substring(F.sha1(F.concat_ws(":", name, F.col("row").cast("string"))), 1, 16)
    doc_id = F.col("given_id") if cfg.id_column else derived
    reason = (F.when(F.col("reason").isNotNull(), F.col("reason"))
              .when(F.col("text").isNull(), "missing_text")
              .when(F.col("text").rlike(r"(?U)^\s*$"), "empty_text")
              .when(F.length("text") > cfg.max_doc_chars, "too_large")
              .when(doc_id.isNull() | (F.trim(doc_id) == ""), "missing_id"))
    df = raw.withColumn("doc_id", doc_id).withColumn("reason", reason)
    first = Window.partitionBy("doc_id").orderBy("source", "row")
    dup = F.when(F.col("reason").isNull() & (F.row_number().over(first) > 1), "duplicate_id")
    # only valid rows compete for an id; a quarantined row never shadows a good one
    valid = df.filter(F.col("reason").isNull()).withColumn("reason", dup)
    return valid.unionByName(df.filter(F.col("reason").isNotNull()))


def read_stage(spark: SparkSession, cfg: JobConfig, run_dir: str) -> dict:
    files = list_inputs(spark, cfg.input)
    raw = read_raw(spark, files, cfg)
    per_file = check_text_column(raw, cfg)
    rows = {s["source"]: s["rows"] for s in per_file}
    df = validate(raw, cfg).persist()
    docs = df.filter(F.col("reason").isNull()).select("doc_id", "source", "row", "text")
    docs.write.mode("overwrite").parquet(os.path.join(run_dir, "documents"))
    quarantine = df.filter(F.col("reason").isNotNull()).select(
        "source", "row", "doc_id", "reason", F.substring(F.coalesce("text", F.lit("")), 1, 200).alias("preview"))
    quarantine.write.mode("overwrite").parquet(os.path.join(run_dir, "quarantine"))
    reasons = {r["reason"]: r["count"] for r in quarantine.groupBy("reason").count().collect()}
    df.unpersist()
    n_docs = spark.read.parquet(os.path.join(run_dir, "documents")).count()
    inputs = [{"path": f.path, "format": f.kind, "bytes": f.size, "rows": rows.get(f.path, 0)} for f in files]
    empty = [f["path"] for f in inputs if f["rows"] == 0]
    n_in = sum(f["rows"] for f in inputs)
    if n_docs + sum(reasons.values()) != n_in:
        raise RuntimeError(f"read: {n_in} rows in but {n_docs} documents + {sum(reasons.values())} quarantined out")
    return {"inputs": inputs, "empty_files": empty, "documents_in": n_in, "documents_valid": n_docs,
            "documents_quarantined": sum(reasons.values()), "quarantine_reasons": reasons}
