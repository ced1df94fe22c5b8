"""End to end: the real Spark job (spark-submit, local[2]) on real BBC text plus bad rows, in JSONL and Parquet,
with an ``id`` field the job finds by itself and two embedding windows."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from index.route import route
from index.tree import Tree
from tests.spark_helpers import SMALL, bbc, manifest, read_table, submit, write_bbc_subset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    good = write_bbc_subset(str(d / "bbc.jsonl"), 60)
    (d / "empty.jsonl").write_bytes(b"")
    rows = [
        b'{"id": "ok-1", "text": "A short but valid document about football and the league."}',
        b'{"id": "utf8", "text": "broken \xff\xfe bytes here"}',
        b"this line is not json",
        b'{"id": "blank", "text": "   \\n  "}',
        b'{"id": "ok-1", "text": "A second document that reuses the id ok-1."}',
        b'{"id": "notext", "title": "no text field on this row"}',
        b'{"id": "huge", "text": "' + b"word " * 2_000_000 + b'"}',
        b'{"text": "A valid document, but the only JSONL row without an id."}',
    ]
    (d / "bad.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    ids = [f"pq-{i}" for i in range(6)]
    ids[4] = None
    texts = [r["text"] for r in bbc(6, start=7)]  # not among write_bbc_subset's every 20th
    pq.write_table(pa.table({"id": ids, "text": texts}), d / "more.parquet")
    return d, good


# no --id-column: the job finds the rows' "id" field itself; BBC articles run past one 256-piece window
ARGS = [*SMALL, "--row-group-sequences", "8", "--max-windows", "2"]


@pytest.fixture(scope="module")
def run(bad_inputs, tmp_path_factory):
    d, good = bad_inputs
    out = tmp_path_factory.mktemp("run") / "r"
    p = submit(["--input", str(d), "--output", str(out), *ARGS])
    assert p.returncode == 0, p.stdout[-4000:]
    return out, good, p


def test_counts_in_equal_counts_out(run):
    out, good, _ = run
    m = manifest(out)
    assert m["documents_in"] == len(good) + 8 + 6
    assert m["documents_in"] == m["documents_routed"] + m["documents_quarantined"]
    assert m["documents_routed"] == len(good) + 1 + 5
    assert m["quarantine_reasons"] == {
        "missing_id": 2,
        "invalid_utf8": 1,
        "invalid_json": 1,
        "empty_text": 1,
        "duplicate_id": 1,
        "missing_text": 1,
        "too_large": 1,
    }
    q = read_table(out / "quarantine")
    assert len(q) == m["documents_quarantined"]
    assert set(q[q.reason == "duplicate_id"].row) == {4}  # the later occurrence, by (source, row)
    missing = q[q.reason == "missing_id"]
    assert sorted(zip(missing.source.str.rsplit("/", n=1).str[-1], missing.row)) == [
        ("bad.jsonl", 7),
        ("more.parquet", 4),
    ]
    assert any(i["rows"] == 0 and i["path"].endswith("empty.jsonl") for i in m["inputs"])
    assert set(m) >= {"documents_in", "documents_routed", "documents_quarantined", "tree_version", "levels"}


def test_every_routed_doc_once_in_shards(run):
    out, good, _ = run
    routed = read_table(out / "routed")
    shards = read_table(out / "shards")
    listed = [d for ids in shards.doc_ids for d in ids]
    assert sorted(listed) == sorted(routed.doc_id) and len(set(listed)) == len(listed)
    assert set(routed.doc_id) >= {r["id"] for r in good}
    m = manifest(out)
    # one leaf per sequence, exact width, padding only after n_valid
    for _, s in shards.iterrows():
        assert len(s.tokens) == m["seq_len"] + 1
        assert (np.asarray(s.tokens[s.n_valid :]) == m["pad_id"]).all()
        assert int(s.l1) == s.path[0]
    docs_leaf = dict(zip(routed.doc_id, routed.leaf))
    for _, s in shards.iterrows():
        assert all(docs_leaf[d] == s.leaf for d in s.doc_ids)
    # tokens are conserved: document tokens + one end-of-text each
    assert shards.n_valid.sum() == routed.n_tokens.sum() + len(routed)


def test_shards_are_small_leaf_sorted_row_groups(run):
    """The trainer shuffles whole row groups: they must be small, or a window holds a few leaves."""
    out, _, _ = run
    files = sorted((out / "shards").rglob("*.parquet"))
    sizes, leaves = [], []
    for f in files:
        meta = pq.read_metadata(f)
        col = meta.schema.names.index("leaf")
        for i in range(meta.num_row_groups):
            sizes.append(meta.row_group(i).num_rows)
            stats = meta.row_group(i).column(col).statistics
            leaves.append((str(f), stats.min, stats.max))
    assert sum(sizes) == manifest(out)["sequences"] and len(sizes) > 2 * len(files)
    assert max(sizes) <= 8  # row_group_sequences
    for (f, _, hi), (g, lo, _) in zip(leaves, leaves[1:]):
        assert f != g or hi <= lo  # leaf-sorted within each file


def test_tree_balance_and_routing_agree(run):
    out, _, _ = run
    m = manifest(out)
    tree = Tree.load(out / "tree")
    assert tree.version == m["tree_version"]
    for lv in m["levels"]:
        assert lv["nodes"] == 3 ** lv["level"]
        assert sum(lv["node_documents"]) == m["documents_routed"]
        # the cap is floor(1.5/k * n) points per child: share can exceed 1.5/k only through flooring on tiny parents
        assert lv["max_child_fraction"] <= 0.5 + 1e-9
    routed = read_table(out / "routed")
    paths = route(tree, np.stack(routed.embedding.to_numpy()))
    assert (paths == np.stack(routed.path.to_numpy())).all()


def test_rerun_resumes_and_reproduces(run, bad_inputs):
    """A rerun skips finished stages; stages whose marker is gone (as after a kill) are redone identically."""
    out, _, _ = run
    d, _ = bad_inputs
    before = manifest(out)
    shards_before = read_table(out / "shards").sort_values("seq_id").reset_index(drop=True)
    routed_before = read_table(out / "routed").sort_values("doc_id").reset_index(drop=True)
    for redo in ("fit_subtrees", "route", "pack"):
        os.remove(out / "stages" / f"{redo}.json")
    p = submit(["--input", str(d), "--output", str(out), *ARGS])
    assert p.returncode == 0, p.stdout[-3000:]
    assert p.stdout.count("skipped") == 3 and all(f"[{s}] start" in p.stdout for s in ("fit_subtrees", "route", "pack"))
    after = manifest(out)
    assert after["tree_version"] == before["tree_version"] and after["levels"] == before["levels"]
    shards_after = read_table(out / "shards").sort_values("seq_id").reset_index(drop=True)
    assert shards_after.seq_id.tolist() == shards_before.seq_id.tolist()
    assert [list(t) for t in shards_after.tokens] == [list(t) for t in shards_before.tokens]
    routed_after = read_table(out / "routed").sort_values("doc_id").reset_index(drop=True)
    assert [list(p) for p in routed_after.path] == [list(p) for p in routed_before.path]


def test_changed_config_into_same_dir_is_refused(run, bad_inputs):
    out, _, _ = run
    d, _ = bad_inputs
    p = submit(["--input", str(d), "--output", str(out), *ARGS, "--balance-factor", "2.0"])
    assert p.returncode != 0 and "another config" in p.stdout


def test_id_field_is_found_without_id_column(run):
    out, good, p = run
    m = manifest(out)
    assert m["ids"] == "id" and "ids: the input's 'id' field (" in p.stdout
    # every row counts, bad ones too; without an id: the non-JSON line, the JSONL row and the Parquet null
    assert f"({m['documents_in'] - 3} of {m['documents_in']} rows have one;" in p.stdout
    want = {r["id"] for r in good} | {"ok-1"} | {f"pq-{i}" for i in (0, 1, 2, 3, 5)}
    assert set(read_table(out / "routed").doc_id) == want


def test_max_windows_embeds_the_mean_of_windows(run):
    from index.encoder import embed_texts, load_encoder

    out, _, _ = run
    assert manifest(out)["config"]["max_windows"] == 2
    routed = read_table(out / "routed").sort_values("doc_id")
    text = dict(read_table(out / "documents")[["doc_id", "text"]].values)
    texts = [text[i] for i in routed.doc_id]
    precision = manifest(out)["config"]["encoder_precision"]  # the run's own (bf16 where native)
    model = load_encoder(precision=precision)
    two, one = embed_texts(model, texts, max_windows=2), embed_texts(model, texts, max_windows=1)
    stored = np.stack(routed.embedding.to_numpy())
    # the job batches other texts together; bf16 rounding depends on the batch (as in test_embed)
    tol = {"fp32": 1e-4, "bf16": 2e-3}[precision]
    assert np.abs(stored - two).max() < tol
    # most BBC articles run past one 256-piece window: the second window changed their embeddings
    assert (np.abs(stored - one).max(1) > 10 * tol).mean() > 0.5


def test_missing_text_column_is_a_clear_error(tmp_path):
    f = tmp_path / "notext.jsonl"
    f.write_text('{"body": "text under another name"}\n{"body": "again"}\n')
    p = submit(["--input", str(f), "--output", str(tmp_path / "out"), *SMALL])
    assert p.returncode != 0
    assert "notext.jsonl" in p.stdout and "'text'" in p.stdout and "--text-column" in p.stdout


def test_corrupt_parquet_is_a_one_line_error(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    pa_rows = pa.table({"id": ["a", "b"], "text": ["a document about football", "a document about rates"]})
    pq.write_table(pa_rows, d / "good.parquet")
    (d / "bad.parquet").write_bytes(b"PAR1" + np.random.default_rng(0).bytes(3000))  # no valid footer
    p = submit(["--input", str(d), "--output", str(tmp_path / "out"), *SMALL])
    assert p.returncode != 0
    lines = [line for line in p.stdout.splitlines() if "bad.parquet" in line]
    assert len(lines) == 1 and "not a readable Parquet file" in lines[0] and "replace or remove it" in lines[0]
    assert "\tat org.apache" not in p.stdout and "Traceback" not in p.stdout  # no Java or Python stack trace


def test_router_reembeds_texts_to_the_same_paths(run):
    """The job embedded in batches of 16 on Spark workers; the router re-embeds the TEXTS alone, in batches of
    64, and must land every document on its stored path (docs/DESIGN.md: "Routing that cannot disagree")."""
    from index.router import Router

    out, _, _ = run
    routed = read_table(out / "routed").sort_values("doc_id")
    text = dict(read_table(out / "documents")[["doc_id", "text"]].values)
    router = Router.load(str(out), documents=False)
    assert manifest(out)["config"]["encoder_batch_size"] != 64  # Router.embed's batch size
    paths = router.route_texts([text[i] for i in routed.doc_id])
    same = (paths == np.stack(routed.path.to_numpy())).all(1)
    print(f"text-level agreement: {same.sum()}/{len(same)} documents")
    assert same.all()


def test_checksums_catch_a_corrupted_shard(run, tmp_path):
    """One document listed twice and another dropped keeps every count; the exactly-once check still fails."""
    import shutil

    import pyarrow.parquet as pq

    from pipeline.manifest import ChecksumError, verify
    from pipeline.spark import spark_session

    out, _, _ = run
    m = manifest(out)
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    # a shard file with two sequences that list documents
    f, t = next(
        (f, t)
        for f in sorted((bad / "shards").rglob("*.parquet"))
        if (t := pq.read_table(f)) and sum(map(bool, t.column("doc_ids").to_pylist())) >= 2
    )
    doc_ids = t.column("doc_ids").to_pylist()
    row, other = [i for i, ids in enumerate(doc_ids) if ids][:2]
    doc_ids[other] = doc_ids[other][:-1] + [doc_ids[row][0]]  # a duplicate replaces a document: same counts
    pq.write_table(
        t.set_column(t.schema.get_field_index("doc_ids"), "doc_ids", pa.array(doc_ids, t.schema.field("doc_ids").type)),
        f,
    )
    (f.parent / f".{f.name}.crc").unlink(missing_ok=True)  # Hadoop's sidecar checksum would refuse the rewrite
    spark = spark_session("test-checksums", **{"spark.master": "local[1]"})
    try:
        assert verify(spark, str(out), m["checksums"]["input_rows"]) == m["checksums"]
        with pytest.raises(
            ChecksumError,
            match="exactly-once check failed: the shards' doc_ids .* are not routed/'s documents once per pass",
        ):
            verify(spark, str(bad), m["checksums"]["input_rows"])
    finally:
        spark.stop()
