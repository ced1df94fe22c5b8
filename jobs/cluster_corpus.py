"""spark-submit jobs/cluster_corpus.py [--config FILE] [--input ...] [--output DIR] [--k K --depth P ...]

Embeds a corpus, fits a balanced hierarchical k-means tree, routes every document
and writes pre-routed packed shards, the tree and a manifest. See pipeline/run.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import parse_args  # noqa: E402
from pipeline.run import run  # noqa: E402

if __name__ == "__main__":
    run(parse_args())
