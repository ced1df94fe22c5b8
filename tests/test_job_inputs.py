"""The real Spark job on input layouts a corpus has: nested directories without ids, Parquet, a user's shuffle
partitions, a data mix. (An ``id`` field found automatically and several embedding windows: tests/test_pipeline.py;
a corpus routed into another run's frozen tree: tests/test_routing.py.)"""

import hashlib
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.spark_helpers import SMALL, bbc, manifest, read_table, submit

pytestmark = pytest.mark.slow

PARTITIONS = 3  # local[2] alone would give 2 x 2 = 4


def stage(out, name: str) -> dict:
    with open(out / "stages" / f"{name}.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def layout_run(tmp_path_factory):
    """2023/part-0.jsonl and 2024/part-0.jsonl (same base name, no ids) and 2025/part-0.parquet, given as two
    globs; the second is packed 3 times (--passes 1 3, a data mix)."""
    d = tmp_path_factory.mktemp("layout")
    recs = bbc(50, start=100)
    for year, part in (("2023", recs[:20]), ("2024", recs[20:40])):
        os.makedirs(d / year)
        with open(d / year / "part-0.jsonl", "w") as f:
            f.writelines(json.dumps({"text": r["text"], "title": "t"}) + "\n" for r in part)
    os.makedirs(d / "2025")
    pq.write_table(pa.table({"text": [r["text"] for r in recs[40:]]}), d / "2025" / "part-0.parquet")
    out = tmp_path_factory.mktemp("run") / "layout"
    inputs = [str(d / "202[34]"), str(d / "2025*")]  # a glob's paths are relative to the part before its wildcard
    p = submit(
        ["--input", *inputs, "--passes", "1", "3", "--output", str(out), *SMALL],
        conf={"spark.sql.shuffle.partitions": str(PARTITIONS)},
    )
    assert p.returncode == 0, p.stdout[-4000:]
    return out, recs, p


def test_derived_ids_use_the_path_below_the_input(layout_run):
    out, recs, p = layout_run
    m = manifest(out)
    assert m["documents_in"] == len(recs) == m["documents_routed"] and m["documents_quarantined"] == 0
    assert m["ids"] == "" and "ids: derived" in p.stdout
    docs = read_table(out / "documents")
    want = {
        hashlib.sha1(f"{rel}:{row}".encode()).hexdigest()[:16]
        for rel, n in (("2023/part-0.jsonl", 20), ("2024/part-0.jsonl", 20), ("2025/part-0.parquet", 10))
        for row in range(n)
    }
    assert set(docs.doc_id) == want
    # the Parquet file went all the way: its documents are routed and packed
    parquet_ids = set(docs[docs.source.str.endswith("part-0.parquet")].doc_id)
    assert len(parquet_ids) == 10
    assert parquet_ids <= set(read_table(out / "routed").doc_id)
    assert parquet_ids <= {d for ids in read_table(out / "shards").doc_ids for d in ids}


def test_conf_shuffle_partitions_is_honoured(layout_run):
    out, _, p = layout_run
    read = stage(out, "read")
    assert read["stats"]["shuffle_partitions"] == PARTITIONS and read["stats"]["from"] == "--conf"
    assert f"shuffle partitions: {PARTITIONS} (--conf); adaptive execution true" in p.stdout
    # embed and tokenize repartition to exactly that many tasks (an explicit count, which AQE keeps)
    for name in ("embed", "pack"):
        tasks = [s["tasks"] for s in stage(out, name)["spark_stages"]]
        assert PARTITIONS in tasks, (name, tasks)
    for name in ("read", "embed", "fit_level_1", "fit_subtrees", "route", "pack"):
        s = stage(out, name)
        assert s["tasks"] == sum(x["tasks"] for x in s["spark_stages"]) > 0


def test_manifest_checksums_agree(layout_run):
    out, _, _ = layout_run
    c = manifest(out)["checksums"]
    assert c["validated_ids"] == c["routed_ids"] and c["shard_ids"] == c["packed_ids"] != c["routed_ids"]
    assert len(c["validated_ids"]) == 32 and c["quarantined_rows"] == "0" * 32


def test_passes_pack_an_input_n_times_and_route_it_once(layout_run):
    out, recs, p = layout_run
    m = manifest(out)
    docs = read_table(out / "documents")
    thrice = set(docs[docs.source.str.endswith("part-0.parquet")].doc_id)
    assert len(thrice) == 10 and m["documents_routed"] == len(recs)
    assert m["documents_packed"] == len(recs) + 2 * len(thrice) and "70 packed with --passes [1, 3]" in p.stdout
    routed = read_table(out / "routed")
    assert len(routed) == len(recs) and dict(zip(routed.doc_id, routed.passes)) == {
        d: 3 if d in thrice else 1 for d in docs.doc_id
    }
    # each pass starts in its own sequence (an article is longer than a 64-token sequence), in the document's leaf
    shards = read_table(out / "shards")
    starts = {}
    for seq, leaf, ids in zip(shards.seq_id, shards.leaf, shards.doc_ids):
        for d in ids:
            starts.setdefault(d, []).append((seq, leaf))
    leaf_of = dict(zip(routed.doc_id, routed.leaf))
    for d, at in starts.items():
        assert len(at) == len({s for s, _ in at}) == (3 if d in thrice else 1) and {lf for _, lf in at} == {leaf_of[d]}
