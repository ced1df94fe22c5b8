"""Scale of the tree fit + routing stages against one process running FAISS: k=16, p=4, local[2],
N generated 384-d embeddings.

Embedding is skipped: each N gets generated unit vectors (a seeded mixture of
Gaussian topics, made on executors, never on the driver), then the job's own
fit stages run on them (pipeline/fit.py: every level's sampling, fitting and
routing). Each N runs in a fresh process so driver memory is measured alone:
peak RSS of the Python driver, of the driver JVM (which, in local mode, also
hosts the executors' JVM side) and of the largest Python worker.

Baseline, in the same process on the same vectors and cores after Spark has
stopped: a top-down FAISS loop to the same k and depth (``faiss_tree``: per
node, faiss.Kmeans with 20 iterations on at most ``sample_per_node`` of its
points, then every point of the node assigned to its nearest child), the
single-process way to build the same tree.

    python -m bench.cluster_scale                       # N = 250k and 1M
    python -m bench.cluster_scale --n 20000 80000       # a quick look
Last line: `time_ratio <t(N2)/t(N1)> rss_growth <py driver RSS(N2)/RSS(N1) - 1> job/faiss <ratio at N1> <at N2>`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def generate(spark, n: int, dim: int, out: str, seed: int, parts: int) -> None:
    import numpy as np
    import pandas as pd

    def gen(batches):
        topics = np.random.default_rng(seed).normal(size=(256, dim)).astype(np.float32)
        for pdf in batches:
            ids = pdf["id"].to_numpy()
            rng = np.random.default_rng([seed, int(ids[0])])
            t = rng.integers(0, 256, size=len(ids))
            x = topics[t] + 1.5 * rng.normal(size=(len(ids), dim)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            yield pd.DataFrame({"doc_id": [f"d{i:09d}" for i in ids], "embedding": list(x.astype(np.float32))})

    (
        spark.range(n, numPartitions=parts)
        .mapInPandas(gen, "doc_id string, embedding array<float>")
        .write.mode("overwrite")
        .parquet(os.path.join(out, "embeddings"))
    )


def peak_rss_mb(match: str) -> float:
    """Largest VmHWM among this process's descendants whose command line contains ``match``."""
    import psutil

    peak = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            if match in " ".join(child.cmdline()):
                with open(f"/proc/{child.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM"):
                            peak = max(peak, int(line.split()[1]) / 1024)
        except (psutil.Error, OSError):
            pass
    return peak


def faiss_tree(x, k: int, depth: int, sample: int, niter: int, seed: int):
    """Leaf index of every row of x after a top-down FAISS k-means to depth ``depth``, in one process."""
    import faiss
    import numpy as np

    node = np.zeros(len(x), dtype=np.int64)
    rng = np.random.default_rng(seed)
    for _ in range(depth):
        order = np.argsort(node, kind="stable")
        bounds = np.searchsorted(node[order], np.arange(node.max() + 2))
        child = np.zeros(len(x), dtype=np.int64)
        for p in range(len(bounds) - 1):
            idx = order[bounds[p] : bounds[p + 1]]
            if len(idx) <= k:  # too few points to cluster: one per child
                child[idx] = np.arange(len(idx))
                continue
            fit_on = idx if len(idx) <= sample else rng.choice(idx, sample, replace=False)
            km = faiss.Kmeans(
                x.shape[1], k, niter=niter, seed=int(rng.integers(1 << 30)), max_points_per_centroid=sample
            )
            km.train(x[fit_on])
            child[idx] = km.index.search(x[idx], 1)[1][:, 0]
        node = node * k + child
    return node


def one(n: int, k: int, depth: int, out: str) -> dict:
    from pipeline.config import JobConfig
    from pipeline.fit import fit_stage
    from pipeline.spark import size_partitions, spark_session
    from pipeline.stages import Stages

    # local mode runs the executors inside the driver JVM: give it the heap a cluster's executors would have
    spark = spark_session("bench-scale", **{"spark.driver.memory": "8g"})
    size_partitions(spark, n * 384 * 4)  # as the job does from its input size
    cfg = JobConfig(k=k, depth=depth, output=out, seed=0)
    t0 = time.time()
    generate(spark, n, 384, out, seed=0, parts=16)
    t_gen = time.time() - t0
    stages = Stages(out, cfg.fingerprint())
    t0 = time.time()
    fit = fit_stage(spark, cfg, out, stages)
    total = time.time() - t0
    per_level = {name: round(stages.seconds(name), 1) for name in fit["stages"]}
    res = {
        "n": n,
        "generate_s": round(t_gen, 1),
        "fit_total_s": round(total, 1),
        **per_level,
        "max_child_fraction": max(lv["max_child_fraction"] for lv in fit["levels"]),
        "py_driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "jvm_driver_peak_rss_mb": round(peak_rss_mb("java"), 1),
        "py_worker_peak_rss_mb": round(peak_rss_mb("pyspark.daemon"), 1),
    }
    spark.stop()

    import faiss
    import pyarrow.dataset as ds

    table = ds.dataset(os.path.join(out, "embeddings")).to_table(columns=["embedding"])
    x = table.column("embedding").combine_chunks().values.to_numpy().reshape(n, -1)
    del table
    faiss.omp_set_num_threads(os.cpu_count())  # the same cores local[*] had
    t0 = time.time()
    faiss_tree(x, k, depth, cfg.sample_per_node, cfg.em_steps, seed=0)
    res["faiss_s"] = round(time.time() - t0, 1)
    res["job_over_faiss"] = round(total / res["faiss_s"], 2)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[250_000, 1_000_000])
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args.k, args.depth, args.out)), flush=True)
        return
    results = []
    for n in args.n:
        with tempfile.TemporaryDirectory(prefix="hmem-scale-") as d:
            env = dict(os.environ, PYSPARK_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1")
            p = subprocess.run(
                [sys.executable, __file__, "--one", str(n), "--k", str(args.k), "--depth", str(args.depth), "--out", d],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode or not line:
                errors = [ln for ln in p.stdout.splitlines() if "Error" in ln or "Exception" in ln][:10]
                sys.exit(f"N={n} failed:\n" + "\n".join(errors) + "\n" + p.stdout[-2000:])
            r = json.loads(line[0][7:])
            results.append(r)
            print(json.dumps(r), flush=True)
    a, b = results[0], results[-1]
    print(
        f"N {a['n']} -> {b['n']} ({b['n'] / a['n']:.1f}x): fit time {a['fit_total_s']}s -> {b['fit_total_s']}s, "
        f"python driver peak RSS {a['py_driver_peak_rss_mb']} -> {b['py_driver_peak_rss_mb']} MB, "
        f"JVM driver peak RSS {a['jvm_driver_peak_rss_mb']} -> {b['jvm_driver_peak_rss_mb']} MB"
    )
    print(
        f"time_ratio {b['fit_total_s'] / a['fit_total_s']:.2f} "
        f"rss_growth {b['py_driver_peak_rss_mb'] / a['py_driver_peak_rss_mb'] - 1:.3f} "
        f"job/faiss {a['job_over_faiss']:.2f} {b['job_over_faiss']:.2f}"
    )


if __name__ == "__main__":
    main()
