"""train/evaluate.py on a model trained by the real trainer (tiny config) over a fixture run with a 384-d tree,
routed by the real encoder and router."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fixtures import PROMPTS

from index.router import Router
from index.tree import path_block_ids
from train.evaluate import Evaluator, Probe, block_report, bucket_edges, bucket_of, is_exact_match, read_probes


@pytest.fixture(scope="module")
def setup(tiny_export):
    run, export, routes = tiny_export
    return Evaluator(export, Router.load(run, documents=False), batch_size=2), routes, export


def test_buckets_and_matching():
    freqs = [1, 1, 2, 3, 5, 8, 20, 60, 200]
    edges = bucket_edges(freqs)
    b = bucket_of(freqs, edges)
    assert len(edges) == 6 and b[0] == 0 and b[-1] == 4
    assert all(x <= y for x, y in zip(b, b[1:]))
    assert is_exact_match(" 26.", "26") and is_exact_match("Fe is", "Fe")
    assert not is_exact_match(" 260", "26") and not is_exact_match("Fermium", "Fe")


def test_read_probes_names_the_bad_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"prompt": "a", "answer": "b", "entity": "c", "frequency": 1})
        + "\n"
        + json.dumps({"prompt": "a", "entity": "c", "frequency": 1})
        + "\n"
    )
    with pytest.raises(ValueError, match=r"p.jsonl:2: missing \['answer'\]"):
        read_probes(str(path))
    path.write_text(json.dumps({"prompt": "a", "answer": ["b", "c"], "entity": "c", "frequency": 1}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl: probe 1: answer is \['b', 'c'\], expected str"):
        read_probes(str(path))


def test_nll_counts_every_token_once_and_matches_the_anchor(setup):
    ev, _, _ = setup
    short, long = "the atomic number of hydrogen is one", " ".join(["memory blocks on a tree"] * 12)
    paths = ev.router.route_texts([short, long])
    nll, n = ev.text_nll([short, long], paths, "fetched")
    for i, t in enumerate([short, long]):
        assert n[i] == len(ev.tokenizer.encode(t).ids) + 1  # each token and the closing <eot>, once
    assert len(ev.windows(long)) > 1
    ids = [ev.eot] + ev.tokenizer.encode(short).ids + [ev.eot]
    memory = ev.bank.fetch(torch.from_numpy(path_block_ids(paths[:1], ev.k)), requires_grad=False)
    with torch.no_grad():
        want = ev.anchor.loss(torch.tensor([ids]), memory=memory).item() * (len(ids) - 1)
    assert nll[0] == pytest.approx(want, rel=1e-5)


def test_perplexity_settings_differ_where_memory_differs(setup):
    ev, _, _ = setup
    docs = [
        {"text": "hydrogen is element one", "source": "facts"},
        {"text": "a tree of memory blocks", "source": "news"},
    ]
    ppl = ev.perplexity(docs)
    assert set(ppl) == {"fetched", "generic", "none", "generic@1", "off@1", "generic@2", "off@2"}
    assert all(set(row) == {"all", "facts", "news"} and row["all"] > 1 for row in ppl.values())
    assert ppl["fetched"]["all"] != ppl["none"]["all"]  # the trained blocks change the model
    assert ppl["off@1"]["all"] != ppl["fetched"]["all"] != ppl["off@2"]["all"]


def test_batched_greedy_completion_equals_one_by_one(setup):
    ev, routes, _ = setup
    prompts = list(PROMPTS.values()) + ["the"]
    ids = ev.block_ids(ev.router.route_texts(prompts), "fetched")
    together = ev.complete(prompts, ids, [4, 2, 3])
    for i, p in enumerate(prompts):
        seq = [ev.eot] + ev.tokenizer.encode(p).ids
        memory = ev.bank.fetch(ids[i : i + 1], requires_grad=False)
        for _ in range([4, 2, 3][i]):
            with torch.no_grad():
                seq.append(int(ev.anchor(torch.tensor([seq]), memory)[0, -1].argmax()))
        new = seq[len(ev.tokenizer.encode(p).ids) + 1 :]
        new = new[: new.index(ev.eot) + 1] if ev.eot in new else new
        assert together[i] == ev.tokenizer.decode([t for t in new if t != ev.eot])


def test_probe_agreement_oracle_and_blocking(setup, capsys):
    ev, routes, _ = setup
    probes = [
        Probe(PROMPTS["hydrogen"], "one", "hydrogen", 2, ["h0", "h1"]),
        Probe(PROMPTS["tree"], "of", "tree", 1, ["t0"]),
        Probe(PROMPTS["hydrogen"], "one", "hydrogen", 2),
    ]  # no doc_ids: found by name in documents/
    res = ev.probe(probes)
    assert capsys.readouterr().err.splitlines()[-1].startswith("[probes] 15/15 completions")  # 5 settings x 3
    h, t, found = res["records"]
    assert h["agreement"] == 1.0 and t["agreement"] == 0.0 and found["agreement"] == 1.0
    assert h["oracle"] == h["fetched"]  # its documents are on its own path
    assert h["blocked"] == h["none"]  # every block on its path is blocked
    assert h["blocked_share"] == pytest.approx(2 / 6)  # 2 of the 6 tree blocks (k=2, depth=2)
    assert sum(b["probes"] for b in res["buckets"]) == 3
    assert set(res["accuracy"]) == {"fetched", "generic", "none", "oracle", "blocked"}
    # probes that name no training document (a retention set) keep their own route as the oracle, block nothing
    (alone,) = ev.probe([Probe("the capital of France is", "Paris", "France", 1)])["records"]
    assert alone["agreement"] is None and alone["blocked_share"] == 0 and alone["oracle"] == alone["fetched"]


def test_two_paths_fetch_shared_blocks_once(setup):
    """two_paths: the second path's blocks that the first fetches are disabled; the same path twice is one path."""
    ev, _, _ = setup
    prompts = list(PROMPTS.values())
    one = ev.router.route_texts(prompts)
    same = ev.block_ids(np.stack([one, one], axis=1), "fetched")
    assert same.shape == (2, 2 * ev.depth) and (same[:, ev.depth :] == -1).all()
    assert ev.fetch_cost(same) == pytest.approx(1.0)
    assert ev.complete(prompts, same, [3, 3]) == ev.complete(prompts, ev.block_ids(one, "fetched"), [3, 3])
    other = one.copy()
    other[:, -1] = 1 - other[:, -1]  # a sibling leaf: the level-1 block is shared, the leaf block is not
    both = ev.block_ids(np.stack([one, other], axis=1), "fetched")
    assert (both[:, ev.depth] == -1).all() and (both[:, -1] >= 0).all()
    ranks = ev.bank.config.ranks
    assert ev.fetch_cost(both) == pytest.approx((sum(ranks) + ranks[-1]) / sum(ranks))
    nll_one, _ = ev.text_nll(prompts, one, "fetched")
    nll_both, _ = ev.text_nll(prompts, np.stack([one, other], axis=1), "fetched")
    assert not np.allclose(nll_one, nll_both)  # the sibling's block takes part


def test_far_texts_fetch_no_memory(setup):
    """routing.far's mask: a far text's fetched ids are all -1 and it answers and scores as with no memory; the
    other texts fetch their route."""
    ev, _, _ = setup
    prompts = list(PROMPTS.values())
    paths = ev.router.route_texts(prompts)
    far = np.array([True, False])
    ids = ev.block_ids(paths, "fetched", far)
    assert (ids[0] == -1).all() and torch.equal(ids[1], ev.block_ids(paths, "fetched")[1])
    assert ev.block_ids(paths, "generic", far).equal(ev.block_ids(paths, "generic"))  # only fetched withholds
    assert ev.complete(prompts, ids, [4, 4]) == [
        ev.complete(prompts[:1], None, [4])[0],
        ev.complete(prompts[1:], ev.block_ids(paths[1:], "fetched"), [4])[0],
    ]
    nll, _ = ev.text_nll(prompts, paths, "fetched", far)
    assert nll[0] == pytest.approx(ev.text_nll(prompts, paths, "none")[0][0], rel=1e-6)
    assert nll[1] == pytest.approx(ev.text_nll(prompts, paths, "fetched")[0][1], rel=1e-6)
    assert ev.router.far(np.array([0.2, 0.9])) is None  # the router sets no far


def test_block_report(setup):
    ev, _, model_dir = setup
    texts = ["hydrogen is element one", "a tree of memory blocks"]
    report = block_report(model_dir, ev.router, texts)
    blocks = path_block_ids(ev.router.route_texts(texts), ev.k)
    assert [[lv["block"] for lv in q] for q in report] == blocks.tolist()
    for q in report:
        assert [lv["level"] for lv in q] == [1, 2]
        for lv in q:
            assert lv["delta"] == pytest.approx(lv["nll_without"] - lv["nll_fetched"])
            assert np.isfinite(lv["nll_generic"])
        assert any(lv["delta"] != 0 for lv in q)


def test_entity_documents_streams_and_matches_whole_words_like_python(tmp_path):
    """Arrow's regex kernel over documents/ (two files) gives what a Python ``\\b`` scan gives."""
    import re
    from types import SimpleNamespace

    texts = [
        "Hydrogen: one proton",
        "hydrogens",
        "the Fe atom",
        "Fermium",
        "C++ rocks",
        "xC++y",
        "über café",
        "Ü-Bahn café!",
        "_fe_",
        "a fe",
        "Jean-Luc Picard",
        "picard's",
        "1fe",
        "fe2",
    ]
    os.makedirs(tmp_path / "documents")
    for part, lo in enumerate((0, 7)):
        rows = texts[lo : lo + 7]
        pq.write_table(
            pa.table({"doc_id": [f"d{lo + i}" for i in range(len(rows))], "text": rows}),
            tmp_path / "documents" / f"part-{part}.parquet",
        )
    entities = ["hydrogen", "Fe", "C++", "café", "picard", "über", "ü-bahn"]
    probes = [Probe("p", "a", e, 1) for e in entities] + [Probe("p", "a", "given", 1, doc_ids=["x"])]
    found = Evaluator.entity_documents(SimpleNamespace(router=SimpleNamespace(run_dir=str(tmp_path))), probes)
    for e in entities:
        want = [f"d{i}" for i, t in enumerate(texts) if re.search(r"\b" + re.escape(e) + r"\b", t, re.IGNORECASE)]
        assert found[e] == want, e
    assert all(found[e] for e in entities if e != "C++")  # ("C++" has no word boundary after "++" here)
    assert found["given"] == ["x"]


def test_dense_model_routes_by_descent_and_needs_no_document_index(tmp_path):
    from train.evaluate import model_routing
    from train.export import write_meta

    recorded = {"mode": "neighbours", "neighbours": 32, "nprobe": 64, "hybrid_share": 0.5}
    for memory, want in ((None, "descent"), ({"kind": "ffn"}, "neighbours")):
        write_meta(str(tmp_path), {"memory": memory, "routing": recorded})
        assert model_routing(str(tmp_path)).mode == want
    assert model_routing(str(tmp_path), ["two_paths"]).mode == "two_paths"  # the user's choice wins
