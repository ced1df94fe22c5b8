"""The tree fit over Spark: fitting level by level as Spark passes and fitting whole subtrees in one task
give the same tree, and every document's path is the router's descent."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from index.route import route
from index.tree import Tree
from pipeline.config import JobConfig
from pipeline.fit import fit_stage, level_uniform, load_frozen_tree
from pipeline.stages import Stages
from tests.spark_helpers import read_table

N, DIM = 6000, 24


@pytest.fixture(scope="module")
def spark():
    from pipeline.spark import spark_session

    s = spark_session("test-fit", **{"spark.master": "local[2]", "spark.sql.shuffle.partitions": "4"})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    rng = np.random.default_rng(0)
    topics = rng.normal(size=(40, DIM))
    x = topics[rng.integers(0, 40, N)] + 0.8 * rng.normal(size=(N, DIM))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    d = tmp_path_factory.mktemp("emb") / "embeddings"
    d.mkdir()
    ids = [f"doc{i:05d}" for i in rng.permutation(N)]  # file order is not doc-id order
    for part in range(3):
        rows = slice(part * N // 3, (part + 1) * N // 3)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x[rows].ravel()), DIM).cast(pa.list_(pa.float32()))
        pq.write_table(pa.table({"doc_id": ids[rows], "embedding": emb}), d / f"part-{part}.parquet")
    return d


def fit(spark, embeddings, out, local_fit_rows):
    os.makedirs(out)
    os.symlink(embeddings, out / "embeddings")
    cfg = JobConfig(
        k=4,
        depth=3,
        sample_per_node=900,
        em_batch_size=300,
        em_steps=8,
        seed=5,
        output=str(out),
        local_fit_rows=local_fit_rows,
    )
    result = fit_stage(spark, cfg, str(out), Stages(str(out), cfg.fingerprint()))
    return result, sorted(os.listdir(out / "stages"))


def test_subtree_tasks_fit_the_same_tree_as_level_passes(spark, embeddings, tmp_path):
    runs = {}
    for rows in (0, 1000, N):  # every level a Spark pass; subtrees from level 2; from level 1 (one pass)
        runs[rows] = fit(spark, embeddings, tmp_path / f"r{rows}", rows)
    assert [r[0]["fitted_in_subtrees_from_level"] for r in runs.values()] == [3, 2, 1]
    assert runs[0][1] == ["fit_level_1.json", "fit_level_2.json", "fit_level_3.json", "route.json"]
    assert runs[1000][1] == ["fit_level_1.json", "fit_level_2.json", "fit_subtrees.json", "route.json"]
    assert len({r[0]["tree_version"] for r in runs.values()}) == 1
    assert runs[0][0]["levels"] == runs[1000][0]["levels"] == runs[N][0]["levels"]
    levels = runs[0][0]["levels"]
    # the seeded sample: level 1 keeps about 900 of 6000 points, level 2 about 900 of each ~1500-point parent
    assert abs(levels[0]["sample_points"] - 900) < 4 * np.sqrt(900)
    assert levels[2]["sample_points"] == N  # parents of ~375 points: all of them
    assert all(lv["max_child_fraction"] <= 1.5 / 4 + 0.02 for lv in levels)

    tree = Tree.load(tmp_path / "r1000" / "tree")
    routed = read_table(tmp_path / "r1000" / "work" / "routed").sort_values("doc_id")
    emb = read_table(embeddings).sort_values("doc_id")
    assert routed.doc_id.tolist() == emb.doc_id.tolist()
    paths = route(tree, np.stack(emb.embedding.to_numpy()).astype(np.float32))
    assert (np.stack(routed.path.to_numpy()) == paths).all()
    leaves = (paths * 4 ** np.arange(2, -1, -1)).sum(1)
    assert (routed.leaf.to_numpy() == leaves).all()
    assert (np.bincount(leaves, minlength=64) == np.asarray(tree.counts[-1])).all()


def test_level_uniform_is_uniform_and_differs_per_level():
    h = np.random.default_rng(1).integers(-(1 << 63), (1 << 63) - 1, size=200_000, dtype=np.int64)
    u1, u2 = level_uniform(h, 1), level_uniform(h, 2)
    assert 0 <= u1.min() and u1.max() < 1
    assert np.abs(np.histogram(u1, bins=10, range=(0, 1))[0] / len(h) - 0.1).max() < 0.005
    assert abs(np.corrcoef(u1, u2)[0, 1]) < 0.01


@pytest.mark.parametrize("uri", ["s3a://bucket/runs/a", "hdfs://nn:8020/runs/a/tree"])
def test_frozen_tree_on_remote_storage_is_a_one_line_error(uri):
    with pytest.raises(SystemExit) as e:
        load_frozen_tree(JobConfig(tree=uri))
    msg = str(e.value)
    assert msg.startswith(f"--tree {uri}: ") and "local or mounted path" in msg and "\n" not in msg


def test_frozen_tree_as_a_file_uri_is_a_local_path(tmp_path):
    with pytest.raises(SystemExit) as e:  # accepted as local: the error is the missing tree's, at that path
        load_frozen_tree(JobConfig(tree=f"file://{tmp_path}"))
    assert str(e.value).startswith(f"--tree {tmp_path}: ") and "local or mounted" not in str(e.value)
