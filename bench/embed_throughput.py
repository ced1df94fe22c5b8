"""Embedding throughput: the job's embed stage (Spark local[*], Arrow UDF) vs a plain encode loop.

Same documents, same cores. The plain side is one process running
`SentenceTransformer.encode` with torch using every core; its model load is not
timed. The job side is the whole embed stage as the job runs it (Spark tasks,
one encoder per Python worker loaded inside the timing, Arrow transfer, Parquet
write), so the ratio is conservative for the job.

    python bench/embed_throughput.py            # all 2,225 BBC articles
Last line: `ratio <job docs/s / plain docs/s>`.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2225)  # the whole BBC corpus; fixed costs (model load, Spark job) are amortised as in a real run
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    import pandas as pd
    import torch
    from index.encoder import embed_texts, load_encoder
    from pipeline.config import JobConfig
    from corpora.bbc import bbc_records
    from pipeline.embed import embed_stage
    from pipeline.spark import spark_session

    recs = [r for _, r in zip(range(args.n), bbc_records())]
    texts = [r["text"] for r in recs]
    cores = os.cpu_count()

    torch.set_num_threads(cores)
    model = load_encoder()
    embed_texts(model, texts[:8], batch_size=8)  # warm-up, not timed
    t0 = time.time()
    embed_texts(model, texts, batch_size=args.batch_size)
    plain = len(texts) / (time.time() - t0)
    print(f"plain SentenceTransformer.encode, {cores} torch threads: {plain:.1f} docs/s", flush=True)

    spark = spark_session("bench-embed")
    spark.conf.set("spark.sql.shuffle.partitions", str(spark.sparkContext.defaultParallelism))
    with tempfile.TemporaryDirectory(prefix="hmem-embed-") as run_dir:
        (spark.createDataFrame(pd.DataFrame({"doc_id": [r["id"] for r in recs], "source": "bbc", "row": range(len(recs)),
                                             "text": texts}))
         .write.parquet(os.path.join(run_dir, "documents")))
        cfg = JobConfig(encoder_batch_size=args.batch_size)
        t0 = time.time()
        embed_stage(spark, cfg, run_dir)
        job = len(texts) / (time.time() - t0)
    print(f"job embed stage, local[*] ({spark.sparkContext.defaultParallelism} tasks, 1 torch thread each): "
          f"{job:.1f} docs/s", flush=True)
    spark.stop()
    print(f"ratio {job / plain:.2f}")


if __name__ == "__main__":
    main()
