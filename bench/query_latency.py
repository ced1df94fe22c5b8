"""Query latency, warm, text in to answer out (embed + route + neighbours in leaf and corpus-wide).

    python -m bench.query_latency [--run runs/demo] [--queries 50] [--threads 2]

Queries are the first sentences of routed documents' previews (one at a time, as
a user would type them). Last line: p50 and p95 in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", default="runs/demo")
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-n", type=int, default=5)
    args = p.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import faiss
    import torch

    from hmem.query import answer
    from index.router import Router

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(1)  # microseconds of work; a second OpenMP pool spinning beside torch costs more
    router = Router.load(args.run)
    previews = router.documents.table.column("preview").to_pylist()
    texts = [t.split(". ")[0] for t in previews[:: max(1, len(previews) // args.queries)][: args.queries]]
    answer(router, texts[:1], args.n)  # warm: encoder loaded, pages mapped
    ms = []
    for t in texts:
        start = time.perf_counter()
        answer(router, [t], args.n)
        ms.append(1000 * (time.perf_counter() - start))
    print(
        f"run={args.run} documents={router.documents.index.ntotal} queries={len(ms)} threads={args.threads} (wall "
        "clock)"
    )
    print(f"query_latency_ms p50 {np.percentile(ms, 50):.1f} p95 {np.percentile(ms, 95):.1f}")


if __name__ == "__main__":
    main()
