"""Write the long-tail facts corpus (corpora/longtail.py): train.jsonl, heldout.jsonl, probes.jsonl, summary.json.

    hmem-longtail --out runs/longtail/data [--config configs/longtail/corpus.yaml] [--seed 1]
    (or: python jobs/build_longtail.py ...)

Then cluster it like any corpus; the last line printed is the job's input part:
    spark-submit jobs/cluster_corpus.py --input runs/longtail/data/train.jsonl --id-column id --output RUN
A ``mix`` corpus (configs/longtail/corpus_mix.yaml) is two inputs and their passes:
    ... --input DATA/train_news.jsonl DATA/train_facts.jsonl --passes 1 16 --id-column id --output RUN
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from corpora.bbc import bbc_records
from corpora.longtail import LongtailConfig, build, job_input, write


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--config", help="YAML file with LongtailConfig fields (corpora/longtail.py)")
    p.add_argument("--seed", type=int, help="overrides the config's seed")
    args = p.parse_args(argv)
    raw = {}
    if args.config:
        with open(args.config) as f:
            raw = yaml.safe_load(f) or {}
    if args.seed is not None:
        raw["seed"] = args.seed
    try:
        cfg = LongtailConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    except TypeError as e:
        print(f"error: {args.config}: {e} (fields: see LongtailConfig in corpora/longtail.py)", file=sys.stderr)
        return 1
    summary = write(build(cfg, list(bbc_records())), cfg, args.out)
    print(json.dumps(summary))
    files, mix = job_input(args.out, summary)
    print("job input: " + " ".join(["--input", *files, *mix, "--id-column", "id"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
