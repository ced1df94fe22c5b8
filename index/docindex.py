"""The document index: every routed training document as a short code in the list of its leaf.

Owns the ``RUN/index/`` format (``hmem-index/3``). One entry per *distinct* routed document: copies
(routed/ ``first_copy`` false: the same embedding as a document with a smaller id, pipeline/pack.py)
are one piece of evidence, so the index holds the first and counts the others (``copies``). A vote
over it gives the same leaf whether a text is in the corpus once or a thousand times.


    index/documents.faiss   IndexIVFPQ, L2. Inverted list j = the documents the job routed to leaf j
                            (its descent, not the nearest centroid); a code is the product quantisation
                            (``pq_m`` bytes) of the document's residual to leaf j's centroid.
    index/lists.ivfdata     the inverted lists (faiss OnDiskInvertedLists), memory-mapped: pq_m bytes of
                            code + 8 bytes of id per document, read only where a query probes
    index/documents.arrow   Arrow IPC, row r = the document with FAISS row r: doc_id, leaf, preview, copies.
                            For display only; the neighbour vote never reads it.
    index/terms.bin         row r's Bloom filter of its words (index/terms.py, BLOOM_BYTES each),
                            memory-mapped: the vote reads the rows of its neighbours only
    index/df.npy            document frequency per term bucket (uint32 [DF_BUCKETS]), for the IDF weights
    index/index.json        format, tree_version, n_documents (distinct), n_routed, dim, n_leaves, pq_m,
                            sizes; written last

A FAISS id carries its document's leaf, ``id = leaf << 40 | row``, so a neighbour vote needs nothing
but the codes it scans.

Build (``build_document_index``) never holds all vectors, or all codes, in one process:
  1. PQ codebooks are trained on a sample of the distinct documents chosen by their content (a hash
     of the embedding, at most about ``train_sample`` rows), sorted by it: the same codebooks
     whatever the copies or the file order of routed/;
  2. ``routed/`` is streamed in batches; each ``shard_rows`` documents are encoded into a shard
     index written to ``index/shards/`` (RAM: one shard's codes, shard_rows x (pq_m + 8) bytes);
  3. the shards' lists are merged into ``lists.ivfdata`` (faiss.contrib.ondisk.merge_ondisk, which
     reads the shards memory-mapped) and the shards are removed.
Memory at 3 billion documents with pq_m=48: 168 GB of lists on disk (and 1.5 TB of Bloom filters), of which a query
touches ``nprobe`` lists (pq_m=128: 408 GB, for a vote that matches the exact search's on near-ties too;
docs/DESIGN.md, "The document index"); the quantizer holds the leaf centroids (65,536 x 384 x 4 B = 100 MB
at k=16, p=4).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from index import terms as lexical
from index.rundir import read_manifest
from index.tree import Tree

FORMAT = "hmem-index/3"
LEAF_SHIFT = 40  # id = leaf << 40 | row: 2^40 documents, 2^23 leaves
ROW_MASK = (1 << LEAF_SHIFT) - 1
BATCH_ROWS = 65536  # routed rows per streamed batch
PQ_M = 48  # bytes of code per document (384 / 48 = 8 dimensions per sub-quantizer)


class TreeVersionError(ValueError):
    """Two artefacts (tree, manifest, index, model) that come from different trees."""


@dataclass
class Hits:
    """The m nearest documents of each query; -1 rows / NaN similarities where a query found fewer."""

    sims: np.ndarray  # [N, m] float32, approximate cosine similarity (1 - ||x - y||^2 / 2 on unit vectors)
    rows: np.ndarray  # [N, m] int64, row of documents.arrow
    leaves: np.ndarray  # [N, m] int64, leaf (local index) of each document


def read_json(path: str, what: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: {what}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is corrupt ({e}): {what}") from e


def read_index_meta(run_dir: str) -> dict:
    """RUN/index/index.json (the caller checks its format against the tree it holds)."""
    fix = f"build it with: python jobs/build_index.py --run {run_dir}"
    return read_json(os.path.join(run_dir, "index", "index.json"), f"the run has no document index; {fix}")


def embedding_matrix(column: pa.ChunkedArray | pa.Array, dim: int, where: str) -> np.ndarray:
    """list<float32> column -> float32 [n, dim], without a Python loop over rows."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = arr.value_lengths().to_numpy(zero_copy_only=False)
    if arr.null_count or (lengths != dim).any():
        raise ValueError(f"{where}: embeddings must be non-null lists of {dim} floats")
    return np.ascontiguousarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)


@contextlib.contextmanager
def _quiet():
    """Silence file descriptors 1 and 2 for a moment: FAISS's C++ prints there (a line per on-disk index
    load), which would land in the middle of ``hmem.query --json``'s output."""
    import ctypes

    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        libc.fflush(None)  # C's buffered stdout goes to /dev/null, not to the restored descriptor
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)


def _batches(routed_dir: str, columns: list[str]):
    """routed/ in sorted file order (deterministic FAISS rows), as record batches."""
    dataset = ds.dataset(routed_dir, format="parquet", partitioning="hive")
    for batch in dataset.to_batches(columns=columns, batch_size=BATCH_ROWS):
        if batch.num_rows:
            yield batch


def _empty_index(tree: Tree, pq_m: int) -> faiss.IndexIVFPQ:
    quantizer = faiss.IndexFlatL2(tree.dim)
    quantizer.add(np.ascontiguousarray(tree.centroids[-1], dtype=np.float32))
    index = faiss.IndexIVFPQ(quantizer, tree.dim, tree.k**tree.depth, pq_m, 8)
    index.own_fields = True
    quantizer.this.disown()
    return index


def _leaves(batch: pa.RecordBatch, n_leaves: int, where: str) -> np.ndarray:
    leaf = batch.column("leaf").to_numpy(zero_copy_only=False).astype(np.int64)
    if leaf.min() < 0 or leaf.max() >= n_leaves:
        raise ValueError(f"{where}: leaf outside 0..{n_leaves - 1}; routed/ and tree/ come from different runs")
    return leaf


ROUTED_COLUMNS = ["doc_id", "leaf", "embedding", "preview", "copies", "first_copy", "terms"]
DISPLAY_SCHEMA = pa.schema(  # documents.arrow
    [("doc_id", pa.string()), ("leaf", pa.int64()), ("preview", pa.string()), ("copies", pa.int64())]
)


def content_key(x: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """A 64-bit hash of each embedding's bits (uint64 [n]): equal vectors, equal keys, in any file order."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    mult = (np.arange(bits.shape[1], dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)
    h = np.empty(len(bits), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for a in range(
            0, len(bits), chunk
        ):  # chunks: the uint64 products of a whole batch would be 8 bytes a dimension
            h[a : a + chunk] = (bits[a : a + chunk].astype(np.uint64) * mult).sum(axis=1, dtype=np.uint64)
        return (h ^ (h >> np.uint64(29))) * np.uint64(0xBF58476D1CE4E5B9)


def _check_columns(routed_dir: str, run_dir: str) -> None:
    names = set(ds.dataset(routed_dir, format="parquet", partitioning="hive").schema.names)
    missing = [c for c in ROUTED_COLUMNS if c not in names]
    if missing:
        raise ValueError(
            f"{routed_dir} has no column {', '.join(missing)}: it was written by an older job; rerun "
            f"spark-submit jobs/cluster_corpus.py --output {run_dir} into a new directory (with --tree "
            f"{run_dir} to keep the tree) and build the index there"
        )


def _codebook_sample(
    routed_dir: str, tree: Tree, n_leaves: int, n_routed: int, n_distinct: int, train_sample: int
) -> np.ndarray:
    """Step 1's training points: the residuals to their leaf centroid of the distinct documents whose content
    key falls in the sample (about ``train_sample``), sorted by that key. This pass also checks that routed/
    holds the manifest's documents."""
    leaf_centroids = np.ascontiguousarray(tree.centroids[-1], dtype=np.float32)
    every = np.uint64(max(1, -(-n_distinct // train_sample)))
    sample, keys, seen = [], [], 0
    for batch in _batches(routed_dir, ["leaf", "embedding", "first_copy"]):
        seen += batch.num_rows
        x = embedding_matrix(batch.column("embedding"), tree.dim, routed_dir)
        key = content_key(x)
        take = np.flatnonzero(batch.column("first_copy").to_numpy(zero_copy_only=False) & (key % every == 0))
        if len(take):
            sample.append(x[take] - leaf_centroids[_leaves(batch, n_leaves, routed_dir)[take]])
            keys.append(key[take])
    if not seen:
        raise ValueError(f"{routed_dir} holds no routed documents")
    if seen != n_routed:
        raise ValueError(f"{routed_dir} holds {seen} documents, manifest.json says {n_routed}: the run is incomplete")
    return np.concatenate(sample)[np.argsort(np.concatenate(keys), kind="stable")]


def _write_terms(batch: pa.RecordBatch, bloom, df: np.ndarray) -> None:
    """A batch's rows of terms.bin (Bloom filters of its words) and their counts in the frequency buckets ``df``."""
    words = batch.column("terms")  # uint32 bits stored as int32 (pipeline/pack.py)
    hashes = words.flatten().to_numpy(zero_copy_only=False).astype(np.int32).view(np.uint32)
    bloom.write(lexical.blooms(hashes, words.value_lengths().to_numpy(zero_copy_only=False)).tobytes())
    bucket, count = np.unique(lexical.df_buckets(hashes), return_counts=True)
    df[bucket] += count.astype(np.uint32)


def _first_copies(routed_dir: str, tree: Tree, n_leaves: int):
    """Step 2's input: routed/'s batches of first copies (copies add nothing to the index), checked, as
    (routed rows read so far, batch, embeddings, leaves)."""
    done = 0
    for batch in _batches(routed_dir, ROUTED_COLUMNS):
        where = f"{routed_dir} (rows {done}..{done + batch.num_rows - 1})"
        done += batch.num_rows
        batch = batch.filter(batch.column("first_copy"))
        if batch.num_rows:
            yield (
                done,
                batch,
                embedding_matrix(batch.column("embedding"), tree.dim, where),
                _leaves(batch, n_leaves, where),
            )


def _display_batch(batch: pa.RecordBatch, leaf: np.ndarray) -> pa.RecordBatch:
    """A batch's rows of documents.arrow: the routed columns a query displays, with the checked leaves."""
    return pa.record_batch(
        [batch.column(c) for c in ("doc_id",)] + [pa.array(leaf)] + [batch.column(c) for c in ("preview", "copies")],
        schema=DISPLAY_SCHEMA,
    )


def _log_progress(log, done: int, n: int, n_routed: int, t1: float) -> None:
    """Step 2's progress line after each batch: a build over billions of documents runs for hours."""
    rate = done / max(time.time() - t1, 1e-9)
    log(
        f"index: {done:,}/{n_routed:,} routed documents read, {n:,} distinct encoded, {rate:,.0f} docs/s, "
        f"ETA {(n_routed - done) / rate:.0f}s"
    )


def _encode_shards(
    index: faiss.IndexIVFPQ,
    routed_dir: str,
    out_dir: str,
    tree: Tree,
    n_leaves: int,
    n_routed: int,
    shard_rows: int,
    log,
) -> tuple[list[str], int, np.ndarray]:
    """Step 2: routed/'s first copies streamed into shard indexes under index/shards/ and into the display table
    and Bloom filters (``.tmp`` until the index is complete). Returns the shard paths, the documents encoded
    and the document frequency per term bucket."""
    shard_dir = os.path.join(out_dir, "shards")
    shutil.rmtree(shard_dir, ignore_errors=True)
    os.makedirs(shard_dir)
    arrow_tmp, terms_tmp = os.path.join(out_dir, "documents.arrow.tmp"), os.path.join(out_dir, "terms.bin.tmp")
    df = np.zeros(lexical.DF_BUCKETS, dtype=np.uint32)
    shards, shard, n, done, t1 = [], None, 0, 0, time.time()

    def flush():
        path = os.path.join(shard_dir, f"shard-{len(shards):05d}.faiss")
        faiss.write_index(shard, path)
        shards.append(path)

    with (
        pa.OSFile(arrow_tmp, "wb") as sink,
        pa.ipc.new_file(sink, DISPLAY_SCHEMA) as writer,
        open(terms_tmp, "wb") as bloom,
    ):
        for done, batch, x, leaf in _first_copies(routed_dir, tree, n_leaves):
            if shard is None:
                shard = faiss.clone_index(index)
            ids = (leaf << LEAF_SHIFT) | np.arange(n, n + len(leaf), dtype=np.int64)
            shard.add_core(len(leaf), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(leaf))
            writer.write_batch(_display_batch(batch, leaf))
            _write_terms(batch, bloom, df)
            n += len(leaf)
            if shard.ntotal >= shard_rows:
                flush()
                shard = None
            _log_progress(log, done, n, n_routed, t1)
    if shard is not None:
        flush()
    if done != n_routed:
        raise ValueError(f"{routed_dir} holds {done} documents, manifest.json says {n_routed}: the run is incomplete")
    return shards, n, df


def _merge_shards(index: faiss.IndexIVFPQ, shards: list[str], out_dir: str) -> None:
    """Step 3: the shards' lists merged into lists.ivfdata, and documents.faiss.tmp, the trained index that reads
    them from there (a stale lists file or index.json is removed first)."""
    from faiss.contrib.ondisk import merge_ondisk

    lists_path = os.path.join(out_dir, "lists.ivfdata")
    for stale in (lists_path, os.path.join(out_dir, "index.json")):
        if os.path.exists(stale):
            os.remove(stale)
    merge_ondisk(index, shards, lists_path)
    faiss.write_index(index, os.path.join(out_dir, "documents.faiss.tmp"))


def _index_meta(out_dir: str, tree: Tree, n: int, n_routed: int, pq_m: int) -> dict:
    """index.json's content, from the files in place."""
    sizes = {name: os.path.getsize(os.path.join(out_dir, name)) for name in ("documents.faiss", "lists.ivfdata")}
    return {
        "format": FORMAT,
        "tree_version": tree.version,
        "n_documents": n,
        "n_routed": n_routed,
        "dim": tree.dim,
        "n_leaves": tree.k**tree.depth,
        "pq_m": pq_m,
        "bloom_bytes": lexical.BLOOM_BYTES,
        "df_buckets": lexical.DF_BUCKETS,
        "index_bytes": sum(sizes.values()),
        "list_bytes_per_document": sizes["lists.ivfdata"] / n,
        "table_bytes_per_document": os.path.getsize(os.path.join(out_dir, "documents.arrow")) / n,
    }


def _codebooks_of(src_run: str, tree: Tree, pq_m: int) -> np.ndarray:
    """The PQ centroids of ``src_run``'s index, which must be built on the same tree with the same ``pq_m``."""
    meta = read_index_meta(src_run)
    if meta.get("format") != FORMAT or meta.get("tree_version") != tree.version or meta.get("pq_m") != pq_m:
        raise TreeVersionError(
            f"{src_run}/index: format {meta.get('format')!r}, tree {meta.get('tree_version')!r}, pq_m "
            f"{meta.get('pq_m')}; its codebooks fit an index of {FORMAT}, tree {tree.version!r}, pq_m {pq_m} only"
        )
    with _quiet():
        src = faiss.read_index(
            os.path.join(src_run, "index", "documents.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
        )
    return faiss.vector_to_array(faiss.downcast_index(src).pq.centroids)


def build_document_index(
    run_dir: str,
    pq_m: int = PQ_M,
    train_sample: int = 100_000,
    shard_rows: int = 4_000_000,
    log=print,
    codebooks_from: str | None = None,
) -> dict:
    """Write RUN/index/ from RUN/tree/ and RUN/routed/ (see the module doc). Returns index.json.

    ``codebooks_from``: a run on the same tree whose index's PQ codebooks are taken instead of trained (hmem.forget
    and hmem.learn): every document both runs hold gets the same code, so a query's similarity to it is unchanged
    and only the documents that came or went can move a route."""
    t0 = time.time()
    tree = Tree.load(os.path.join(run_dir, "tree"))
    routed_dir = os.path.join(run_dir, "routed")
    if not os.path.isdir(routed_dir):
        raise FileNotFoundError(f"{routed_dir} is missing: run jobs/cluster_corpus.py to its routing stage first")
    if tree.dim % pq_m:
        raise ValueError(f"pq_m {pq_m} must divide the embedding dimension {tree.dim}")
    _check_columns(routed_dir, run_dir)
    n_leaves = tree.k**tree.depth
    manifest = read_manifest(run_dir, {"documents_routed": int, "documents_distinct": int})
    n_routed, n_distinct = manifest["documents_routed"], manifest["documents_distinct"]

    # 1. codebooks from a content-chosen sample of the distinct documents' residuals (or another run's)
    index = _empty_index(tree, pq_m)
    if codebooks_from:
        faiss.copy_array_to_vector(_codebooks_of(codebooks_from, tree, pq_m), index.pq.centroids)
        log(f"index: PQ {pq_m}x8 bits from {codebooks_from}/index")
    else:
        residuals = _codebook_sample(routed_dir, tree, n_leaves, n_routed, n_distinct, train_sample)
        if len(residuals) < 256:  # fewer points than centroids: FAISS would refuse; repeat them (small corpora)
            residuals = np.tile(residuals, (-(-256 // len(residuals)), 1))
        index.pq.train(residuals)
        log(f"index: PQ {pq_m}x8 bits trained on {len(residuals)} residuals ({time.time() - t0:.1f}s)")
    index.is_trained = True  # the coarse lists are the tree's leaves: nothing else to train

    # 2. shards of codes, the display table and the Bloom filters, streamed
    out_dir = os.path.join(run_dir, "index")
    shards, n, df = _encode_shards(index, routed_dir, out_dir, tree, n_leaves, n_routed, shard_rows, log)
    if n != n_distinct:
        raise ValueError(f"{routed_dir} holds {n} first copies, manifest.json says {n_distinct} distinct documents")

    # 3. one on-disk lists file, merged from the memory-mapped shards; then the files move into place
    _merge_shards(index, shards, out_dir)
    del index
    shutil.rmtree(os.path.join(out_dir, "shards"))
    np.save(os.path.join(out_dir, "df.npy"), df)
    for name in ("documents.faiss", "documents.arrow", "terms.bin"):
        os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
    meta = _index_meta(out_dir, tree, n, n_routed, pq_m)
    meta["codebooks_from"] = os.path.abspath(codebooks_from) if codebooks_from else None
    # index.json last: its presence marks a complete index
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump(meta, f, indent=2)
    log(
        f"index: {n:,} distinct of {n_routed:,} routed documents, {meta['list_bytes_per_document']:.1f} bytes each "
        f"in the lists + {lexical.BLOOM_BYTES} of Bloom filter ({time.time() - t0:.1f}s)"
    )
    return meta


class DocumentIndex:
    """A loaded RUN/index/ (memory-mapped); ``search`` over bounded probes, ``search_leaves`` in given lists."""

    def __init__(
        self,
        index_dir: str,
        index: faiss.IndexIVFPQ,
        table: pa.Table,
        meta: dict,
        tree: Tree,
        filters: np.ndarray,
        df: np.ndarray,
    ):
        self.dir, self.index, self.table, self.meta = index_dir, index, table, meta
        self.leaf_centroids = np.ascontiguousarray(tree.centroids[-1], dtype=np.float32)
        self.filters, self.df = filters, df  # memory-mapped: [n, BLOOM_BYTES] uint8, [DF_BUCKETS] uint32

    @classmethod
    def load(cls, run_dir: str, tree: Tree, tree_version: str) -> "DocumentIndex":
        """``tree_version``: ``tree.version``, which the caller has already computed."""
        index_dir = os.path.join(run_dir, "index")
        fix = f"build it with: python jobs/build_index.py --run {run_dir}"
        meta = read_index_meta(run_dir)
        if meta.get("format") != FORMAT or meta.get("tree_version") != tree_version:
            raise TreeVersionError(
                f"{index_dir}/index.json: built for tree {meta.get('tree_version')!r} (format "
                f"{meta.get('format')!r}), the run's tree is {tree_version!r} ({FORMAT}); {fix}"
            )
        try:
            # lists.ivfdata is found next to documents.faiss wherever the run directory was moved
            with _quiet():
                index = faiss.read_index(
                    os.path.join(index_dir, "documents.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
                )
            table = pa.ipc.open_file(pa.memory_map(os.path.join(index_dir, "documents.arrow"))).read_all()
            filters = np.memmap(
                os.path.join(index_dir, "terms.bin"),
                dtype=np.uint8,
                mode="r",
                shape=(meta["n_documents"], meta["bloom_bytes"]),
            )
            df = np.load(os.path.join(index_dir, "df.npy"), mmap_mode="r")
        except (RuntimeError, OSError, ValueError, pa.ArrowInvalid) as e:
            raise ValueError(f"{index_dir} is corrupt or incomplete ({e}); {fix}") from e
        if index.ntotal != meta["n_documents"] or table.num_rows != meta["n_documents"]:
            raise ValueError(
                f"{index_dir}: index.json says {meta['n_documents']} documents, documents.faiss has "
                f"{index.ntotal}, documents.arrow {table.num_rows}; {fix}"
            )
        if meta["bloom_bytes"] != lexical.BLOOM_BYTES or df.shape != (lexical.DF_BUCKETS,):
            raise ValueError(
                f"{index_dir}: word filters of {meta['bloom_bytes']} bytes / {df.shape[0]} frequency "
                f"buckets, this code reads {lexical.BLOOM_BYTES} / {lexical.DF_BUCKETS}; {fix}"
            )
        return cls(index_dir, index, table, meta, tree, filters, df)

    def word_share(self, queries: list[list[int]] | list[np.ndarray], rows: np.ndarray) -> np.ndarray:
        """Per query i and hit j: the IDF-weighted share of query i's terms (index.terms.term_hashes) that
        document ``rows[i, j]`` holds (Bloom filter: a false positive adds a word at ~3%); 0 where rows < 0."""
        out = np.zeros(rows.shape, dtype=np.float64)
        n = self.meta["n_documents"]
        for i, hashes in enumerate(queries):
            hashes = np.asarray(hashes, dtype=np.uint32)
            weight = lexical.idf(hashes, self.df, n)
            ok = rows[i] >= 0
            if not len(hashes) or weight.sum() <= 0 or not ok.any():
                continue
            held = lexical.contains(np.asarray(self.filters[rows[i][ok]]), hashes)  # [hits, terms]
            out[i, ok] = held @ weight / weight.sum()
        return out

    @property
    def n_lists(self) -> int:
        return self.index.nlist

    def _hits(self, dist: np.ndarray, ids: np.ndarray) -> Hits:
        found = ids >= 0
        sims = np.where(found, 1.0 - dist / 2.0, np.nan).astype(np.float32)
        return Hits(sims, np.where(found, ids & ROW_MASK, -1), np.where(found, ids >> LEAF_SHIFT, -1))

    def search(self, x: np.ndarray, m: int, nprobe: int) -> Hits:
        """The m nearest documents of each row of x [N, dim] among the ``nprobe`` lists nearest to it."""
        self.index.nprobe = min(nprobe, self.n_lists)
        dist, ids = self.index.search(np.ascontiguousarray(x, dtype=np.float32), m)
        return self._hits(dist, ids)

    def search_leaves(self, x: np.ndarray, leaves: np.ndarray, m: int) -> Hits:
        """The m nearest documents of each row of x within the lists ``leaves`` [N, L]."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        leaves = np.ascontiguousarray(leaves, dtype=np.int64)
        self.index.nprobe = leaves.shape[1]
        # the coarse distances enter IVFPQ's distance when it uses precomputed tables: give the true ones
        coarse = ((x[:, None, :] - self.leaf_centroids[leaves]) ** 2).sum(-1, dtype=np.float32)
        dist, ids = self.index.search_preassigned(x, m, leaves, np.ascontiguousarray(coarse))
        return self._hits(dist, ids)

    def documents(self, rows: np.ndarray) -> dict[str, list]:
        """doc_id, leaf, preview and copies of the given rows (display)."""
        # row by row: a few slices of the memory-mapped table, where take() would walk every chunk
        parts = [self.table.slice(int(r), 1) for r in rows]
        return {c: [p.column(c)[0].as_py() for p in parts] for c in ("doc_id", "leaf", "preview", "copies")}
