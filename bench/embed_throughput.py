"""Embedding throughput and routing agreement of the encoder settings, on the whole BBC corpus.

Every setting runs the job's embed stage (Spark local[*], Arrow UDF, one encoder
per Python worker loaded inside the timing, Parquet write) on the same
documents and cores; docs/s are compared with the fp32 stage of the same
invocation. Each setting's embeddings are routed with the tree the job fits on
the fp32 embeddings (k=8, p=3): the share of documents in the same level-1 node
and leaf as fp32's. The chosen setting is the fastest that keeps >= 99% of
documents in the same level-1 node and >= 95% in the same leaf; the job then
fits its own tree on that setting's embeddings, and both trees' level-1 purity
and NMI against the 5 BBC topics are printed (bench/cluster_quality.py).

Length bucketing (index/encoder.py) is measured separately, in one process,
because BBC articles almost all fill the 256-word-piece window: the same
articles cut to mixed lengths, bucketed vs in their original order.

    python -m bench.embed_throughput            # all 2,225 BBC articles
Last line: `speedup <chosen / fp32 docs/s> leaf_agreement <share of documents in fp32's leaf>`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import pandas as pd
from sklearn.metrics import normalized_mutual_info_score as nmi

from bench.cluster_quality import purity
from corpora.bbc import bbc_records
from index.encoder import cpu_has_bf16, embed_texts, load_encoder
from index.route import route
from index.tree import Tree
from pipeline.config import JobConfig
from pipeline.embed import embed_stage
from pipeline.fit import fit_stage
from pipeline.spark import spark_session
from pipeline.stages import Stages

# (name, encoder_precision, encoder_threads per Python worker, concurrent tasks)
SETTINGS = [
    ("fp32", "fp32", 1, 2),
    ("bf16", "bf16", 1, 2),
    ("bf16, 1 task x 2 threads", "bf16", 2, 1),
    ("int8", "int8", 1, 2),
]


def job_embeddings(spark, run_dir: str, doc_ids: list[str]) -> np.ndarray:
    table = spark.read.parquet(os.path.join(run_dir, "embeddings")).toPandas().set_index("doc_id").loc[doc_ids]
    return np.stack(table.embedding.to_numpy()).astype(np.float32)


def bucketing(texts: list[str], precision: str, batch_size: int, seed: int) -> tuple[float, float, float]:
    """docs/s bucketed and unbucketed on texts cut to mixed lengths, and the largest difference between the two."""
    import torch

    torch.set_num_threads(os.cpu_count())
    rng = np.random.default_rng(seed)
    cut = [" ".join(t.split()[: int(n)]) for t, n in zip(texts, rng.integers(5, 300, len(texts)))]
    enc = load_encoder(precision=precision)
    embed_texts(enc, cut[:8])  # warm-up, not timed
    rates, out = [], []
    for bucket in (True, False):
        t0 = time.time()
        out.append(embed_texts(enc, cut, batch_size=batch_size, bucket=bucket))
        rates.append(len(cut) / (time.time() - t0))
    return rates[0], rates[1], float(np.abs(out[0] - out[1]).max())


def embed_settings(spark, base: str, recs: list[dict], batch_size: int, seed: int) -> list[dict]:
    """Run the job's embed stage once per setting on the same documents; docs/s and embeddings per setting."""
    ids = [r["id"] for r in recs]
    docs_dir = os.path.join(base, "documents")
    spark.createDataFrame(
        pd.DataFrame({"doc_id": ids, "source": "bbc", "row": range(len(recs)), "text": [r["text"] for r in recs]})
    ).write.parquet(docs_dir)
    rows = []
    for name, precision, threads, tasks in SETTINGS:
        run_dir = os.path.join(base, name.replace(" ", "_").replace(",", ""))
        os.makedirs(run_dir)
        os.symlink(docs_dir, os.path.join(run_dir, "documents"))
        cfg = JobConfig(encoder_batch_size=batch_size, encoder_precision=precision, encoder_threads=threads, seed=seed)
        spark.conf.set("spark.sql.shuffle.partitions", str(tasks))  # the embed stage runs this many tasks
        t0 = time.time()
        try:
            stats = embed_stage(spark, cfg, run_dir)
        except Exception as e:  # a failed setting is reported, the others still measured
            print(f"  {name}: FAILED ({str(e).splitlines()[0][:200]})", flush=True)
            continue
        rate = len(recs) / (time.time() - t0)
        rows.append(dict(name=name, cfg=cfg, run_dir=run_dir, rate=rate, x=job_embeddings(spark, run_dir, ids)))
        print(f"  {name}: {rate:.1f} docs/s ({stats['embeddings_reused']} identical texts reused)", flush=True)
    return rows


def fit(spark, row: dict) -> tuple[Tree, np.ndarray]:
    """The job's tree on this setting's embeddings, and their paths down it."""
    fit_stage(spark, row["cfg"], row["run_dir"], Stages(row["run_dir"], row["cfg"].fingerprint()))
    tree = Tree.load(os.path.join(row["run_dir"], "tree"))
    return tree, route(tree, row["x"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--n", type=int, default=2225
    )  # the whole BBC corpus; fixed costs (model load, Spark job) are amortised as in a real run
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--bucketing-docs", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    recs = [r for _, r in zip(range(args.n), bbc_records())]
    names = sorted({r["label"] for r in recs})
    y = np.array([names.index(r["label"]) for r in recs])
    print(
        f"{len(recs)} BBC documents, {os.cpu_count()} cores, native bf16: {cpu_has_bf16()}, "
        f"load average {open('/proc/loadavg').read().split()[0]}",
        flush=True,
    )

    spark = spark_session("bench-embed", **{"spark.python.worker.faulthandler.enabled": "true"})
    with tempfile.TemporaryDirectory(prefix="hmem-embed-") as base:
        rows = embed_settings(spark, base, recs, args.batch_size, args.seed)
        fp32 = rows[0]
        tree32, paths32 = fit(spark, fp32)
        print(f"\n{'setting':<28} {'docs/s':>7} {'x fp32':>7} {'same L1':>8} {'same leaf':>9} {'cos min':>8}")
        for r in rows:
            paths = route(tree32, r["x"])
            r["l1"] = float((paths[:, 0] == paths32[:, 0]).mean())
            r["leaf"] = float((paths == paths32).all(1).mean())
            r["speedup"] = r["rate"] / fp32["rate"]
            print(
                f"{r['name']:<28} {r['rate']:7.1f} {r['speedup']:7.2f} {r['l1']:8.3f} {r['leaf']:9.3f} "
                f"{(r['x'] * fp32['x']).sum(1).min():8.4f}"
            )
        ok = [r for r in rows[1:] if r["l1"] >= 0.99 and r["leaf"] >= 0.95]
        chosen = max(ok, key=lambda r: r["rate"]) if ok else fp32
        _, own = fit(spark, chosen)
        print(f"\nlevel-1 quality vs the {len(names)} topics (each setting's own tree, k=8, p=3):")
        for name, p in (("fp32", paths32), (chosen["name"], own)):
            print(f"  {name:<28} purity {purity(y, p[:, 0]):.3f}  NMI {nmi(y, p[:, 0]):.3f}")
    spark.stop()

    precision = chosen["cfg"].encoder_precision
    on, off, diff = bucketing([r["text"] for r in recs[: args.bucketing_docs]], precision, args.batch_size, args.seed)
    print(
        f"\nlength bucketing ({precision}, one process, {args.bucketing_docs} articles cut to 5-300 words): "
        f"{on:.1f} docs/s bucketed vs {off:.1f} in input order (x{on / off:.2f}); largest difference {diff:.1e}"
    )
    print(f"load average {open('/proc/loadavg').read().split()[0]}; chosen: {chosen['name']}")
    print(f"speedup {chosen['speedup']:.2f} leaf_agreement {chosen['leaf']:.3f}")


if __name__ == "__main__":
    main()
