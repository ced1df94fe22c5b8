"""The document index the neighbour vote searches (index/docindex.py): size, vote agreement, query latency.

    python -m bench.doc_index                                   # 1M synthetic documents, k=16, p=4
    python -m bench.doc_index --real RUN PROBES.jsonl [RUN PROBES.jsonl ...]   # + agreement on real runs
    python -m bench.doc_index --pq-m 96 --real ...              # another code size (jobs/build_index.py --pq-m)

1. Size. A synthetic run of N documents (a seeded hierarchy of topics, k children per node, p
   levels; the tree's centroids are the topics, every document routed by the real descent) is
   written in parts and indexed with jobs/build_index.py's code: build seconds, peak RSS of the
   build, bytes per document in the lists.
2. Vote agreement. The leaf the neighbour vote picks from the compressed index (bounded nprobe)
   against the leaf it picks from an exact search over the raw embeddings (streamed, flat inner
   product), for the same questions: the synthetic run's (documents' noisy copies) and, with
   --real, each real run's probe prompts embedded by the real encoder. Where the probes name their
   entity's training documents (bench/longtail.py's probes.jsonl: doc_ids, frequency), the routing
   quality each vote gives is printed too, on all probes and the rarest frequency bucket
   (train/evaluate.py's buckets): the share of the entity's documents in the chosen leaf
   (agreement) and how often the chosen leaf is the one holding most of them (oracle leaf). A
   compressed vote can differ from the exact one and still route as well: this says whether it does.
3. Latency. ``hmem.query``'s answer (embed + vote + neighbours in the leaf and over the corpus),
   warm, one query at a time, real sentences as queries, 1 thread.
With --pq-m, the synthetic index and, for each real run whose index has another code size, an index
built into a temporary view of the run (links to its files; the run is not modified) use that size.
Last line: ``bytes_per_document B vote_agreement_real A vote_agreement_synthetic S p50_ms P``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import numpy as np


from index.routing import RoutingConfig
from index.rundir import write_manifest

SIMILARITY = RoutingConfig(vote="linear")  # the vote on similarities alone: what PQ codes approximate


def synthetic_run(root: str, n: int, k: int, depth: int, dim: int, seed: int, part_rows: int = 100_000) -> None:
    """A run directory (tree/, routed/, manifest.json) of n generated documents; never all vectors at once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from corpora.bbc import bbc_records
    from index.route import Descender
    from index.terms import term_hashes
    from index.tree import Tree, local_index

    rng = np.random.default_rng(seed)
    centroids, level = [], np.zeros((1, dim), dtype=np.float32)
    for l in range(depth):  # children of each node: the parent plus a shrinking perturbation (norm 1, .6, .4, .27)
        noise = rng.normal(size=(len(level) * k, dim)).astype(np.float32) / np.sqrt(dim)
        child = np.repeat(level, k, axis=0) + (0.65**l if l else 1.0) * noise
        child /= np.linalg.norm(child, axis=1, keepdims=True)
        centroids.append(child)
        level = child
    tree = Tree(
        k=k,
        depth=depth,
        dim=dim,
        centroids=centroids,
        biases=[np.zeros(len(c), dtype=np.float32) for c in centroids],
        config={"max_windows": 1},
    )
    tree.save(os.path.join(root, "tree"))
    sentences = [r["text"].split(". ")[0][:200] for r in bbc_records()]
    terms = [term_hashes(t).view(np.int32) for t in sentences]
    descender, counts = Descender(tree), [np.zeros(k ** (l + 1), dtype=np.int64) for l in range(depth)]
    os.makedirs(os.path.join(root, "routed"))
    for start in range(0, n, part_rows):
        m = min(part_rows, n - start)
        leaf = rng.integers(0, k**depth, size=m)
        x = level[leaf] + 0.2 * rng.normal(size=(m, dim)).astype(np.float32) / np.sqrt(dim)  # cosine ~0.98
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        paths = descender.route(x)
        for l in range(depth):
            counts[l] += np.bincount(local_index(paths, k, l + 1), minlength=k ** (l + 1))
        table = pa.table(
            {
                "doc_id": [f"syn-{i:09d}" for i in range(start, start + m)],
                "path": pa.array(paths.tolist(), pa.list_(pa.int32())),
                "leaf": local_index(paths, k, depth),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim).cast(pa.list_(pa.float32())),
                "preview": [sentences[i % len(sentences)] for i in range(start, start + m)],
                "copies": np.ones(m, dtype=np.int64),
                "first_copy": np.ones(m, dtype=bool),  # distinct vectors
                "terms": pa.array([terms[i % len(sentences)] for i in range(start, start + m)], pa.list_(pa.int32())),
            }
        )
        pq.write_table(table, os.path.join(root, "routed", f"part-{start // part_rows:05d}.parquet"))
    levels = [
        {"level": l + 1, "nodes": k ** (l + 1), "node_documents": c.tolist(), "node_tokens": (c * 500).tolist()}
        for l, c in enumerate(counts)
    ]
    write_manifest(
        root,
        {
            "documents_in": n,
            "documents_routed": n,
            "documents_distinct": n,
            "documents_quarantined": 0,
            "tree_version": tree.version,
            "k": k,
            "depth": depth,
            "levels": levels,
            "config": {"max_windows": 1},
        },
    )


def exact_vote(run: str, q: np.ndarray, m: int, router) -> np.ndarray:
    """The vote's leaf from an exact inner-product search over the raw routed embeddings (streamed)."""
    import faiss

    from index.docindex import Hits, _batches, embedding_matrix
    from index.router import vote, vote_weights

    heap = faiss.ResultHeap(len(q), m, keep_max=True)
    leaves = []
    offset = 0
    for batch in _batches(os.path.join(run, "routed"), ["leaf", "embedding", "first_copy"]):
        batch = batch.filter(batch.column("first_copy"))  # the index holds one entry per distinct text
        x = embedding_matrix(batch.column("embedding"), q.shape[1], run)
        flat = faiss.IndexFlatIP(q.shape[1])
        flat.add(x)
        d, i = flat.search(q, min(m, len(x)))
        heap.add_result(d, np.where(i >= 0, i + offset, -1))
        leaves.append(batch.column("leaf").to_numpy(zero_copy_only=False))
        offset += len(x)
    heap.finalize()
    leaf_of = np.concatenate(leaves)
    ids = heap.I
    keys = np.where(ids >= 0, leaf_of[np.maximum(ids, 0)], -1)
    best, _ = vote(keys, vote_weights(Hits(heap.D, ids, keys), SIMILARITY))
    return best[:, 0]


def routing_quality(run: str, probes: list[dict], leaves: dict[str, np.ndarray]) -> str:
    """Per vote (name -> chosen leaf per probe): agreement and oracle-leaf share, all probes and the rarest bucket."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from train.evaluate import bucket_edges, bucket_of, oracle_leaf

    wanted = sorted({d for p in probes for d in p["doc_ids"]})
    routed = ds.dataset(os.path.join(run, "routed"), format="parquet", partitioning="hive").to_table(
        columns=["doc_id", "leaf"], filter=pc.field("doc_id").isin(wanted)
    )
    leaf_of = dict(zip(routed.column("doc_id").to_pylist(), routed.column("leaf").to_pylist()))
    doc_leaves = [np.array([leaf_of[d] for d in p["doc_ids"] if d in leaf_of], dtype=np.int64) for p in probes]
    has = np.array([len(d) > 0 for d in doc_leaves])
    best = np.array([oracle_leaf(d) if len(d) else -1 for d in doc_leaves])
    freqs = np.array([p["frequency"] for p in probes])
    rare = bucket_of(freqs, bucket_edges(freqs)) == 0
    out = []
    for name, chosen in leaves.items():
        agree = np.array([np.mean(d == c) if len(d) else np.nan for d, c in zip(doc_leaves, chosen)])
        oracle = best == chosen
        out.append(
            f"{name} vote: agreement {np.nanmean(agree):.1%} (rarest {np.nanmean(agree[rare]):.1%}), oracle "
            f"leaf {oracle[has].mean():.1%} (rarest {oracle[has & rare].mean():.1%})"
        )
    return (
        f"routing quality, {int(rare.sum())} rarest-bucket probes (frequency {freqs[rare].min()}-{freqs[rare].max()}): "
        + "; ".join(out)
    )


def run_with_index(run: str, pq_m: int | None, tmp: str) -> str:
    """``run`` if its index has ``pq_m`` bytes of code (or pq_m is None), else a view of it in ``tmp`` indexed so."""
    from index.docindex import build_document_index, read_index_meta

    if pq_m is None or read_index_meta(run)["pq_m"] == pq_m:
        return run
    view = os.path.join(tmp, f"view-{len(os.listdir(tmp))}")
    os.makedirs(view)
    for name in os.listdir(run):
        if name != "index":
            os.symlink(os.path.abspath(os.path.join(run, name)), os.path.join(view, name))
    build_document_index(view, pq_m, log=lambda m: None)
    return view


def index_vote(router, q: np.ndarray) -> np.ndarray:
    """The similarity vote's leaf from the compressed index (the exact vote's counterpart)."""
    from index.router import vote, vote_weights

    hits = router.documents.search(q, router.routing.neighbours, router.routing.nprobe)
    return vote(hits.leaves, vote_weights(hits, SIMILARITY))[0][:, 0]


def latency(router, texts: list[str], n: int = 5) -> list[float]:
    from hmem.query import answer

    answer(router, texts[:1], n)  # warm: encoder loaded, pages mapped
    ms = []
    for t in texts:
        start = time.perf_counter()
        answer(router, [t], n)
        ms.append(1000 * (time.perf_counter() - start))
    return ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--queries", type=int, default=200, help="synthetic questions for the agreement")
    p.add_argument("--latency-queries", type=int, default=50)
    p.add_argument("--real", nargs="*", default=[], metavar="RUN PROBES", help="real runs and their probe files")
    p.add_argument("--keep", help="build the synthetic run here and keep it; an index already there is reused")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pq-m", type=int, help="bytes of PQ code per document (default: the build's, 48; a real run's own)"
    )
    args = p.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        bench(args, tmp)


def bench(args, tmp: str) -> None:
    from index.docindex import PQ_M, build_document_index, read_index_meta
    from index.router import Router

    real_agree = []
    for given, probes in zip(args.real[::2], args.real[1::2]):
        run = run_with_index(given, args.pq_m, tmp)
        router = Router.load(run)
        with open(probes) as f:
            records = [json.loads(line) for line in f if line.strip()]
        q = router.embed([r["prompt"] for r in records])
        votes = {"exact": exact_vote(run, q, router.routing.neighbours, router), "index": index_vote(router, q)}
        same = votes["index"] == votes["exact"]
        real_agree.append(same)
        print(
            f"real {given}: {len(records)} questions, vote leaf = exact-search vote leaf for {same.mean():.1%} "
            f"(nprobe {router.routing.nprobe} of {router.documents.n_lists} lists, "
            f"{router.documents.meta['list_bytes_per_document']:.1f} bytes/document)",
            flush=True,
        )
        if all("doc_ids" in r and "frequency" in r for r in records):
            print(f"real {given}: {routing_quality(run, records, votes)}", flush=True)

    run = args.keep or os.path.join(tmp, "synthetic")
    reuse = os.path.exists(os.path.join(run, "index", "index.json"))
    t = time.time()
    if not reuse:
        synthetic_run(run, args.n, args.k, args.depth, 384, args.seed)
    gen_s = time.time() - t
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.time()
    meta = read_index_meta(run) if reuse else build_document_index(run, args.pq_m or PQ_M, log=lambda m: None)
    if args.pq_m and meta["pq_m"] != args.pq_m:
        raise SystemExit(
            f"--keep {run}: its index has pq_m {meta['pq_m']}, not --pq-m {args.pq_m}; give another --keep"
        )
    build_s = time.time() - t
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"synthetic: {args.n:,} documents, k={args.k} p={args.depth} ({args.k**args.depth:,} lists), "
        f"generated in {gen_s:.0f}s; index built in {build_s:.0f}s{' (reused)' if reuse else ''}; lists "
        f"{meta['list_bytes_per_document']:.1f} bytes/document, whole index "
        f"{meta['index_bytes'] / args.n:.1f} bytes/document (quantizer included), display table "
        f"{meta['table_bytes_per_document']:.1f} bytes/document; process peak RSS {rss0 / 1024:.0f} MB "
        f"before the build, {rss1 / 1024:.0f} MB after",
        flush=True,
    )
    router = Router.load(run)
    rng = np.random.default_rng(args.seed + 1)
    import pyarrow.dataset as ds

    table = ds.dataset(os.path.join(run, "routed"), format="parquet").head(50_000, columns=["embedding"])
    x = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    x = x[rng.choice(len(x), min(args.queries, len(x)), replace=False)]
    q = x + 0.2 * rng.normal(size=x.shape).astype(np.float32) / np.sqrt(x.shape[1])  # near a document, not on it
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    syn_same = index_vote(router, q) == exact_vote(run, q, router.routing.neighbours, router)
    print(
        f"synthetic: vote leaf = exact-search vote leaf for {syn_same.mean():.1%} of {args.queries} "
        f"questions (nprobe {router.routing.nprobe}, {router.routing.neighbours} neighbours)",
        flush=True,
    )
    previews = router.documents.table.column("preview").to_pylist()[:5000]
    texts = list(dict.fromkeys(previews))[: args.latency_queries]
    ms = latency(router, texts)
    print(
        f"hmem.query answer, warm, 1 thread, {len(ms)} queries on the {args.n:,}-document index: "
        f"p50 {np.percentile(ms, 50):.1f} ms, p95 {np.percentile(ms, 95):.1f} ms; load {os.getloadavg()}",
        flush=True,
    )
    real = float(np.concatenate(real_agree).mean()) if real_agree else float("nan")
    print(
        f"bytes_per_document {meta['list_bytes_per_document']:.1f} vote_agreement_real {real:.3f} "
        f"vote_agreement_synthetic {syn_same.mean():.3f} p50_ms {np.percentile(ms, 50):.1f}"
    )


if __name__ == "__main__":
    main()
