"""The encoder's precision, length bucketing and run bookkeeping; live progress counts; identical texts embedded
once."""

import multiprocessing
import os
import time

import numpy as np
import pandas as pd
import pytest

from corpora.bbc import bbc_records
from index.encoder import PrecisionMismatch, cpu_has_bf16, embed_texts, load_encoder, resolve_precision, run_precision
from index.router import Router
from index.rundir import write_manifest
from index.tree import Tree
from pipeline.counter import ItemCounter, report
from pipeline.stages import RecentRate, Ticker


def mixed_texts(n: int = 10) -> list[str]:
    """BBC articles cut to very different lengths, so a length-sorted batch holds much padding otherwise."""
    texts = [r["text"] for _, r in zip(range(n), bbc_records())]
    return [" ".join(t.split()[: 4 + 23 * i]) for i, t in enumerate(texts)]


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5), ("bf16", 2e-3)])
def test_bucketed_batches_embed_each_text_as_alone(precision, tol):
    enc = load_encoder(precision=precision)
    texts = mixed_texts()
    alone = np.stack([embed_texts(enc, [t])[0] for t in texts])
    for bucket in (True, False):
        batched = embed_texts(enc, texts, batch_size=4, bucket=bucket)
        assert np.abs(batched - alone).max() < tol, (precision, bucket)
    assert np.allclose(np.linalg.norm(alone, axis=1), 1, atol=1e-5)


def test_bf16_is_close_to_fp32_and_int8_is_not_bitwise():
    texts = mixed_texts()
    fp32 = embed_texts(load_encoder(precision="fp32"), texts)
    bf16 = embed_texts(load_encoder(precision="bf16"), texts)
    int8 = embed_texts(load_encoder(precision="int8"), texts)
    assert (fp32 * bf16).sum(1).min() > 0.999
    assert (fp32 * int8).sum(1).min() < 0.9999  # a different encoder: a run records which one it used


def test_precision_resolution():
    assert resolve_precision("auto") == ("bf16" if cpu_has_bf16() else "fp32")
    assert resolve_precision("int8") == "int8"
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16")


def write_run(root, manifest_precision, tree_precision) -> str:
    """A run directory with a 2-leaf tree on real embeddings and a manifest (router without document index)."""
    run = os.path.join(str(root), "run")
    x = embed_texts(load_encoder(), ["the league match ended in a draw", "shares fell as oil prices rose"])
    Tree(
        k=2,
        depth=1,
        dim=x.shape[1],
        centroids=[x],
        biases=[np.zeros(2)],
        config={} if tree_precision is None else {"encoder_precision": tree_precision},
    ).save(os.path.join(run, "tree"))
    tree = Tree.load(os.path.join(run, "tree"))
    config = (
        {"max_windows": 1}
        if manifest_precision is None
        else {"max_windows": 1, "encoder_precision": manifest_precision}
    )
    level = {"level": 1, "nodes": 2, "node_documents": [1, 1], "node_tokens": [0, 0]}
    write_manifest(
        run,
        {
            "tree_version": tree.version,
            "k": 2,
            "depth": 1,
            "levels": [level],
            "config": config,
            "documents_in": 2,
            "documents_routed": 2,
            "documents_quarantined": 0,
        },
    )
    return run


def test_router_embeds_at_the_runs_precision_and_refuses_another(tmp_path):
    router = Router.load(write_run(tmp_path, "bf16", "bf16"), documents=False)
    texts = ["the striker scored twice in the second half"]
    x = router.embed(texts)
    assert router._encoder.precision == "bf16"
    assert np.array_equal(x, router.embed(texts, precision="bf16"))
    assert router.route_texts(texts)[0, 0] == 0
    with pytest.raises(PrecisionMismatch, match="'bf16'.*'fp32'"):
        router.embed(texts, precision="fp32")


def test_mixed_run_directory_is_refused(tmp_path):
    assert run_precision({"config": {}}, {}) == "fp32"  # runs from before the setting embedded at fp32
    router = Router.load(write_run(tmp_path, "bf16", "fp32"), documents=False)
    with pytest.raises(PrecisionMismatch, match="mixes two runs"):
        router.embed(["some text"])


def _send(address, n):
    for _ in range(n):
        report(address, 2.5)


def test_item_counter_counts_reports_from_other_processes():
    with ItemCounter() as counter:
        procs = [
            multiprocessing.get_context("spawn").Process(target=_send, args=(counter.address, 40)) for _ in range(3)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        deadline = time.time() + 10
        while counter.done < 300 and time.time() < deadline:
            time.sleep(0.05)
        assert counter.done == 300
    report(None, 5)  # no counter: a no-op
    report(counter.address, 5)  # counter closed: dropped, never raises


def test_recent_rate_reads_the_steady_rate_after_start_up():
    rate = RecentRate(t0=0.0, window=60.0)
    # 30 s of model loading, then a steady 10 docs/s, sampled every 10 s
    readings = [rate.add(t, max(0, t - 30) * 10.0) for t in range(10, 301, 10)]
    assert readings[-1] == pytest.approx(10.0)  # done/elapsed would read 9.0 and keep falling short
    assert readings[0] == 0.0 and readings[5] == pytest.approx(30 * 10 / 60)


def test_ticker_prints_counts_rate_and_eta_then_the_end(capsys):
    tick = Ticker("probes", 10, "completions", every=0.0)
    tick.add(4)
    tick.add(6)
    first, last = capsys.readouterr().err.splitlines()
    assert first.startswith("[probes] 4/10 completions, ") and ", ETA " in first
    assert last.startswith("[probes] 10/10 completions, ") and "ETA" not in last  # done: nothing left to wait for
    quiet = Ticker("windows", 10, "windows", every=3600.0)
    quiet.add(4)
    assert capsys.readouterr().err == ""  # between prints it stays silent


@pytest.mark.slow
def test_embed_stage_embeds_identical_texts_once_and_counts_live(tmp_path):
    from pipeline.config import JobConfig
    from pipeline.embed import embed_stage
    from pipeline.spark import spark_session

    spark = spark_session("test-embed")
    distinct = mixed_texts(12)
    copies = [0] * 9 + [1] * 3 + [5] * 2  # text 0: a run of copies longer than an Arrow batch
    texts = distinct + [distinct[i] for i in copies]
    docs = pd.DataFrame(
        {"doc_id": [f"d{i}" for i in range(len(texts))], "source": "t", "row": range(len(texts)), "text": texts}
    )
    spark.createDataFrame(docs).write.parquet(str(tmp_path / "documents"))
    old = spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch")
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "4")
    spark.conf.set("spark.sql.shuffle.partitions", "2")
    try:
        with ItemCounter() as counter:
            stats = embed_stage(
                spark, JobConfig(encoder_batch_size=4, encoder_precision="fp32"), str(tmp_path), counter.address
            )
            deadline = time.time() + 10
            while counter.done < len(texts) and time.time() < deadline:
                time.sleep(0.05)
            assert counter.done == len(texts)
    finally:
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", old)
    assert stats["embeddings_reused"] == len(copies) and stats["encoder_precision"] == "fp32"
    out = pd.read_parquet(tmp_path / "embeddings").set_index("doc_id").loc[docs.doc_id]
    x = np.stack(out.embedding.to_numpy())
    assert out.reused.sum() == len(copies)
    for j, i in enumerate(copies):
        assert np.array_equal(x[len(distinct) + j], x[i])
    alone = np.stack([embed_texts(load_encoder(), [t])[0] for t in distinct])
    assert np.abs(x[: len(distinct)] - alone).max() < 1e-5
