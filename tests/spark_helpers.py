"""Shared helpers for tests that run the real Spark job through spark-submit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)

SMALL = [
    "--k",
    "3",
    "--depth",
    "2",
    "--seq-len",
    "64",
    "--vocab-size",
    "400",
    "--encoder-batch-size",
    "16",
    "--seed",
    "7",
]


def spark_env() -> dict:
    env = dict(os.environ)
    env.update(
        PYSPARK_PYTHON=sys.executable,
        PYSPARK_DRIVER_PYTHON=sys.executable,
        SPARK_LOCAL_IP="127.0.0.1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def submit(
    args: list[str], master: str = "local[2]", timeout: int = 600, cwd: str = ROOT, conf: dict | None = None
) -> subprocess.CompletedProcess:
    confs = [a for k, v in {"spark.driver.memory": "2g", **(conf or {})}.items() for a in ("--conf", f"{k}={v}")]
    cmd = [
        os.path.join(BIN, "spark-submit"),
        "--master",
        master,
        *confs,
        os.path.join(ROOT, "jobs", "cluster_corpus.py"),
        *args,
    ]
    # spark-submit merges the Python driver's stderr into its stdout; keep both in one stream
    return subprocess.run(
        cmd, env=spark_env(), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )


def bbc(n: int, start: int) -> list[dict]:
    """``n`` consecutive BBC records from index ``start``."""
    from corpora.bbc import bbc_records

    return [r for i, r in enumerate(bbc_records()) if i >= start][:n]


def write_bbc_subset(path: str, n: int, start: int = 0) -> list[dict]:
    from corpora.bbc import bbc_records, write_jsonl

    recs = [r for i, r in enumerate(bbc_records()) if start <= i < start + n * 20 and (i - start) % 20 == 0][:n]
    write_jsonl(path, recs)
    return recs


def read_table(path: str):
    return pq.read_table(path).to_pandas()


def manifest(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "manifest.json")) as f:
        return json.load(f)
