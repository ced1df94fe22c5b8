"""spark-submit jobs/cluster_corpus.py [--config FILE] [--input ...] [--output DIR] [--k K --depth P ...]

Embeds a corpus, fits a balanced hierarchical k-means tree, routes every document
and writes pre-routed packed shards, the tree and a manifest. See pipeline/run.py.
"""

from pipeline.config import parse_args
from pipeline.run import run

if __name__ == "__main__":
    run(parse_args())
