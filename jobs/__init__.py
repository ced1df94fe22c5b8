"""Command-line jobs. A package so that [project.scripts] can name their mains (hmem-index, hmem-longtail);
each file also runs as a script (``python jobs/build_index.py``, ``spark-submit jobs/cluster_corpus.py``)."""
