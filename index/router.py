"""Router: a run's tree + its FAISS document index; texts/embeddings -> paths, blocks, neighbours.

Owns the ``RUN/index/`` format:

    index/documents.faiss   IndexIVFFlat, inner product; inverted list j = the routed
                            documents of leaf j (local index), FAISS id = row of documents.arrow
    index/documents.arrow   Arrow IPC file, one row per FAISS id: doc_id, leaf, preview
    index/index.json        format, tree_version, n_documents, dim, n_leaves

Routing is index/route.py (the Spark job's code), so a routed document's path
from the router is its path in ``RUN/routed/``. The IVF coarse quantizer holds
the leaf centroids but is never used to assign: documents are added to, and
queries searched in, the list of the leaf their greedy descent reached (the
descent uses biases and parents, nearest-leaf-centroid does not).

Scores are inner products of L2-normalised embeddings, i.e. cosine similarity.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from index.route import Descender
from index.tree import Tree, local_index, path_block_ids

FORMAT = "hmem-index/1"
BUILD_BATCH = 65536  # routed rows per parquet batch while building: bounds the build's own memory


@dataclass
class Neighbour:
    doc_id: str
    score: float
    leaf: int
    preview: str


class TreeVersionError(ValueError):
    pass


def _read_json(path: str, what: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: {what}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is corrupt ({e}): {what}") from e


def _embedding_matrix(column: pa.ChunkedArray | pa.Array, dim: int, where: str) -> np.ndarray:
    """list<float32> column -> float32 [n, dim], without a Python loop over rows."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = arr.value_lengths().to_numpy(zero_copy_only=False)
    if arr.null_count or (lengths != dim).any():
        raise ValueError(f"{where}: embeddings must be non-null lists of {dim} floats")
    return np.ascontiguousarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)


def build_document_index(run_dir: str) -> dict:
    """Write RUN/index/ from RUN/tree/ and RUN/routed/, streaming routed/ in batches. Returns index.json."""
    tree = Tree.load(os.path.join(run_dir, "tree"))
    routed_dir = os.path.join(run_dir, "routed")
    if not os.path.isdir(routed_dir):
        raise FileNotFoundError(f"{routed_dir} is missing: run jobs/cluster_corpus.py to its routing stage first")
    n_leaves = tree.k ** tree.depth
    quantizer = faiss.IndexFlatIP(tree.dim)
    quantizer.add(tree.centroids[-1])
    ivf = faiss.IndexIVFFlat(quantizer, tree.dim, n_leaves, faiss.METRIC_INNER_PRODUCT)
    ivf.is_trained = True  # the lists are the tree's leaves: nothing to train

    out_dir = os.path.join(run_dir, "index")
    os.makedirs(out_dir, exist_ok=True)
    schema = pa.schema([("doc_id", pa.string()), ("leaf", pa.int64()), ("preview", pa.string())])
    arrow_tmp = os.path.join(out_dir, "documents.arrow.tmp")
    dataset = ds.dataset(routed_dir, format="parquet", partitioning="hive")
    n = 0
    with pa.OSFile(arrow_tmp, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        # files in sorted path order: FAISS ids are deterministic for a given run
        for batch in dataset.to_batches(columns=["doc_id", "leaf", "embedding", "preview"], batch_size=BUILD_BATCH):
            if batch.num_rows == 0:
                continue
            where = f"{routed_dir} (rows {n}..{n + batch.num_rows - 1})"
            x = _embedding_matrix(batch.column("embedding"), tree.dim, where)
            leaf = batch.column("leaf").to_numpy(zero_copy_only=False).astype(np.int64)
            if leaf.min() < 0 or leaf.max() >= n_leaves:
                raise ValueError(f"{where}: leaf outside 0..{n_leaves - 1}; routed/ and tree/ come from different runs")
            ids = np.arange(n, n + len(leaf), dtype=np.int64)
            ivf.add_core(len(leaf), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(leaf))
            writer.write_batch(pa.record_batch([batch.column("doc_id"), pa.array(leaf), batch.column("preview")],
                                               schema=schema))
            n += len(leaf)
    if n == 0:
        raise ValueError(f"{routed_dir} holds no routed documents")
    faiss_tmp = os.path.join(out_dir, "documents.faiss.tmp")
    faiss.write_index(ivf, faiss_tmp)
    meta = {"format": FORMAT, "tree_version": tree.version, "n_documents": n, "dim": tree.dim, "n_leaves": n_leaves}
    # index.json last: its presence marks a complete index
    os.replace(faiss_tmp, os.path.join(out_dir, "documents.faiss"))
    os.replace(arrow_tmp, os.path.join(out_dir, "documents.arrow"))
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


class Router:
    """Load with ``Router.load(run_dir)``; all methods are batched over queries."""

    def __init__(self, run_dir: str, tree: Tree, manifest: dict, documents: faiss.IndexIVF | None,
                 doc_table: pa.Table | None):
        self.run_dir, self.tree, self.manifest = run_dir, tree, manifest
        self.documents, self.doc_table = documents, doc_table
        self.descender = Descender(tree)
        self._encoder = None

    @classmethod
    def load(cls, run_dir: str, documents: bool = True) -> "Router":
        """``documents=False`` skips the document index (routing and blocks only)."""
        if not os.path.isdir(run_dir):
            raise FileNotFoundError(f"run directory {run_dir} does not exist")
        tree = Tree.load(os.path.join(run_dir, "tree"))
        manifest = _read_json(os.path.join(run_dir, "manifest.json"), "is the cluster_corpus run finished?")
        if manifest.get("tree_version") != tree.version:
            raise TreeVersionError(f"{run_dir}: manifest.json has tree_version {manifest.get('tree_version')!r} "
                                   f"but tree/ is {tree.version!r}; the run directory mixes two runs")
        if not documents:
            return cls(run_dir, tree, manifest, None, None)
        index_dir = os.path.join(run_dir, "index")
        fix = f"build it with: python jobs/build_index.py --run {run_dir}"
        meta = _read_json(os.path.join(index_dir, "index.json"), f"the run has no document index; {fix}")
        if meta.get("format") != FORMAT or meta.get("tree_version") != tree.version:
            raise TreeVersionError(f"{index_dir}/index.json: built for tree {meta.get('tree_version')!r} "
                                   f"(format {meta.get('format')!r}), the run's tree is {tree.version!r}; {fix}")
        try:
            # codes stay in the page cache, shared between processes, not copied into each
            index = faiss.read_index(os.path.join(index_dir, "documents.faiss"),
                                     faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
            table = pa.ipc.open_file(pa.memory_map(os.path.join(index_dir, "documents.arrow"))).read_all()
        except (RuntimeError, OSError, pa.ArrowInvalid) as e:
            raise ValueError(f"{index_dir} is corrupt or incomplete ({e}); {fix}") from e
        if index.ntotal != meta["n_documents"] or table.num_rows != meta["n_documents"]:
            raise ValueError(f"{index_dir}: index.json says {meta['n_documents']} documents, documents.faiss has "
                             f"{index.ntotal}, documents.arrow {table.num_rows}; {fix}")
        return cls(run_dir, tree, manifest, index, table)

    @property
    def tree_version(self) -> str:
        return self.tree.version

    def check_tree_version(self, version: str) -> None:
        """Refuse a model trained on another tree: its block ids would name other nodes."""
        if version != self.tree.version:
            raise TreeVersionError(f"the model was trained on tree {version!r} but {self.run_dir} holds tree "
                                   f"{self.tree.version!r}; query it with the run directory it was trained on")

    def embed(self, texts: list[str], precision: str | None = None) -> np.ndarray:
        """Embed as the job did (windows, encoder precision); another ``precision`` is refused."""
        from index.encoder import PrecisionMismatch, embed_texts, load_encoder, run_precision

        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"query {i} is empty: give some text to route")
        run = run_precision(self.manifest, self.tree.config)
        if precision not in (None, run):
            raise PrecisionMismatch(f"{self.run_dir} was embedded at encoder precision {run!r}; {precision!r} "
                                    f"embeddings would route differently from its documents")
        if self._encoder is None:
            self._encoder = load_encoder(precision=run)
        windows = int(self.manifest.get("config", {}).get("max_windows", 1))
        return embed_texts(self._encoder, texts, batch_size=64, max_windows=windows)

    def route_embeddings(self, x: np.ndarray) -> np.ndarray:
        """Paths [N, p] (int32) of L2-normalised embeddings [N, dim]."""
        return self.descender.route(np.atleast_2d(x))

    def route_texts(self, texts: list[str]) -> np.ndarray:
        return self.route_embeddings(self.embed(texts))

    def blocks(self, paths: np.ndarray) -> np.ndarray:
        """Global block ids [N, p] of each path's nodes (index/tree.py numbering)."""
        return path_block_ids(paths, self.tree.k)

    def leaves(self, paths: np.ndarray) -> np.ndarray:
        return local_index(np.atleast_2d(paths), self.tree.k, self.tree.depth)

    def node_stats(self, paths: np.ndarray) -> list[list[dict]]:
        """Per query, per level: local index, block id, documents and tokens of that node (manifest.json)."""
        paths = np.atleast_2d(paths)
        blocks = self.blocks(paths)
        levels = self.manifest["levels"]
        out = []
        for q in range(paths.shape[0]):
            rows = []
            for l in range(self.tree.depth):
                local = int(local_index(paths[q:q + 1], self.tree.k, l + 1)[0])
                rows.append({"level": l + 1, "local": local, "block": int(blocks[q, l]),
                             "documents": int(levels[l]["node_documents"][local]),
                             "tokens": int(levels[l]["node_tokens"][local])})
            out.append(rows)
        return out

    def neighbours(self, x: np.ndarray, n: int, within_leaf: bool) -> list[list[Neighbour]]:
        """The n nearest routed documents of each embedding, in its own leaf or over the whole corpus."""
        if self.documents is None:
            raise ValueError(f"{self.run_dir}: router loaded without the document index")
        x = np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)
        if within_leaf:
            lists = self.leaves(self.route_embeddings(x))[:, None]
            self.documents.nprobe = 1  # the query's own leaf
            scores, ids = self.documents.search_preassigned(x, n, lists, np.zeros(lists.shape, dtype=np.float32))
        else:
            self.documents.nprobe = self.documents.nlist  # every list: an exact search over all documents
            scores, ids = self.documents.search(x, n)
        doc_id, leaf, preview = (self.doc_table.column(c) for c in ("doc_id", "leaf", "preview"))
        return [[Neighbour(doc_id[int(i)].as_py(), float(s), leaf[int(i)].as_py(), preview[int(i)].as_py())
                 for s, i in zip(srow, irow) if i >= 0] for srow, irow in zip(scores, ids)]
