"""Resuming on another number of ranks (real DeepSpeed launches on gloo, tiny config): 2 ranks train and
checkpoint, then the run finishes on 1 and on 3 ranks. The anchor's ZeRO-2 optimizer is re-partitioned by
DeepSpeed (elastic_checkpoint), each new rank gathers its blocks from the old shards (the unit test is
tests/test_store_disk.py), and the loaders read every sequence once in the epoch the checkpoint was in."""

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fixtures import make_run_dir
from test_trainer import train

from index.rundir import read_manifest
from train.data import assign_subtrees
from train.export import load_model

STEPS_BEFORE = 3


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A 2-rank run stopped at its step-3 checkpoint (batch sizes 4: 24 of the 33 sequences read)."""
    root = tmp_path_factory.mktemp("elastic")
    run = make_run_dir(str(root / "run"), k=2, depth=2, seqs_per_leaf=[6, 9, 12, 6], row_group_size=4)
    out = str(root / "out")
    train(
        "deepspeed",
        run,
        out,
        f"schedule.max_steps={STEPS_BEFORE}",
        f"schedule.checkpoint_every={STEPS_BEFORE}",
        "schedule.log_batches=true",
        nproc=2,
    )
    shutil.rmtree(os.path.join(out, "export"))
    return run, out


def read_streams(out: str) -> dict[int, list[dict]]:
    streams = {}
    for name in sorted(os.listdir(os.path.join(out, "batches"))):
        with open(os.path.join(out, "batches", name)) as f:
            streams[int(name[4:-6])] = [json.loads(line) for line in f]
    return streams


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 3])
def test_resume_on_another_world_size_reads_each_sequence_once_and_exports(checkpointed, tmp_path, world):
    run, before = checkpointed
    out = str(tmp_path / "out")
    shutil.copytree(before, out)
    log = train("deepspeed", run, out, "schedule.max_steps=8", "schedule.log_batches=true", nproc=world)
    assert f"resumed from {os.path.join(out, 'checkpoints', 'step00000003')}" in log
    streams = read_streams(out)
    read_before = [s for r in (0, 1) for b in streams[r] if b["step"] <= STEPS_BEFORE for s in b["seq_ids"]]
    assert len(read_before) == len(set(read_before)) == 2 * STEPS_BEFORE * 4

    t = pq.read_table(f"{run}/shards").to_pydict()
    path_of = dict(zip(t["seq_id"], t["path"]))
    new = assign_subtrees(read_manifest(run), world)
    rest = set()
    for r in range(world):
        stream = [s for b in streams.get(r, []) if b["step"] > STEPS_BEFORE for s in b["seq_ids"]]
        own = {s for s, p in path_of.items() if new.owns(r, np.array([p]))[0]}
        left = own - set(read_before)
        assert len(stream) == 5 * 4 >= len(left)
        assert sorted(stream[: len(left)]) == sorted(left), f"rank {r}: the epoch's rest, each sequence once"
        rest |= set(stream[: len(left)])
    assert sorted(set(read_before) | rest) == sorted(path_of)

    anchor, mem, meta = load_model(os.path.join(out, "export"))
    assert meta["step"] == 8
    logits = anchor(torch.randint(2, 100, (2, 8)), mem.fetch(mem.block_ids([[0, 1], [1, 0]]), requires_grad=False))
    assert torch.isfinite(logits).all()
