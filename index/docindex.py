"""The document index: every routed training document as a short code in the list of its leaf.

Owns the ``RUN/index/`` format (``hmem-index/2``):

    index/documents.faiss   IndexIVFPQ, L2. Inverted list j = the documents the job routed to leaf j
                            (its descent, not the nearest centroid); a code is the product quantisation
                            (``pq_m`` bytes) of the document's residual to leaf j's centroid.
    index/lists.ivfdata     the inverted lists (faiss OnDiskInvertedLists), memory-mapped: pq_m bytes of
                            code + 8 bytes of id per document, read only where a query probes
    index/documents.arrow   Arrow IPC, row r = the document with FAISS row r: doc_id, leaf, preview.
                            For display only; the neighbour vote never reads it.
    index/index.json        format, tree_version, n_documents, dim, n_leaves, pq_m, sizes; written last

A FAISS id carries its document's leaf, ``id = leaf << 40 | row``, so a neighbour vote needs nothing
but the codes it scans.

Build (``build_document_index``) never holds all vectors, or all codes, in one process:
  1. PQ codebooks are trained on a deterministic sample of ``routed/`` (every s-th row, at most
     ``train_sample`` rows): residuals to their leaf's centroid;
  2. ``routed/`` is streamed in batches; each ``shard_rows`` documents are encoded into a shard
     index written to ``index/shards/`` (RAM: one shard's codes, shard_rows x (pq_m + 8) bytes);
  3. the shards' lists are merged into ``lists.ivfdata`` (faiss.contrib.ondisk.merge_ondisk, which
     reads the shards memory-mapped) and the shards are removed.
Memory at 3 billion documents with pq_m=48: 168 GB of lists on disk, of which a query touches
``nprobe`` lists (pq_m=128: 408 GB, for a vote that matches the exact search's on near-ties too;
README, "The document index"); the quantizer holds the leaf centroids (65,536 x 384 x 4 B = 100 MB
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

from index.tree import Tree

FORMAT = "hmem-index/2"
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
    load), which would land in the middle of ``index.query --json``'s output."""
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
    index = faiss.IndexIVFPQ(quantizer, tree.dim, tree.k ** tree.depth, pq_m, 8)
    index.own_fields = True
    quantizer.this.disown()
    return index


def _leaves(batch: pa.RecordBatch, n_leaves: int, where: str) -> np.ndarray:
    leaf = batch.column("leaf").to_numpy(zero_copy_only=False).astype(np.int64)
    if leaf.min() < 0 or leaf.max() >= n_leaves:
        raise ValueError(f"{where}: leaf outside 0..{n_leaves - 1}; routed/ and tree/ come from different runs")
    return leaf


def build_document_index(run_dir: str, pq_m: int = PQ_M, train_sample: int = 100_000,
                         shard_rows: int = 4_000_000, log=print) -> dict:
    """Write RUN/index/ from RUN/tree/ and RUN/routed/ (see the module doc). Returns index.json."""
    t0 = time.time()
    tree = Tree.load(os.path.join(run_dir, "tree"))
    routed_dir = os.path.join(run_dir, "routed")
    if not os.path.isdir(routed_dir):
        raise FileNotFoundError(f"{routed_dir} is missing: run jobs/cluster_corpus.py to its routing stage first")
    if tree.dim % pq_m:
        raise ValueError(f"pq_m {pq_m} must divide the embedding dimension {tree.dim}")
    n_leaves = tree.k ** tree.depth
    manifest = read_json(os.path.join(run_dir, "manifest.json"), "is the cluster_corpus run finished?")
    n_routed = int(manifest["documents_routed"])
    leaf_centroids = np.ascontiguousarray(tree.centroids[-1], dtype=np.float32)

    # 1. codebooks from a deterministic sample of residuals
    every = max(1, -(-n_routed // train_sample))
    sample, seen = [], 0
    for batch in _batches(routed_dir, ["leaf", "embedding"]):
        take = np.flatnonzero((np.arange(seen, seen + batch.num_rows) % every) == 0)
        seen += batch.num_rows
        if len(take):
            part = batch.take(pa.array(take))
            x = embedding_matrix(part.column("embedding"), tree.dim, routed_dir)
            sample.append(x - leaf_centroids[_leaves(part, n_leaves, routed_dir)])
    if not seen:
        raise ValueError(f"{routed_dir} holds no routed documents")
    if seen != n_routed:
        raise ValueError(f"{routed_dir} holds {seen} documents, manifest.json says {n_routed}: the run is incomplete")
    residuals = np.concatenate(sample)
    index = _empty_index(tree, pq_m)
    if len(residuals) < 256:  # fewer points than centroids: FAISS would refuse; repeat them (small corpora only)
        residuals = np.tile(residuals, (-(-256 // len(residuals)), 1))
    index.pq.train(residuals)
    index.is_trained = True  # the coarse lists are the tree's leaves: nothing else to train
    log(f"index: PQ {pq_m}x8 bits trained on {len(residuals)} residuals ({time.time() - t0:.1f}s)")

    # 2. shards of codes, streamed
    out_dir = os.path.join(run_dir, "index")
    shard_dir = os.path.join(out_dir, "shards")
    shutil.rmtree(shard_dir, ignore_errors=True)
    os.makedirs(shard_dir)
    schema = pa.schema([("doc_id", pa.string()), ("leaf", pa.int64()), ("preview", pa.string())])
    arrow_tmp = os.path.join(out_dir, "documents.arrow.tmp")
    shards, shard, n, t1 = [], None, 0, time.time()

    def flush():
        path = os.path.join(shard_dir, f"shard-{len(shards):05d}.faiss")
        faiss.write_index(shard, path)
        shards.append(path)

    with pa.OSFile(arrow_tmp, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for batch in _batches(routed_dir, ["doc_id", "leaf", "embedding", "preview"]):
            where = f"{routed_dir} (rows {n}..{n + batch.num_rows - 1})"
            x = embedding_matrix(batch.column("embedding"), tree.dim, where)
            leaf = _leaves(batch, n_leaves, where)
            if shard is None:
                shard = faiss.clone_index(index)
            ids = (leaf << LEAF_SHIFT) | np.arange(n, n + len(leaf), dtype=np.int64)
            shard.add_core(len(leaf), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(leaf))
            writer.write_batch(pa.record_batch([batch.column("doc_id"), pa.array(leaf), batch.column("preview")],
                                               schema=schema))
            n += len(leaf)
            if shard.ntotal >= shard_rows:
                flush()
                shard = None
            rate = n / max(time.time() - t1, 1e-9)
            log(f"index: encoded {n:,}/{n_routed:,} documents, {rate:,.0f} docs/s, ETA {(n_routed - n) / rate:.0f}s")
    if shard is not None:
        flush()

    # 3. one on-disk lists file, merged from the memory-mapped shards
    from faiss.contrib.ondisk import merge_ondisk

    lists_path = os.path.join(out_dir, "lists.ivfdata")
    for stale in (lists_path, os.path.join(out_dir, "index.json")):
        if os.path.exists(stale):
            os.remove(stale)
    merge_ondisk(index, shards, lists_path)
    faiss_tmp = os.path.join(out_dir, "documents.faiss.tmp")
    faiss.write_index(index, faiss_tmp)
    del index
    shutil.rmtree(shard_dir)
    os.replace(faiss_tmp, os.path.join(out_dir, "documents.faiss"))
    os.replace(arrow_tmp, os.path.join(out_dir, "documents.arrow"))
    sizes = {name: os.path.getsize(os.path.join(out_dir, name)) for name in ("documents.faiss", "lists.ivfdata")}
    meta = {"format": FORMAT, "tree_version": tree.version, "n_documents": n, "dim": tree.dim, "n_leaves": n_leaves,
            "pq_m": pq_m, "index_bytes": sum(sizes.values()),
            "list_bytes_per_document": sizes["lists.ivfdata"] / n,
            "table_bytes_per_document": os.path.getsize(os.path.join(out_dir, "documents.arrow")) / n}
    # index.json last: its presence marks a complete index
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump(meta, f, indent=2)
    log(f"index: {n:,} documents, {meta['list_bytes_per_document']:.1f} bytes each in the lists "
        f"({time.time() - t0:.1f}s)")
    return meta


class DocumentIndex:
    """A loaded RUN/index/ (memory-mapped); ``search`` over bounded probes, ``search_leaves`` in given lists."""

    def __init__(self, index_dir: str, index: faiss.IndexIVFPQ, table: pa.Table, meta: dict, tree: Tree):
        self.dir, self.index, self.table, self.meta = index_dir, index, table, meta
        self.leaf_centroids = np.ascontiguousarray(tree.centroids[-1], dtype=np.float32)

    @classmethod
    def load(cls, run_dir: str, tree: Tree, tree_version: str) -> "DocumentIndex":
        """``tree_version``: ``tree.version``, which the caller has already computed."""
        index_dir = os.path.join(run_dir, "index")
        fix = f"build it with: python jobs/build_index.py --run {run_dir}"
        meta = read_json(os.path.join(index_dir, "index.json"), f"the run has no document index; {fix}")
        if meta.get("format") != FORMAT or meta.get("tree_version") != tree_version:
            raise TreeVersionError(f"{index_dir}/index.json: built for tree {meta.get('tree_version')!r} (format "
                                f"{meta.get('format')!r}), the run's tree is {tree_version!r} ({FORMAT}); {fix}")
        try:
            # lists.ivfdata is found next to documents.faiss wherever the run directory was moved
            with _quiet():
                index = faiss.read_index(os.path.join(index_dir, "documents.faiss"),
                                         faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
            table = pa.ipc.open_file(pa.memory_map(os.path.join(index_dir, "documents.arrow"))).read_all()
        except (RuntimeError, OSError, pa.ArrowInvalid) as e:
            raise ValueError(f"{index_dir} is corrupt or incomplete ({e}); {fix}") from e
        if index.ntotal != meta["n_documents"] or table.num_rows != meta["n_documents"]:
            raise ValueError(f"{index_dir}: index.json says {meta['n_documents']} documents, documents.faiss has "
                             f"{index.ntotal}, documents.arrow {table.num_rows}; {fix}")
        return cls(index_dir, index, table, meta, tree)

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
        """doc_id, leaf and preview of the given rows (display)."""
        # row by row: a few slices of the memory-mapped table, where take() would walk every chunk
        parts = [self.table.slice(int(r), 1) for r in rows]
        return {c: [p.column(c)[0].as_py() for p in parts] for c in ("doc_id", "leaf", "preview")}
