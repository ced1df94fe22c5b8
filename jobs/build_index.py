"""Build RUN/index/ (the compressed document index the neighbour vote searches, index/docindex.py).

    hmem-index --run RUN [--pq-m 48] [--shard-rows 4000000]      (or: python jobs/build_index.py ...)

Streams RUN/routed/: memory is one shard's codes (shard_rows x (pq_m + 8) bytes) plus the PQ
training sample, whatever the corpus size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from index.docindex import PQ_M, build_document_index


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--run", required=True, help="run directory with tree/ and routed/")
    p.add_argument("--pq-m", type=int, default=PQ_M, help="bytes of PQ code per document (must divide the dimension)")
    p.add_argument("--train-sample", type=int, default=100_000, help="documents whose residuals train the PQ")
    p.add_argument("--shard-rows", type=int, default=4_000_000, help="documents encoded per shard before merging")
    args = p.parse_args(argv)
    t = time.time()
    try:
        meta = build_document_index(
            args.run, args.pq_m, args.train_sample, args.shard_rows, log=lambda m: print(m, file=sys.stderr, flush=True)
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(dict(meta, seconds=round(time.time() - t, 2))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
