"""Build RUN/index/ (the FAISS document index, index/router.py) for a finished cluster_corpus run.

    python jobs/build_index.py --run RUN
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from index.router import build_document_index  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--run", required=True, help="run directory with tree/ and routed/")
    args = p.parse_args(argv)
    t = time.time()
    try:
        meta = build_document_index(args.run)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(dict(meta, seconds=round(time.time() - t, 2))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
