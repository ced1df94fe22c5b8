"""The clustering job's config: one dataclass, filled from defaults < YAML file < command line."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import get_type_hints

import yaml

from index.encoder import PRECISIONS


@dataclass
class JobConfig:
    # inputs: JSONL or Parquet files/dirs/globs, local or any URL Spark reads; empty = the BBC demo corpus
    input: list[str] = field(default_factory=list)
    text_column: str = "text"
    id_column: str = ""  # empty: ids derived from (source file name, row)
    max_doc_chars: int = 1_000_000  # longer documents are quarantined as too_large
    output: str = "runs/demo"
    # tree (paper: k=16, depth=4, 128k-point samples, 6,400-point batches, 20 steps, balance 1.5)
    k: int = 8
    depth: int = 3
    sample_per_node: int = 128_000
    em_batch_size: int = 6400
    em_steps: int = 20
    balance_factor: float = 1.5
    # encoder
    encoder_batch_size: int = 64
    encoder_device: str = "auto"  # auto: cuda when the executor has a GPU, else cpu
    encoder_threads: int = 0  # torch threads per Python worker; 0 = executor cores / concurrent tasks
    max_windows: int = 1  # 256-word-piece windows embedded per document (mean of the first max_windows)
    encoder_precision: str = "auto"  # fp32 | bf16 | int8; auto: bf16 where the CPU has native bf16, else fp32
    # tokenizer and packing
    tokenizer: str = ""  # a tokenizer.json or a transformers tokenizer directory; empty: train a byte-level BPE
    vocab_size: int = 8192
    tokenizer_sample_docs: int = 20_000
    seq_len: int = 512
    pack_group_tokens: int = 20_000_000  # bounds the tokens one packing task holds in memory
    # execution
    partitions: int = 0  # 0: Spark's default parallelism x 2
    seed: int = 0

    def validate(self) -> None:
        problems = []
        if self.k < 2:
            problems.append(f"k={self.k}: need at least 2 children per node")
        if self.depth < 1:
            problems.append(f"depth={self.depth}: need at least one level")
        if not (1.0 <= self.balance_factor <= self.k):
            problems.append(f"balance_factor={self.balance_factor}: must be in [1, k]")
        if self.seq_len < 8:
            problems.append(f"seq_len={self.seq_len} is too short")
        if self.max_windows < 1:
            problems.append("max_windows must be >= 1")
        if self.encoder_precision not in ("auto",) + PRECISIONS:
            problems.append(f"encoder_precision={self.encoder_precision!r}: choose auto, {', '.join(PRECISIONS)}")
        if problems:
            raise ValueError("invalid job config: " + "; ".join(problems))

    def fingerprint(self) -> str:
        """Hash of everything that changes outputs (not the output path), to refuse mixing runs."""
        d = dataclasses.asdict(self)
        d.pop("output")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def parse_args(argv: list[str] | None = None) -> JobConfig:
    """``--config FILE.yaml`` then ``--<field> value`` overrides for every JobConfig field."""
    hints = get_type_hints(JobConfig)
    ap = argparse.ArgumentParser(prog="cluster_corpus.py", description=__doc__)
    ap.add_argument("--config", help="YAML file with JobConfig fields")
    for f in dataclasses.fields(JobConfig):
        name = "--" + f.name.replace("_", "-")
        if hints[f.name] == list[str]:
            ap.add_argument(name, dest=f.name, nargs="+", default=None)
        else:
            ap.add_argument(name, dest=f.name, type=hints[f.name], default=None)
    args = ap.parse_args(argv)
    values = {}
    if args.config:
        with open(args.config) as fh:
            values = yaml.safe_load(fh) or {}
        unknown = set(values) - {f.name for f in dataclasses.fields(JobConfig)}
        if unknown:
            raise SystemExit(f"{args.config}: unknown keys {sorted(unknown)}")
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    cfg = JobConfig(**values)
    cfg.validate()
    return cfg
