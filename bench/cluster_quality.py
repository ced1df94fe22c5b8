"""Level-1 clustering quality on BBC: purity and NMI against the 5 topic labels.

Compares the job's level-1 clusters with flat FAISS k-means and Spark MLlib
BisectingKMeans, each with the same number of clusters, on the job's own
embeddings. Run after `make demo` (or any run of the BBC corpus with ids):

    python -m bench.cluster_quality --run runs/demo
Last line: `purity_l1 <job> nmi_l1 <job>`.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pyarrow.parquet as pq
from sklearn.metrics import normalized_mutual_info_score

from index.rundir import read_manifest


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    total = 0
    for c in np.unique(clusters):
        total += np.bincount(labels[clusters == c]).max()
    return total / len(labels)


def faiss_kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=25, seed=seed, verbose=False)
    km.train(x)
    return km.index.search(x, 1)[1][:, 0]


def spark_bisecting(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    from pyspark.ml.clustering import BisectingKMeans
    from pyspark.ml.linalg import Vectors
    from pipeline.spark import spark_session

    spark = spark_session("bench-bisecting")
    df = spark.createDataFrame([(i, Vectors.dense(v.astype(float))) for i, v in enumerate(x)], ["i", "features"])
    model = BisectingKMeans(k=k, seed=seed).fit(df)
    rows = model.transform(df).select("i", "prediction").collect()
    out = np.zeros(len(x), dtype=np.int64)
    for r in rows:
        out[r["i"]] = r["prediction"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--labels", default="data/bbcnews.jsonl", help="JSONL with id and label")
    args = ap.parse_args()
    labels_by_id = {}
    with open(args.labels) as f:
        for line in f:
            r = json.loads(line)
            labels_by_id[r["id"]] = r["label"]
    routed = pq.read_table(os.path.join(args.run, "routed"), columns=["doc_id", "path", "embedding"]).to_pandas()
    names = sorted(set(labels_by_id.values()))
    y = np.array([names.index(labels_by_id[d]) for d in routed.doc_id])
    x = np.stack(routed.embedding.to_numpy()).astype(np.float32)
    l1 = np.array([p[0] for p in routed.path])
    m = read_manifest(args.run)
    k, seed = m["k"], m["seed"]
    results = {
        "hmem level 1": l1,
        "faiss flat k-means": faiss_kmeans(x, k, seed),
        "spark BisectingKMeans": spark_bisecting(x, k, seed),
    }
    print(f"{len(y)} documents, {len(names)} labels, k={k}")
    print(f"{'method':<24} {'purity':>7} {'NMI':>7} {'largest cluster':>16}")
    for name, c in results.items():
        print(
            f"{name:<24} {purity(y, c):7.3f} {normalized_mutual_info_score(y, c):7.3f} "
            f"{np.bincount(c).max() / len(c):16.3f}"
        )
    print(f"purity_l1 {purity(y, l1):.3f} nmi_l1 {normalized_mutual_info_score(y, l1):.3f}")


if __name__ == "__main__":
    main()
