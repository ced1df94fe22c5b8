"""Read and validate inputs: stable document ids, and a quarantine with a reason for every rejected row.

Counts in equal counts out: every input row ends up in ``documents/`` or in
``quarantine/`` (columns source, row, doc_id, reason, preview), never dropped.
Reasons: invalid_json, invalid_utf8, missing_text, empty_text, too_large,
missing_id, duplicate_id (the later (source, row) occurrence of an id).

Row numbers are computed without a shuffle or a pass through Python: Spark's
``_metadata`` gives each row its file and split, ``monotonically_increasing_id``
its position inside the task, and a small per-split count table turns that into
the row number inside the file.

Ids: ``--id-column NAME`` uses that field; the default ``auto`` uses an ``id``
field when the input has one (the log says so) and derives ids otherwise;
``--id-column ''`` always derives. A derived id is ``sha1("<relative path>:<row>")[:16]``
with the file's path relative to the ``--input`` it was found under (the input
itself for a directory, the part before the first wildcard for a glob, the parent
for a file), so ids survive moving the bucket and ``2023/part-0.jsonl`` and
``2024/part-0.jsonl`` do not collide.

The duplicate-id check shuffles (doc_id, file index, row) only, never the text:
the later occurrences it finds are joined back by broadcast while they are few
(``BROADCAST_DUPLICATES``), by a shuffle join otherwise.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipeline.config import JobConfig
from pipeline.spark import LOG_LEVEL, add_checksums, checksum_aggs, checksum_of

TEXT_EXT = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")
PARQUET_EXT = (".parquet",)
AUTO_ID = "id"  # the field --id-column auto uses when present
BROADCAST_DUPLICATES = 1_000_000  # duplicate rows (12 bytes each) joined back by broadcast; more: a shuffle join


class InputError(SystemExit):
    """A problem the user must fix in the input; exits non-zero with the message."""


@dataclass(frozen=True)
class InputFile:
    path: str  # as Hadoop lists it (what spark.read takes)
    uri: str  # as Spark's _metadata.file_path names it (URL-escaped)
    rel: str  # path relative to the --input it was found under: derived ids hash this
    kind: str  # "jsonl" | "parquet"
    size: int
    entry: int = 0  # which --input listed it (its --passes)


def input_root(fs, path, status, hadoop_path) -> str:
    """The directory relative paths start from: the input itself (a directory), the part of a glob before
    its first wildcard, or a file's parent. ``hadoop_path``: the JVM's org.apache.hadoop.fs.Path."""
    pattern = path.toString()
    cut = min((i for i in map(pattern.find, "*?[{") if i >= 0), default=-1)
    if cut >= 0:
        return fs.makeQualified(hadoop_path(pattern[:cut].rsplit("/", 1)[0] or "/")).toString()
    return status.getPath().toString() if status.isDirectory() else status.getPath().getParent().toString()


def list_inputs(spark: SparkSession, patterns: list[str], passes: list[int] | None = None) -> list[InputFile]:
    """Expand files, directories and globs through Hadoop's FileSystem (so any URL Spark reads works). ``passes``
    (one per pattern, the job's data mix) only to refuse a file that two patterns list with different passes."""
    jvm = spark.sparkContext._jvm
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    found: list[InputFile] = []

    def visit(status, root: str):
        p = status.getPath().toString()
        if status.isDirectory():
            for child in status.getPath().getFileSystem(conf).listStatus(status.getPath()):
                visit(child, root)
            return
        name = os.path.basename(p)
        if name.startswith(("_", ".")):
            return
        kind = "jsonl" if name.endswith(TEXT_EXT) else "parquet" if name.endswith(PARQUET_EXT) else None
        if kind is None:
            raise InputError(f"{p}: unknown input type; expected one of {TEXT_EXT + PARQUET_EXT}")
        # as _metadata.file_path names it (re-parsed: a listed local path has an empty authority, file:///)
        uri = jvm.org.apache.spark.paths.SparkPath.fromPath(jvm.org.apache.hadoop.fs.Path(p)).urlEncoded()
        found.append(InputFile(p, uri, p[len(root) :].lstrip("/"), kind, status.getLen(), entry))

    for entry, pattern in enumerate(patterns):
        path = jvm.org.apache.hadoop.fs.Path(pattern)
        fs = path.getFileSystem(conf)
        statuses = fs.globStatus(path)
        if not statuses:
            raise InputError(f"--input {pattern}: no such file or directory")
        for s in statuses:
            visit(s, input_root(fs, path, s, jvm.org.apache.hadoop.fs.Path))
    files: dict[str, InputFile] = {}  # a file two inputs list is read once, as the first lists it
    for f in sorted(set(found), key=lambda f: (f.path, f.entry)):
        first = files.setdefault(f.path, f)
        if passes and passes[first.entry] != passes[f.entry]:
            raise InputError(
                f"{f.path} is listed by --input {patterns[first.entry]} (passes {passes[first.entry]}) and by "
                f"--input {patterns[f.entry]} (passes {passes[f.entry]}): list it under one of them"
            )
    return list(files.values())


def with_row_numbers(df: DataFrame, files: DataFrame) -> DataFrame:
    """Add ``source`` (file URI), ``row`` (0-based line/row inside that file) and the columns of ``files``
    (keyed by ``source``: the file's index and relative path)."""
    df = df.select(
        "*",
        F.col("_metadata.file_path").alias("source"),
        F.col("_metadata.file_block_start").alias("_split"),
        F.monotonically_increasing_id().alias("_mid"),
    )
    splits = df.groupBy("source", "_split").agg(F.count("*").alias("_n"), F.min("_mid").alias("_first"))
    before = Window.partitionBy("source").orderBy("_split").rowsBetween(Window.unboundedPreceding, -1)
    splits = splits.withColumn("_offset", F.coalesce(F.sum("_n").over(before), F.lit(0))).join(files, "source", "left")
    df = df.join(F.broadcast(splits.drop("_n")), ["source", "_split"])
    return df.withColumn("row", F.col("_mid") - F.col("_first") + F.col("_offset")).drop(
        "_split", "_mid", "_first", "_offset"
    )


def parquet_columns(spark: SparkSession, path: str) -> list[str]:
    """A Parquet input's columns, read from its footer. A file Spark cannot read is a one-line error naming
    it, not a Java stack trace: Spark's own logging is off while the footer is read (the failed footer task
    would log one), and the message is the Java root cause."""
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import PySparkException

    spark.sparkContext.setLogLevel("OFF")
    try:
        return spark.read.parquet(path).columns
    except (PySparkException, Py4JJavaError) as e:
        cause = getattr(e, "java_exception", None)
        while cause is not None and cause.getCause() is not None:
            cause = cause.getCause()
        reason = (cause.toString() if cause is not None else str(e)).strip().splitlines()[0][:300]
        raise InputError(f"{path}: not a readable Parquet file ({reason}); replace or remove it") from None
    finally:
        spark.sparkContext.setLogLevel(LOG_LEVEL)


def read_jsonl_rows(
    spark: SparkSession, paths: list[str], table: DataFrame, cfg: JobConfig, id_field: str
) -> DataFrame:
    """The JSONL inputs' rows in read_raw's columns: each line parsed permissively, so a line that is not
    UTF-8 or not JSON becomes a row with a reason instead of failing the job."""
    schema = f"`{cfg.text_column}` string" + (f", `{id_field}` string" if id_field else "") + ", _corrupt string"
    df = with_row_numbers(spark.read.text(paths), table)
    df = df.withColumn(
        "j", F.from_json("value", schema, {"columnNameOfCorruptRecord": "_corrupt", "mode": "PERMISSIVE"})
    )
    return df.select(
        "source",
        "_file",
        "rel",
        "row",
        F.col("j")[cfg.text_column].alias("text"),
        (F.col("j")[id_field] if id_field else F.lit(None).cast("string")).alias("given_id"),
        F.when(~F.is_valid_utf8("value"), "invalid_utf8")
        .when(F.col("j").isNull() | F.col("j._corrupt").isNotNull(), "invalid_json")
        .alias("reason"),
        F.col("j").isNull().alias("_unparsed"),
    )


def parquet_id_files(spark: SparkSession, parquet: list[InputFile], cfg: JobConfig, id_field: str) -> list[str]:
    """The paths of the Parquet inputs that have the id column. Every file's columns are checked on the driver
    (one footer read per file): a missing text column or --id-column, or ``auto`` ids in only some of the
    files, is an InputError that says what to fix."""
    with_id = []
    for f in parquet:
        cols = parquet_columns(spark, f.path)
        if cfg.text_column not in cols:
            raise InputError(f"{f.path}: no column {cfg.text_column!r} (columns: {cols}); set --text-column")
        if id_field in cols:
            with_id.append(f.path)
        elif cfg.id_column != "auto" and cfg.id_column:
            raise InputError(f"{f.path}: no column {cfg.id_column!r} (columns: {cols}); set --id-column")
    if 0 < len(with_id) < len(parquet):
        raise InputError(
            f"{len(with_id)} of {len(parquet)} parquet files have an {AUTO_ID!r} column (e.g. {with_id[0]}), "
            "the others not; give all of them one, or pass --id-column '' to derive every id from file paths"
        )
    return with_id


def read_parquet_rows(
    spark: SparkSession, parquet: list[InputFile], table: DataFrame, cfg: JobConfig, id_field: str, with_id: bool
) -> DataFrame:
    """The Parquet inputs' rows in read_raw's columns (``with_id``: they have the id column)."""
    df = with_row_numbers(spark.read.parquet(*[f.path for f in parquet]), table)
    text = F.col(cfg.text_column).cast("string")
    return df.select(
        "source",
        "_file",
        "rel",
        "row",
        text.alias("text"),
        (F.col(id_field).cast("string") if with_id else F.lit(None).cast("string")).alias("given_id"),
        F.when(text.isNotNull() & ~F.is_valid_utf8(text), "invalid_utf8")
        .otherwise(F.lit(None).cast("string"))
        .alias("reason"),
        F.lit(False).alias("_unparsed"),
    )


def read_raw(spark: SparkSession, files: list[InputFile], cfg: JobConfig) -> DataFrame:
    """All input rows as (source, _file, rel, row, text, given_id, reason-so-far). ``given_id`` reads the
    --id-column, or with ``auto`` the ``id`` field where a row has one."""
    table = spark.createDataFrame(
        [(f.uri, i, f.rel) for i, f in enumerate(files)], "source string, _file int, rel string"
    )
    id_field = AUTO_ID if cfg.id_column == "auto" else cfg.id_column
    parts = []
    jsonl = [f.path for f in files if f.kind == "jsonl"]
    if jsonl:
        parts.append(read_jsonl_rows(spark, jsonl, table, cfg, id_field))
    parquet = [f for f in files if f.kind == "parquet"]
    with_id = parquet_id_files(spark, parquet, cfg, id_field)
    if parquet:
        parts.append(read_parquet_rows(spark, parquet, table, cfg, id_field, bool(with_id)))
    out = parts[0]
    for p in parts[1:]:
        out = out.unionByName(p)
    return out


def file_stats(raw: DataFrame, cfg: JobConfig) -> list[dict]:
    """Per-file rows, ids and the checksum of its (source, row) keys; a file whose parsed rows all lack the
    text column is a user error, not data."""
    stats = (
        raw.groupBy("source")
        .agg(
            F.count("*").alias("rows"),
            F.sum(F.when(~F.col("_unparsed"), 1).otherwise(0)).alias("parsed"),
            F.sum(F.when(F.col("text").isNotNull(), 1).otherwise(0)).alias("with_text"),
            F.count("given_id").alias("with_id"),
            F.max("rel").alias("rel"),
            *checksum_aggs("source", "row"),
        )
        .collect()
    )
    for s in stats:
        if s["rel"] is None:
            raise RuntimeError(f"read: Spark read {s['source']}, which is not among the listed input files")
        if s["parsed"] > 0 and s["with_text"] == 0:
            raise InputError(
                f"{s['source']}: none of its {s['rows']} rows has the text column {cfg.text_column!r}; "
                "set --text-column to the field that holds the document text"
            )
    return [dict(s.asDict(), checksum=checksum_of(s)) for s in stats]


def resolve_ids(cfg: JobConfig, files: list[InputFile], per_file: list[dict]) -> bool:
    """Whether ids come from the input (True) or are derived from (relative path, row); says which."""
    n_rows, n_ids = sum(s["rows"] for s in per_file), sum(s["with_id"] for s in per_file)
    given = bool(cfg.id_column) and (cfg.id_column != "auto" or n_ids > 0)
    if cfg.id_column == "auto" and given:
        print(
            f"[read] ids: the input's {AUTO_ID!r} field ({n_ids:,} of {n_rows:,} rows have one; rows without are "
            "quarantined as missing_id); --id-column '' derives ids from file paths instead",
            file=sys.stderr,
            flush=True,
        )
    if not given:
        print("[read] ids: derived, sha1(path relative to its --input : row)", file=sys.stderr, flush=True)
        seen: dict[str, str] = {}
        for f in files:
            if f.rel in seen:
                raise InputError(
                    f"{seen[f.rel]} and {f.path} have the same path {f.rel!r} relative to their --input, "
                    "so their derived ids would collide; give inputs that differ below their roots, "
                    "or ids (--id-column)"
                )
            seen[f.rel] = f.path
    return given


def validate(raw: DataFrame, cfg: JobConfig, given_ids: bool) -> DataFrame:
    """Assign ids and the first failing reason; duplicates keep their first (file, row) occurrence."""
    derived = F.substring(F.sha1(F.concat_ws(":", "rel", F.col("row").cast("string"))), 1, 16)
    doc_id = F.col("given_id") if given_ids else derived
    reason = (
        F.when(F.col("reason").isNotNull(), F.col("reason"))
        .when(F.col("text").isNull(), "missing_text")
        .when(F.col("text").rlike(r"(?U)^\s*$"), "empty_text")
        .when(F.length("text") > cfg.max_doc_chars, "too_large")
        .when(doc_id.isNull() | (F.trim(doc_id) == ""), "missing_id")
    )
    df = raw.withColumn("doc_id", doc_id).withColumn("reason", reason)
    # only valid rows compete for an id (a quarantined row never shadows a good one); the shuffle carries
    # (doc_id, _file, row), not the text
    first = Window.partitionBy("doc_id").orderBy("_file", "row")
    later = (
        df.filter(F.col("reason").isNull())
        .select("doc_id", "_file", "row")
        .withColumn("_n", F.row_number().over(first))
        .filter(F.col("_n") > 1)
        .select("_file", "row", F.lit(True).alias("_dup"))
        .persist()
    )
    if later.count() <= BROADCAST_DUPLICATES:
        later = F.broadcast(later)
    df = df.join(later, ["_file", "row"], "left")
    return df.withColumn(
        "reason", F.when(F.col("reason").isNull() & F.col("_dup"), "duplicate_id").otherwise(F.col("reason"))
    )


def read_stage(spark: SparkSession, cfg: JobConfig, run_dir: str, files: list[InputFile]) -> dict:
    raw = read_raw(spark, files, cfg)
    per_file = file_stats(raw, cfg)
    rows = {s["source"]: s["rows"] for s in per_file}
    given_ids = resolve_ids(cfg, files, per_file)
    df = validate(raw, cfg, given_ids).persist()
    docs = df.filter(F.col("reason").isNull()).select("doc_id", "source", "row", "text")
    docs.write.mode("overwrite").parquet(os.path.join(run_dir, "documents"))
    quarantine = df.filter(F.col("reason").isNotNull()).select(
        "source", "row", "doc_id", "reason", F.substring(F.coalesce("text", F.lit("")), 1, 200).alias("preview")
    )
    quarantine.write.mode("overwrite").parquet(os.path.join(run_dir, "quarantine"))
    reasons = {r["reason"]: r["count"] for r in quarantine.groupBy("reason").count().collect()}
    df.unpersist()
    n_docs = spark.read.parquet(os.path.join(run_dir, "documents")).count()
    inputs = [
        {"path": f.path, "relative": f.rel, "format": f.kind, "bytes": f.size, "rows": rows.get(f.uri, 0)}
        for f in files
    ]
    empty = [f["path"] for f in inputs if f["rows"] == 0]
    unread = [f["path"] for f in inputs if f["rows"] == 0 and f["format"] == "jsonl" and f["bytes"] > 0]
    if unread:
        raise RuntimeError(f"read: Spark read no rows from {unread[0]} ({len(unread)} such non-empty files)")
    n_in = sum(f["rows"] for f in inputs)
    if n_docs + sum(reasons.values()) != n_in:
        raise RuntimeError(f"read: {n_in} rows in but {n_docs} documents + {sum(reasons.values())} quarantined out")
    return {
        "inputs": inputs,
        "empty_files": empty,
        "documents_in": n_in,
        "documents_valid": n_docs,
        "documents_quarantined": sum(reasons.values()),
        "quarantine_reasons": reasons,
        "ids": cfg.id_column if cfg.id_column != "auto" else AUTO_ID if given_ids else "",
        "input_rows_checksum": add_checksums(*[s["checksum"] for s in per_file]),
    }
