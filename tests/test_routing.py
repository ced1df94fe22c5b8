"""What a prompt fetches, on runs of the real job: copies of a document do not move any route, and a
training document's own text and its sentences route to its stored leaf (the demo run too, when built)."""

import os

import numpy as np
import pytest

from bench.routing_check import sample_documents, second_sentence
from index.docindex import Hits, build_document_index
from index.router import Router, leading_path, vote, vote_weights
from index.routing import MODES, RoutingConfig
from corpora.bbc import write_jsonl
from tests.spark_helpers import SMALL, manifest, read_table, submit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_RUN = os.path.join(ROOT, "runs", "demo")
QUESTIONS = [
    "The prime minister said",
    "Who won the cup final?",
    "Shares in the bank fell",
    "The film won an award",
    "A new mobile phone",
]


@pytest.fixture(scope="module")
def pair(bbc_run, tmp_path_factory):
    """Run A: 48 BBC articles (conftest.py bbc_run). Run B: the same corpus, eight of them with 1-6 extra copies
    (new ids), routed into A's frozen tree (so every document keeps its leaf). Both indexed."""
    d = tmp_path_factory.mktemp("copies")
    a, recs = bbc_run["run"], bbc_run["recs"]
    copies = [{"id": f"{r['id']}-copy{j}", "text": r["text"]} for i, r in enumerate(recs[:8]) for j in range(1 + i % 6)]
    write_jsonl(d / "b.jsonl", recs + copies)
    b = tmp_path_factory.mktemp("run") / "b"
    p = submit(["--input", str(d / "b.jsonl"), "--id-column", "id", "--output", str(b), *SMALL, "--tree", str(a)])
    assert p.returncode == 0, p.stdout[-4000:]
    build_document_index(str(b), log=lambda m: None)
    return a, b, recs, copies, p.stdout


@pytest.mark.slow
def test_copies_are_one_document_and_move_no_route(pair):
    a, b, recs, copies, _ = pair
    ma, mb = manifest(a), manifest(b)
    assert mb["documents_routed"] == len(recs) + len(copies) and mb["documents_distinct"] == ma["documents_distinct"]
    routed = read_table(b / "routed").set_index("doc_id")
    for r in recs[:8]:
        group = routed[routed.index.str.startswith(r["id"])]
        assert (group.copies == len(group)).all() and group.first_copy.sum() == 1 and group.first_copy[r["id"]]
        assert group.leaf.nunique() == 1
    ra, rb = Router.load(str(a)), Router.load(str(b))
    assert ra.documents.meta["n_documents"] == rb.documents.meta["n_documents"] == ma["documents_distinct"]
    queries = [second_sentence(r["text"]) for r in recs] + [r["text"] for r in recs[:8]] + QUESTIONS
    x = ra.embed(queries)
    for mode in MODES:
        for vote_name in ("rerank", "linear"):
            cfg = RoutingConfig(mode=mode, vote=vote_name)
            pa_, pb = (
                Router(r.run_dir, r.tree, r.tree_version, r.manifest, r.documents, cfg).route_embeddings(
                    x, texts=queries
                )
                for r in (ra, rb)
            )
            assert np.array_equal(pa_, pb), (mode, vote_name)
    # a copied article's own text finds it first, listed once with its number of copies
    full = queries[len(recs) : len(recs) + 8]
    for i, (r, row) in enumerate(zip(recs[:8], rb.neighbours(rb.embed(full), 3, texts=full))):
        assert (row[0].doc_id, row[0].copies) == (r["id"], 2 + i % 6)
        assert len({nb.doc_id for nb in row}) == len(row) and not any("-copy" in nb.doc_id for nb in row)


def own_text_agreement(run: str, n: int) -> dict:
    """Share of documents whose full text / second sentence routes to their stored leaf, per mode."""
    ids, texts, leaves = sample_documents(run, n, seed=0)
    sentences = [second_sentence(t) for t in texts]
    keep = [i for i, s in enumerate(sentences) if s]
    r = Router.load(run)
    out = {}
    for mode in MODES:
        rm = Router(r.run_dir, r.tree, r.tree_version, r.manifest, r.documents, RoutingConfig(mode=mode))
        for name, qs, want in (("full", texts, leaves), ("sentence", [sentences[i] for i in keep], leaves[keep])):
            got = rm.leaves(leading_path(rm.route_embeddings(r.embed(qs), texts=qs)))
            out[mode, name] = float(np.mean(got == want))
    return out


@pytest.mark.slow
def test_frozen_tree_routes_like_the_router(pair):
    a, b, recs, copies, stdout = pair
    ma, mb = manifest(a), manifest(b)
    assert mb["tree_version"] == ma["tree_version"] and mb["tree_from"] == str(a)
    assert "nothing is fitted" in stdout and "[fit_level_1]" not in stdout
    assert open(b / "tokenizer.json").read() == open(a / "tokenizer.json").read()
    n = len(recs) + len(copies)
    assert mb["documents_routed"] == n and mb["checksums"]["shard_ids"] == mb["checksums"]["validated_ids"]
    assert sum(mb["levels"][-1]["node_documents"]) == n
    routed = read_table(b / "routed").sort_values("doc_id")
    text = {r["id"]: r["text"] for r in recs + copies}
    want = Router.load(str(a), documents=False).route_texts([text[i] for i in routed.doc_id])
    same = (np.stack(routed.path.to_numpy()) == want).all(1)
    print(f"frozen tree: {same.sum()}/{len(same)} documents of B on the path the router gives on RUN_A")
    assert same.all()


@pytest.mark.slow
def test_own_text_and_sentence_reach_their_leaf(pair):
    a, _, _, _, _ = pair
    agree = own_text_agreement(str(a), 48)
    print("run A (48 articles, 9 leaves):", {f"{m}/{c}": round(v, 3) for (m, c), v in agree.items()})
    assert agree["neighbours", "full"] >= 0.99 and agree["neighbours", "sentence"] >= 0.8


@pytest.mark.skipif(
    not os.path.exists(os.path.join(DEMO_RUN, "index", "index.json")), reason="runs/demo has no index yet (make demo)"
)
def test_demo_run_own_text_and_sentence_reach_their_leaf():
    agree = own_text_agreement(DEMO_RUN, 400)
    print("demo run (2,225 articles, 512 leaves):", {f"{m}/{c}": round(v, 3) for (m, c), v in agree.items()})
    assert agree["neighbours", "full"] >= 0.99 and agree["neighbours", "sentence"] >= 0.8


def test_rerank_lets_the_clearly_nearest_document_win():
    """One neighbour at 0.68 in leaf 1 against ten at 0.35-0.43 in leaf 2: linear sums the crowd, rerank does not;
    among near-ties the document holding the query's words wins."""
    sims = np.array([[0.68] + list(np.linspace(0.43, 0.35, 10))], dtype=np.float32)
    leaves = np.array([[1] + [2] * 10])
    hits = Hits(sims, np.arange(11)[None], leaves)
    no_words = np.zeros((1, 11))
    assert vote(leaves, vote_weights(hits, RoutingConfig(vote="linear")))[0][0, 0] == 2
    assert vote(leaves, vote_weights(hits, RoutingConfig(), no_words))[0][0, 0] == 1
    tie = Hits(np.array([[0.60, 0.59]], dtype=np.float32), np.array([[0, 1]]), np.array([[3, 4]]))
    assert vote(tie.leaves, vote_weights(tie, RoutingConfig(), np.array([[0.2, 0.9]])))[0][0, 0] == 4
    with pytest.raises(ValueError, match="words"):
        vote_weights(hits, RoutingConfig())
    with pytest.raises(ValueError, match="vote"):
        RoutingConfig(vote="majority")


def test_an_export_without_a_recorded_vote_keeps_the_linear_one(tmp_path):
    from train.evaluate import model_routing
    from train.export import write_meta

    write_meta(
        str(tmp_path),
        {
            "memory": {"kind": "ffn"},
            "routing": {"mode": "neighbours", "neighbours": 32, "nprobe": 64, "hybrid_share": 0.5},
        },
    )
    assert model_routing(str(tmp_path)).vote == "linear"
    assert model_routing(str(tmp_path), vote="rerank").vote == "rerank"
    write_meta(str(tmp_path), {"memory": {"kind": "ffn"}, "routing": {"mode": "neighbours", "vote": "rerank"}})
    assert model_routing(str(tmp_path)).vote == "rerank"


def test_the_far_threshold_is_chosen_where_validation_gains_most():
    """choose_far: new facts need their memory (right with it, wrong without), known facts are hurt by it; the
    threshold sits mid-way in the widest gap that separates them, and none is set when withholding gains nothing."""
    from bench.posthoc import choose_far

    def rec(nearest, fetched, none):
        return {"nearest": nearest, "fetched": fetched, "none": none}

    new = [rec(1.4, True, False), rec(1.1, True, False), rec(0.9, False, False)]
    known = [rec(0.3, False, True), rec(0.5, False, True), rec(None, True, True)]  # None: the vote found nothing
    c = choose_far(new, known)
    assert c["far"] == pytest.approx(0.8) and c["accuracy"] == [2 / 3, 1.0] and c["accuracy_never"] == [2 / 3, 1 / 3]
    unhurt = [rec(0.3, True, True), rec(0.5, True, True)]
    assert choose_far(new, unhurt)["far"] is None  # the lowest of the tied thresholds: never far


def test_a_sweep_whose_best_rate_is_at_its_edge_says_so():
    """The post-hoc tables flag a learning rate chosen at the sweep's top or bottom: the best may lie beyond it."""
    from bench.posthoc import sweep_edge

    assert "top" in sweep_edge({"sweep": {"0.003": 0.04, "0.01": 0.27}, "lr": 0.01})
    assert "bottom" in sweep_edge({"sweep": {"0.001": 0.3, "0.003": 0.2}, "lr": 0.001})
    assert sweep_edge({"sweep": {"0.0003": 0.0, "0.001": 0.04, "0.003": 0.02}, "lr": 0.001}) == ""
    assert "not swept" in sweep_edge({"sweep": {"0.001": 0.04}, "lr": 0.001})
