"""The clustering job's config: one dataclass, filled from defaults < YAML file < command line.

A wrong value (a YAML key that is no field, a value of the wrong type, a value out of range)
is a one-line error naming the field, not a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import get_type_hints

from index.config import ConfigError, apply_overrides, build, read_yaml
from index.encoder import PRECISIONS

DESCRIPTION = """Embed a corpus (JSONL/Parquet, any URL Spark reads), fit a balanced hierarchical k-means tree
over the embeddings level by level (or route into an existing run's tree with --tree), route every
document to a leaf, tokenize and pack one-leaf sequences, and write RUN/: tree/, routed/, shards/,
tokenizer.json, quarantine/, manifest.json (counts and checksums proving every row was routed or
quarantined exactly once). Run it with spark-submit; parallelism comes from the cluster and
--conf spark.sql.shuffle.partitions=N (default: from the input size). Each stage resumes."""


def opt(default, doc: str):
    """A config field with its --help text."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": doc})
    return field(default=default, metadata={"help": doc})


@dataclass
class JobConfig:
    # inputs
    input: list[str] = opt(
        [], "JSONL or Parquet files, directories or globs, local or any URL Spark reads; empty: the BBC demo corpus"
    )
    passes: list[int] = opt(
        [],
        "a data mix: how many times each --input's documents are packed into shards/, one whole number per "
        "--input (16 1: the first input read 16 times per epoch, each pass in other sequences); the corpus, "
        "the tree and the router's index still hold every document once. Empty: once each",
    )
    text_column: str = opt("text", "field/column holding the document text")
    id_column: str = opt(
        "auto",
        "field/column holding the document id; auto: 'id' when the input has it, else ids "
        "derived from (path relative to its --input, row); '': always derived",
    )
    max_doc_chars: int = opt(1_000_000, "longer documents are quarantined as too_large")
    output: str = opt("runs/demo", "run directory to write (local or any URL Spark writes)")
    tree: str = opt(
        "",
        "route into this finished run's tree (its directory or its tree/) instead of fitting one; "
        "its tokenizer is used unless --tokenizer is given",
    )
    embeddings_from: str = opt(
        "",
        "with --tree: a run of that tree whose documents keep their stored embedding where id and text match "
        "(hmem.forget re-packs so: a vector depends on the batch it was embedded in, and a re-embedded document "
        "near a boundary could change leaf)",
    )
    # tree (paper: k=16, depth=4, 128k-point samples, 6,400-point batches, 20 steps, balance 1.5)
    k: int = opt(8, "children per node")
    depth: int = opt(3, "levels of the tree (the root is level 0)")
    sample_per_node: int = opt(128_000, "most points of one node its children are fitted on (a seeded sample)")
    em_batch_size: int = opt(6400, "points per mini-batch EM step")
    em_steps: int = opt(20, "mini-batch EM steps per node")
    balance_factor: float = opt(1.5, "a child holds at most balance_factor/k of its parent's documents")
    local_fit_rows: int = opt(
        1 << 18,
        "a node of at most this many documents has its whole subtree fitted in one "
        "task (about 4.6 KB of task memory per document); the tree is the same",
    )
    # encoder
    encoder_batch_size: int = opt(64, "texts per encoder forward pass")
    encoder_device: str = opt("auto", "auto: cuda when the executor has a GPU, else cpu")
    encoder_threads: int = opt(0, "torch threads per Python worker; 0: spark.task.cpus")
    max_windows: int = opt(1, "256-word-piece windows embedded per document (mean of the first max_windows)")
    encoder_precision: str = opt(
        "auto",
        "fp32 | bf16 | int8; auto: bf16 where the CPU has native bf16, else fp32 "
        "(recorded in the run; the router embeds with the same)",
    )
    # tokenizer and packing
    tokenizer: str = opt(
        "", "a tokenizer.json or a transformers tokenizer directory; empty: train a byte-level BPE on a sample"
    )
    vocab_size: int = opt(8192, "vocabulary of the trained tokenizer")
    tokenizer_sample_docs: int = opt(20_000, "documents the tokenizer is trained on (they reach the driver)")
    seq_len: int = opt(512, "tokens per packed sequence (each row holds seq_len + 1)")
    pack_group_tokens: int = opt(20_000_000, "most tokens one packing task holds in memory")
    row_group_sequences: int = opt(
        256,
        "most sequences per Parquet row group of shards/: the trainer "
        "shuffles whole row groups, so a window of data.shuffle_buffer sequences "
        "mixes shuffle_buffer / this many random pieces of the corpus",
    )
    seed: int = opt(0, "fixes the tree, routing, tokenizer sample and packing order")

    def validate(self) -> None:
        problems = []
        if self.k < 2:
            problems.append(f"k={self.k}: need at least 2 children per node")
        if self.depth < 1:
            problems.append(f"depth={self.depth}: need at least one level")
        if self.local_fit_rows < 0:
            problems.append(f"local_fit_rows={self.local_fit_rows}: must be >= 0 (0: fit every level as a Spark pass)")
        if not (1.0 <= self.balance_factor <= self.k):
            problems.append(f"balance_factor={self.balance_factor}: must be in [1, k]")
        if self.seq_len < 8:
            problems.append(f"seq_len={self.seq_len} is too short (at least 8)")
        for name in (
            "max_windows",
            "max_doc_chars",
            "sample_per_node",
            "em_batch_size",
            "em_steps",
            "encoder_batch_size",
            "vocab_size",
            "tokenizer_sample_docs",
            "pack_group_tokens",
            "row_group_sequences",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)}: must be >= 1")
        if self.encoder_threads < 0:
            problems.append(f"encoder_threads={self.encoder_threads}: must be >= 0")
        if self.encoder_precision not in ("auto",) + PRECISIONS:
            problems.append(f"encoder_precision={self.encoder_precision!r}: choose auto, {', '.join(PRECISIONS)}")
        if self.passes and len(self.passes) != len(self.input):
            problems.append(
                f"passes={self.passes}: give one number per --input ({len(self.input)} given"
                + (", none: the BBC demo corpus)" if not self.input else ")")
            )
        if any(n < 1 for n in self.passes):
            problems.append(f"passes={self.passes}: each must be >= 1")
        if self.embeddings_from and not self.tree:
            problems.append(f"embeddings_from={self.embeddings_from}: needs --tree (the vectors of the tree's encoder)")
        if problems:
            raise SystemExit("invalid job config: " + "; ".join(problems))

    def fingerprint(self) -> str:
        """Hash of everything that changes outputs (not the output path), to refuse mixing runs."""
        d = dataclasses.asdict(self)
        d.pop("output")
        d.pop("local_fit_rows")  # where the fit switches to per-subtree tasks does not change the tree
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def parse_args(argv: list[str] | None = None) -> JobConfig:
    """``--config FILE.yaml``, then ``--<field> value`` and ``--set field=value`` overrides of JobConfig fields.

    A bad value is a one-line SystemExit: the job's edge turns index.config's ConfigError into one."""
    hints = get_type_hints(JobConfig)
    ap = argparse.ArgumentParser(
        prog="spark-submit jobs/cluster_corpus.py",
        description=DESCRIPTION,
        usage="spark-submit [--master URL --conf K=V ...] jobs/cluster_corpus.py "
        "[--config FILE] [--FIELD VALUE ...] [--set FIELD=VALUE ...]",
    )
    ap.add_argument("--config", help="YAML file with JobConfig fields (the command line overrides it)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a JobConfig field, its value parsed as YAML (repeatable; wins over --FIELD)",
    )
    for f in dataclasses.fields(JobConfig):
        name = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        # None in the namespace tells "not given" apart from the default, which --help shows;
        # values stay strings, which the loader coerces to the field's type as it does the file's
        help_text = f"{f.metadata['help']} (default: {default!r})"
        if hints[f.name] in (list[str], list[int]):
            metavar = "PATH" if hints[f.name] == list[str] else "N"
            ap.add_argument(name, dest=f.name, nargs="+", default=None, help=help_text, metavar=metavar)
        else:
            ap.add_argument(name, dest=f.name, default=None, help=help_text, metavar=hints[f.name].__name__.upper())
    args = ap.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "set") and v is not None}
    sources = ([f"--config {args.config}"] if args.config else []) + (["command line"] if flags or args.set else [])
    try:
        raw = read_yaml(args.config, f"--config {args.config}") if args.config else {}
        cfg = build(JobConfig, apply_overrides({**raw, **flags}, args.set), " + ".join(sources) or "defaults")
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    cfg.validate()
    return cfg
