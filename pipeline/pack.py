"""Tokenize, then pack fixed-length sequences from the documents of ONE leaf each.

Tokenizer: a byte-level BPE trained with `tokenizers` on a bounded, seeded
sample of documents (``tokenizer_sample_docs`` reach the driver, no more), or a
user's tokenizer.json: ids 0 and 1 are ``<|endoftext|>`` and ``<|pad|>``. Or a
transformers tokenizer directory (a pretrained model's): its own eos and pad ids end and pad the
sequences. pipeline/tokenizer.py reads and trains them.

Packing (format in docs/FORMATS.md): a leaf's documents, in a seeded order, are
concatenated with an end-of-text token after each and cut into sequences of
``seq_len + 1`` tokens. A large leaf is split into packing groups by a seeded
hash of the doc id so that one task holds at most ``pack_group_tokens`` tokens;
only each group's last sequence is padded. Each sequence lists the documents
whose first token it holds, so every routed document appears exactly once per pass.

The data mix (``--passes``): a document of an input with n passes is packed n times, pass p at its own seeded
place (group and order hash (doc id, p)), so a source is read n times per epoch in n different sequences while
the corpus, the tree, routed/ and the router's index hold it once. Pass 0 hashes as an unmixed run does: a run
without ``--passes`` packs exactly as before the option existed. The shards of an n-pass input take n times its
tokens on disk.
Shards are partitioned by level-1 node and sorted by leaf inside each file, so a trainer rank reads
only the files and row groups of its subtrees.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.functions import pandas_udf
from pyspark.sql.pandas.types import from_arrow_schema

from index import rundir
from pipeline import tokenizer
from pipeline.config import JobConfig
from pipeline.spark import shuffle_partitions, with_lookup
from pipeline.tokenizer import EOT_ID, PAD_ID

SHARD_SCHEMA = from_arrow_schema(rundir.SHARD_SCHEMA)  # the format's owner is index/rundir.py


def load_or_train_tokenizer(spark: SparkSession, docs: DataFrame, cfg: JobConfig, n_docs: int):
    """(tokenizer, eot id, pad id): the user's (--tokenizer), or a BPE trained on a bounded, seeded sample."""
    if cfg.tokenizer:
        try:
            return tokenizer.load(cfg.tokenizer)
        except ValueError as e:
            raise SystemExit(f"--tokenizer {e}") from None
    frac = min(1.0, 1.2 * cfg.tokenizer_sample_docs / max(n_docs, 1))
    sample = (
        docs.select("text")
        .sample(fraction=frac, seed=cfg.seed)
        .orderBy(F.xxhash64("text"))
        .limit(cfg.tokenizer_sample_docs)
    )
    return tokenizer.train_bpe((r["text"] for r in sample.toLocalIterator()), cfg.vocab_size), EOT_ID, PAD_ID


@functools.lru_cache(maxsize=2)
def cached_tokenizer(tok_json: str):
    """Parsed once per Python worker, not once per Arrow batch."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tok_json)


def make_tokenize_udf(tok_json: str):
    @pandas_udf("array<int>")
    def tokenize(texts: pd.Series) -> pd.Series:
        tok = cached_tokenizer(tok_json)
        return pd.Series([np.asarray(e.ids, dtype=np.int32) for e in tok.encode_batch(texts.tolist())])

    return tokenize


def make_terms_udf():
    @pandas_udf("array<int>")
    def terms(texts: pd.Series) -> pd.Series:
        """routed/ ``terms``: index/terms.py's term hashes of each document (uint32 bits stored as int32)."""
        from index.terms import term_hashes

        return pd.Series([term_hashes(t).view(np.int32) for t in texts])

    return terms


def pack_group(
    doc_ids: list[str], token_lists: list[np.ndarray], seq_len: int, eot_id: int = EOT_ID, pad_id: int = PAD_ID
) -> list[tuple[list[int], int, list[str]]]:
    """Pack documents (already in order) into (tokens[seq_len+1], n_valid, first-token doc ids) sequences."""
    width = seq_len + 1
    lengths = np.array([len(t) + 1 for t in token_lists], dtype=np.int64)
    stream = np.full(int(lengths.sum()), eot_id, dtype=np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for s, t in zip(starts, token_lists):
        stream[s : s + len(t)] = t
    n_seq = -(-len(stream) // width)
    padded = np.full(n_seq * width, pad_id, dtype=np.int32)
    padded[: len(stream)] = stream
    # documents are in stream order, so sequence i lists a contiguous run of them: bounds[i]..bounds[i+1]
    bounds = np.searchsorted(starts // width, np.arange(n_seq + 1))
    out = []
    for i in range(n_seq):
        n_valid = min(width, len(stream) - i * width)
        out.append((padded[i * width : (i + 1) * width].tolist(), n_valid, doc_ids[bounds[i] : bounds[i + 1]]))
    return out


def copy_groups(leaves: DataFrame, embeddings: DataFrame) -> DataFrame:
    """doc_id -> ``copies`` (routed documents with this document's embedding, itself included) and
    ``first_copy`` (the smallest doc_id of them). Identical texts share one embedding (pipeline/embed.py) and
    so one leaf: to the router's vote they are one piece of evidence, and the document index keeps only the
    first copy (index/docindex.py). Narrow rows (doc_id, leaf, a 64-bit hash of the embedding) are shuffled,
    not the embeddings."""
    from pyspark.sql import Window

    w = Window.partitionBy("leaf", "h")
    return leaves.join(embeddings.select("doc_id", F.xxhash64("embedding").alias("h")), "doc_id").select(
        "doc_id", F.count("*").over(w).alias("copies"), (F.col("doc_id") == F.min("doc_id").over(w)).alias("first_copy")
    )


def with_passes(docs: DataFrame, passes_of: dict[str, int]) -> DataFrame:
    """``passes``: how many times a document is packed, from its input file (``source``); 1 without a data mix."""
    if not passes_of:
        return docs.withColumn("passes", F.lit(1))
    table = docs.sparkSession.createDataFrame(list(passes_of.items()), "source string, passes int")
    return docs.join(F.broadcast(table), "source", "left")  # every source is a listed file: no null (verify checks)


def write_tokens(
    spark: SparkSession, run_dir: str, docs: DataFrame, routed: DataFrame, tok, passes_of: dict[str, int]
) -> DataFrame:
    """work/tokens: each routed document's token ids, term hashes and passes beside its path, written once and read
    back so that routed/, the packing and the statistics do not tokenize again."""
    tokenize = make_tokenize_udf(tok.to_str())
    parts = shuffle_partitions(spark)
    joined = (
        routed.join(with_passes(docs.select("doc_id", "text", "source"), passes_of).drop("source"), "doc_id")
        .repartition(parts, "doc_id")
        .withColumn("ids", tokenize("text"))
        .withColumn("terms", make_terms_udf()("text"))
        .withColumn("n_tokens", F.size("ids").cast("long"))
        .withColumn("l1", F.col("path")[0])
    )
    work = os.path.join(run_dir, "work", "tokens")
    joined.drop("text").write.mode("overwrite").parquet(work)
    return spark.read.parquet(work)


def write_routed(spark: SparkSession, run_dir: str, docs: DataFrame, toks: DataFrame) -> int:
    """routed/: the doc -> path table the router, the document index and the evaluation read (the one place
    after the embed stage that writes the embeddings again: the index needs them beside the leaf). Returns the
    distinct documents (first copies)."""
    embeddings = spark.read.parquet(os.path.join(run_dir, "embeddings")).select("doc_id", "embedding")
    copies = copy_groups(toks.select("doc_id", "leaf"), embeddings)
    (
        toks.join(docs.select("doc_id", F.substring("text", 1, 200).alias("preview")), "doc_id")
        .join(embeddings, "doc_id")
        .join(copies, "doc_id")
        .select(
            "doc_id",
            "path",
            "leaf",
            "embedding",
            "n_tokens",
            "preview",
            "copies",
            "first_copy",
            "terms",
            "passes",
            "l1",
        )
        .write.mode("overwrite")
        .partitionBy("l1")
        .parquet(os.path.join(run_dir, "routed"))
    )
    return int(copies.filter("first_copy").count())


def make_pack(seq_len: int, eot_id: int, pad_id: int):
    """The applyInPandas function packing one (leaf, group) of documents into SHARD_SCHEMA rows."""

    def pack(pdf: pd.DataFrame) -> pd.DataFrame:
        pdf = pdf.sort_values(["order", "doc_id"])
        leaf, group = int(pdf["leaf"].iloc[0]), int(pdf["group"].iloc[0])
        seqs = pack_group(
            pdf["doc_id"].tolist(), [np.asarray(t, dtype=np.int32) for t in pdf["ids"]], seq_len, eot_id, pad_id
        )
        if len(seqs) >= 1 << 20 or group >= 1 << 11:
            raise ValueError(f"leaf {leaf}: packing group too large for seq_id numbering; lower pack_group_tokens")
        path = list(pdf["path"].iloc[0])
        return pd.DataFrame(
            {
                "seq_id": [(leaf << 31) | (group << 20) | i for i in range(len(seqs))],
                "path": [path] * len(seqs),
                "leaf": [leaf] * len(seqs),
                "tokens": [s[0] for s in seqs],
                "n_valid": [s[1] for s in seqs],
                "doc_ids": [s[2] for s in seqs],
            }
        )

    return pack


def write_shards(run_dir: str, cfg: JobConfig, toks: DataFrame, eot_id: int, pad_id: int) -> dict:
    """shards/: each leaf's documents, every pass of them, packed in groups of at most pack_group_tokens (see the
    module doc). Returns the tokens packed per leaf (an end-of-text token per document and pass included)."""
    packed = (F.col("n_tokens") + 1) * F.col("passes")
    leaf_tokens = {r["leaf"]: int(r["t"]) for r in toks.groupBy("leaf").agg(F.sum(packed).alias("t")).collect()}
    groups = {leaf: max(1, -(-t // cfg.pack_group_tokens)) for leaf, t in leaf_tokens.items()}

    def place(seed: int):  # a pass's seeded hash; pass 0 hashes as a run without --passes
        return F.when(F.col("pass") == 0, F.xxhash64("doc_id", F.lit(seed))).otherwise(
            F.xxhash64("doc_id", F.col("pass"), F.lit(seed))
        )

    shards = (
        with_lookup(toks, "leaf", groups, "n_groups", "long")
        .withColumn("pass", F.explode(F.sequence(F.lit(0), F.col("passes") - 1)))
        .select(
            "doc_id",
            "path",
            "leaf",
            "ids",
            F.pmod(place(cfg.seed), F.col("n_groups")).alias("group"),
            place(cfg.seed + 1).alias("order"),
        )
        .groupBy("leaf", "group")
        .applyInPandas(make_pack(cfg.seq_len, eot_id, pad_id), SHARD_SCHEMA)
        .withColumn("l1", F.col("path")[0])
        .sortWithinPartitions("l1", "leaf", "seq_id")
    )  # leaf-sorted files: a subtree is a few row groups
    # Without a row limit a leaf-sorted file is one row group: a shuffle window of whole row groups would then
    # hold a few leaves at a time, and training would see the corpus subtree by subtree.
    (
        shards.write.mode("overwrite")
        .option("parquet.block.row.count.limit", cfg.row_group_sequences)
        .partitionBy("l1")
        .parquet(os.path.join(run_dir, "shards"))
    )
    return leaf_tokens


def pack_stage(spark: SparkSession, cfg: JobConfig, run_dir: str, passes_of: dict[str, int]) -> dict:
    """Tokenize the routed documents, write routed/ and shards/, and check that shards/ lists every document once
    per pass. ``passes_of``: input file URI -> passes (the data mix; empty: once each)."""
    docs = spark.read.parquet(os.path.join(run_dir, "documents"))
    routed = spark.read.parquet(os.path.join(run_dir, "work", "routed"))  # pipeline/fit.py: doc_id, path, leaf
    n_docs = routed.count()
    tok, eot_id, pad_id = load_or_train_tokenizer(spark, docs, cfg, n_docs)
    tok.save(os.path.join(run_dir, "tokenizer.json"))
    toks = write_tokens(spark, run_dir, docs, routed, tok, passes_of)
    distinct = write_routed(spark, run_dir, docs, toks)
    leaf_tokens = write_shards(run_dir, cfg, toks, eot_id, pad_id)

    written = spark.read.parquet(os.path.join(run_dir, "shards"))
    seq_stats = written.agg(
        F.count("*").alias("sequences"), F.sum("n_valid").alias("valid"), F.sum(F.size("doc_ids")).alias("docs")
    ).first()
    n_packed = int(toks.agg(F.sum("passes")).first()[0] or 0)
    if seq_stats["docs"] != n_packed:
        raise RuntimeError(
            f"pack: {n_docs} routed documents, {n_packed} with their passes, but {seq_stats['docs']} listed in shards"
        )
    leaf_seq = {r["leaf"]: r["count"] for r in written.groupBy("leaf").count().collect()}
    return {
        "vocab_size": tok.get_vocab_size(),
        "eot_id": eot_id,
        "pad_id": pad_id,
        "documents": n_docs,
        "documents_distinct": distinct,
        "documents_packed": n_packed,
        "sequences": seq_stats["sequences"],
        "tokens": int(toks.agg(F.sum("n_tokens")).first()[0]),
        "valid_tokens": int(seq_stats["valid"]),
        "leaf_tokens": {str(k): v for k, v in leaf_tokens.items()},
        "leaf_sequences": {str(k): v for k, v in leaf_seq.items()},
    }
