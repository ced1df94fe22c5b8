"""hmem.forget on runs of the real job and models of the real trainer: an exact forget equals training from
scratch without the documents, bit for bit; a reset puts exactly the blocks on their paths back to init; the
documents leave the run, its index and every neighbour list."""

import json
import os

import pyarrow.dataset as ds
import pytest
import torch
from safetensors.torch import save_file
from test_trainer import blocks_of, train

from hmem.forget import main as forget_main
from hmem.forget import path_blocks, subtree_blocks
from hmem.learn import learn_warmup, main as learn_main
from index.router import Router
from index.rundir import read_manifest
from index.tree import generic_block_ids, level_offset
from train.config import load_config
from train.export import load_model, read_meta
from train.memory import MemoryConfig, init_block
from train.model import Anchor
from corpora.bbc import write_jsonl
from tests.spark_helpers import SMALL, bbc, submit

K, DEPTH = 3, 2  # SMALL's tree


def isolated(anchor: str) -> tuple[str, ...]:
    return (
        "data.isolated=true",
        "recipe.name=memory_only",
        f"recipe.init_anchor={anchor}",
        "memory.p_generic=0",
        "data.shuffle_buffer=8",
        "schedule.max_steps=6",
    )


def job(src, out, *extra) -> str:
    p = submit(["--input", str(src), "--id-column", "id", "--output", str(out), *SMALL, *extra])
    assert p.returncode == 0, p.stdout[-4000:]
    return str(out)


def model_blocks(export: str) -> dict:
    return blocks_of(load_model(export)[1].store)


@pytest.fixture(scope="module")
def world(bbc_run, tmp_path_factory):
    """Run A (48 BBC articles, conftest.py bbc_run) with its index, a frozen-anchor isolated model on it, the two
    documents to forget (one subtree), and run B: the corpus without them, routed into A's tree, with its model."""
    d = tmp_path_factory.mktemp("forget")
    a, recs = str(bbc_run["run"]), bbc_run["recs"]
    anchor = str(d / "anchor")
    os.makedirs(anchor)
    torch.manual_seed(0)
    weights = Anchor(load_config("tiny", [], read_manifest(a)).model).state_dict()
    save_file({n: t.detach().clone().contiguous() for n, t in weights.items()}, f"{anchor}/anchor.safetensors")
    train("python", a, str(d / "model_a"), *isolated(anchor))
    routed = ds.dataset(os.path.join(a, "routed"), partitioning="hive").to_table(columns=["doc_id", "l1"])
    by_subtree: dict[int, list[str]] = {}
    for doc, s in zip(routed["doc_id"].to_pylist(), routed["l1"].to_pylist()):
        by_subtree.setdefault(s, []).append(doc)
    gone = sorted(max(by_subtree.values(), key=len))[:2]
    write_jsonl(d / "b.jsonl", [r for r in recs if r["id"] not in gone])
    b = job(d / "b.jsonl", d / "b", "--tree", a)
    train("python", b, str(d / "model_b"), *isolated(anchor))
    return {"root": d, "a": a, "b": b, "gone": gone, "model_a": str(d / "model_a" / "export"), "recs": recs}


@pytest.fixture(scope="module")
def exact(world):
    out = str(world["root"] / "forgot")
    assert forget_main(["--run", world["a"], "--model", world["model_a"], "--out", out, *world["gone"]]) == 0
    return out


def shard_rows(run: str) -> dict:
    t = ds.dataset(os.path.join(run, "shards"), partitioning="hive").to_table()
    t = t.sort_by("seq_id")
    return {c: t[c].to_pylist() for c in ("seq_id", "tokens", "doc_ids", "n_valid", "l1")}


@pytest.mark.slow
def test_exact_forget_equals_training_from_scratch_without_the_documents(world, exact):
    forgot, scratch = (
        model_blocks(os.path.join(exact, "export")),
        model_blocks(str(world["root"] / "model_b" / "export")),
    )
    assert set(forgot) == set(scratch)
    assert all(torch.equal(forgot[i][n], scratch[i][n]) for i in forgot for n in forgot[i])  # bit-identical
    before = model_blocks(world["model_a"])
    moved = [i for i in before if not all(torch.equal(before[i][n], forgot[i][n]) for n in before[i])]
    record = read_meta(os.path.join(exact, "export"))["forgotten"][0]
    assert moved and set(moved) <= set(subtree_blocks(K, DEPTH, record["subtrees"]).tolist())
    assert shard_rows(os.path.join(exact, "run")) == shard_rows(world["b"])  # the run is B's, sequence for sequence
    repacked = read_manifest(os.path.join(exact, "work", "repack"))
    assert repacked["embeddings_from_run"] == record["documents_repacked"] > 0  # A's vectors: none re-embedded
    mf, mb = read_manifest(os.path.join(exact, "run")), read_manifest(world["b"])
    for key in ("documents_routed", "documents_distinct", "sequences", "tokens", "valid_tokens"):
        assert mf[key] == mb[key], key
    for key in ("node_documents", "node_tokens"):
        assert [lv[key] for lv in mf["levels"]] == [lv[key] for lv in mb["levels"]], key
    assert record["doc_ids"] == world["gone"] and record["mode"] == "exact"
    active = sum(1 for n in mb["levels"][0]["node_documents"] if n)
    assert record["share_of_full"] == pytest.approx(len(record["subtrees"]) / active)
    assert all(c == 1.0 for doc in record["fit_sample"] for c in doc)  # 48 documents: all in every fit sample


@pytest.mark.slow
def test_forgotten_documents_leave_the_run_and_every_neighbour_list(world, exact):
    run = os.path.join(exact, "run")
    table = ds.dataset(os.path.join(run, "index", "documents.arrow"), format="arrow").to_table()
    assert not set(world["gone"]) & set(table["doc_id"].to_pylist())
    docs = ds.dataset(os.path.join(run, "documents")).to_table(columns=["doc_id"])["doc_id"].to_pylist()
    assert not set(world["gone"]) & set(docs) and len(docs) == len(world["recs"]) - 2
    texts = [r["text"] for r in world["recs"] if r["id"] in world["gone"]]
    router = Router.load(run)
    for nbs in router.neighbours(router.embed(texts), 32, texts=texts):
        assert nbs and not {nb.doc_id for nb in nbs} & set(world["gone"])
    old = Router.load(world["a"])
    assert {nb.doc_id for nb in old.neighbours(old.embed(texts), 1, texts=texts)[0]} <= set(world["gone"])


@pytest.mark.slow
def test_other_documents_keep_their_codes_and_routes_after_a_forget(world, exact):
    """The rebuilt index reuses A's PQ codebooks: a query's similarity to every remaining document is what it was,
    so a query whose neighbours held none of the forgotten documents routes as before, in every mode."""
    run = os.path.join(exact, "run")
    assert json.load(open(os.path.join(run, "index", "index.json")))["codebooks_from"] == os.path.abspath(world["a"])
    texts = [r["text"].split(". ")[1] for r in world["recs"] if r["id"] not in world["gone"]]
    old, new = Router.load(world["a"]), Router.load(run)
    x = old.embed(texts)
    before, after = old.neighbours(x, 32, texts=texts), new.neighbours(x, 32, texts=texts)
    gone, untouched = set(world["gone"]), []
    for i, (b, a) in enumerate(zip(before, after)):
        sims = {nb.doc_id: nb.score for nb in b}
        assert all(sims[nb.doc_id] == nb.score for nb in a if nb.doc_id in sims)
        if not {nb.doc_id for nb in b} & gone:
            untouched.append(i)
    assert untouched
    for mode in ("neighbours", "descent", "hybrid", "levels"):
        ra = old.route_embeddings(x[untouched], mode, [texts[i] for i in untouched])
        rb = new.route_embeddings(x[untouched], mode, [texts[i] for i in untouched])
        assert (ra == rb).all(), mode


@pytest.mark.slow
def test_reset_puts_the_blocks_on_the_documents_paths_back_to_init(world, tmp_path):
    """Through --query: the document whose own text is the query is the one forgotten."""
    out = str(tmp_path / "reset")
    text = next(r["text"] for r in world["recs"] if r["id"] == world["gone"][0])
    args = ["--run", world["a"], "--model", world["model_a"], "--out", out, "--mode", "reset", "--query", text]
    assert forget_main(args) == 0
    record = json.load(open(os.path.join(out, "forget.json")))
    assert record["doc_ids"] == world["gone"][:1]
    blocks = set(path_blocks(K, record["paths"], DEPTH).tolist())
    after, before = model_blocks(os.path.join(out, "export")), model_blocks(world["model_a"])
    mem = MemoryConfig(**read_meta(world["model_a"])["memory"])
    for i in before:
        if i in blocks:
            shapes = {n: tuple(t.shape) for n, t in after[i].items()}
            assert all(torch.equal(after[i][n], t) for n, t in init_block(mem, i, shapes).items())
        else:
            assert all(torch.equal(after[i][n], before[i][n]) for n in before[i])
    assert record["tokens_retrained"] == 0 and record["reset"]["blocks"] == len(blocks)
    assert not set(blocks) & set(generic_block_ids(K, DEPTH).tolist())


def test_unknown_ids_are_refused_in_one_line(world, tmp_path, capsys):
    args = ["--run", world["a"], "--model", world["model_a"], "--out", str(tmp_path / "x"), "no-such-doc"]
    assert forget_main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not routed documents of this run" in err[0] and "no-such-doc" in err[0]
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.slow
def test_learn_moves_only_the_new_documents_blocks_and_no_other_prompts_logits(world, tmp_path):
    new = [{"id": f"new-{r['id']}", "text": r["text"]} for r in bbc(3, start=700)]
    write_jsonl(tmp_path / "new.jsonl", new)
    out = str(tmp_path / "learned")
    args = ["--run", world["a"], "--model", world["model_a"], "--out", out, str(tmp_path / "new.jsonl")]
    assert learn_main(args) == 0
    record = json.load(open(os.path.join(out, "learn.json")))
    learned = set(record["blocks"])
    before, after = model_blocks(world["model_a"]), model_blocks(os.path.join(out, "export"))
    moved = {i for i in before if not all(torch.equal(before[i][n], after[i][n]) for n in before[i])}
    assert moved and moved <= learned  # only blocks on the new documents' paths ...
    assert all(i >= level_offset(DEPTH, K) for i in learned)  # ... and, by default, only their leaves
    assert record["from_level"] == DEPTH and record["replayed_sequences"] > 0
    anchor, bank_a, _ = load_model(world["model_a"])
    _, bank_b, _ = load_model(os.path.join(out, "export"))
    x = torch.randint(2, 300, (1, 24))
    leaves = [(i, j) for i in range(K) for j in range(K)]
    same = changed = 0
    for path in leaves:
        ids = torch.tensor([[level_offset(1, K) + path[0], level_offset(2, K) + path[0] * K + path[1]]])
        with torch.no_grad():
            la = anchor(x, bank_a.fetch(ids, requires_grad=False))
            lb = anchor(x, bank_b.fetch(ids, requires_grad=False))
        if set(ids[0].tolist()) & moved:
            changed += not torch.equal(la, lb)
        else:
            assert torch.equal(la, lb)  # untouched blocks: bit-identical logits
            same += 1
    assert same and changed
    run = os.path.join(out, "run")
    router = Router.load(run)
    texts = [r["text"] for r in new]
    assert [nbs[0].doc_id for nbs in router.neighbours(router.embed(texts), 1, texts=texts)] == [r["id"] for r in new]
    m = read_manifest(run)
    assert m["documents_routed"] == read_manifest(world["a"])["documents_routed"] + 3
    seq_ids = ds.dataset(os.path.join(run, "shards"), partitioning="hive").to_table(columns=["seq_id"])["seq_id"]
    assert len(set(seq_ids.to_pylist())) == len(seq_ids)  # the new sequences' ids are unique in the run
    assert 0 < record["share_of_full"] < 1


def test_learn_keeps_the_warmup_share_of_the_models_own_schedule():
    cfg = {"optim": {"memory": {"warmup_steps": 30}}, "schedule": {"max_steps": 174}}
    assert learn_warmup(cfg, 8) == 1  # not 30: a learn of 8 steps would never reach its peak learning rate
    assert learn_warmup(cfg, 174) == 30
    assert learn_warmup({"optim": {"memory": {}}, "schedule": {"max_steps": 10}}, 5) == 0


def test_a_re_pack_keeps_each_documents_passes(tmp_path):
    """A run of the job's data mix (--passes): the documents a forget re-packs go to one input file per number of
    passes, so the job packs each as often as before; a run from before the mix reads as once each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hmem.forget import remaining_input, routed

    run = tmp_path / "run"
    for l1, ids, passes in ((0, ["a", "b", "c"], [1, 16, 16]), (1, ["d"], [16])):
        os.makedirs(run / "routed" / f"l1={l1}")
        pq.write_table(
            pa.table({"doc_id": ids, "passes": pa.array(passes, pa.int32())}), run / "routed" / f"l1={l1}" / "p.parquet"
        )
    os.makedirs(run / "documents")
    pq.write_table(
        pa.table({"doc_id": list("abcd"), "text": ["ta", "tb", "tc", "td"]}), run / "documents" / "p.parquet"
    )
    files = remaining_input(str(run), [0], {"c"}, str(tmp_path / "in"))
    assert files == {1: str(tmp_path / "in-p1.jsonl"), 16: str(tmp_path / "in-p16.jsonl")}
    read = {n: [json.loads(line) for line in open(f)] for n, f in files.items()}
    assert read == {1: [{"id": "a", "text": "ta"}], 16: [{"id": "b", "text": "tb"}]}
    os.remove(run / "routed" / "l1=1" / "p.parquet")  # l1=1 now from before the mix: no passes column
    pq.write_table(pa.table({"doc_id": ["d"]}), run / "routed" / "l1=1" / "p.parquet")
    t = routed(str(run), None, ("doc_id", "passes"))
    assert dict(zip(t["doc_id"].to_pylist(), t["passes"].to_pylist())) == {"a": 1, "b": 16, "c": 16, "d": 1}
    old = tmp_path / "old"  # a run wholly from before the mix
    os.makedirs(old / "routed" / "l1=0")
    pq.write_table(pa.table({"doc_id": ["x"]}), old / "routed" / "l1=0" / "p.parquet")
    assert routed(str(old), None, ("doc_id", "passes"))["passes"].to_pylist() == [1]
