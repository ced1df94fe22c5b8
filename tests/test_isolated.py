"""data.isolated (train/data.py SubtreeStream): each level-1 subtree is an independent training stream, so its
blocks are a function of its own sequences alone (real launches on gloo, tiny config, frozen anchor)."""

import os
import shutil

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from fixtures import make_run_dir
from safetensors.torch import save_file
from test_trainer import blocks_of, train

from index.rundir import read_manifest, write_manifest
from index.tree import generic_block_ids, level_offset
from train.config import load_config
from train.export import load_model
from train.main import main
from train.memory import TensorBlockStore
from train.model import Anchor

K, DEPTH, STEPS = 2, 2, 8
SEQS = [6, 9, 12, 6]  # subtree 0: leaves 0, 1 (15 sequences); subtree 1: leaves 2, 3 (18)


def subtree_blocks(s: int) -> set[int]:
    return {level_offset(1, K) + s} | {level_offset(2, K) + s * K + j for j in range(K)}


def give_back_subtree_1(a: str, b: str) -> None:
    """Run ``b``'s subtree 1 becomes ``a``'s again (the same sequences), under ``b``'s seq_ids (shifted by b's
    larger subtree 0, as a corpus-wide numbering would) and in another file and row-group layout."""
    shift = read_manifest(b)["levels"][0]["node_documents"][0] - SEQS[0] - SEQS[1]
    t = pq.read_table(os.path.join(a, "shards", "l1=1", "part-00000.parquet"))
    t = t.set_column(0, "seq_id", pc.add(t["seq_id"], shift)).sort_by("seq_id")  # a's file is in reverse order
    d = os.path.join(b, "shards", "l1=1")
    shutil.rmtree(d)
    os.makedirs(d)
    pq.write_table(t.slice(0, 7), os.path.join(d, "part-00000.parquet"), row_group_size=5)
    pq.write_table(t.slice(7), os.path.join(d, "part-00001.parquet"), row_group_size=3)
    ma, mb = read_manifest(a), read_manifest(b)
    for la, lb in zip(ma["levels"], mb["levels"]):
        half = len(la["node_tokens"]) // K
        for key in ("node_documents", "node_tokens"):
            lb[key][half:] = la[key][half:]
    n = sum(mb["levels"][-1]["node_documents"])
    mb.update(documents_in=n, documents_routed=n, sequences=n, tokens=sum(mb["levels"][-1]["node_tokens"]))
    write_manifest(b, mb)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(a, b, anchor): b has other documents in subtree 0 (4 more sequences) and a's in subtree 1; anchor is an
    init_anchor directory (a fresh tiny anchor) for the frozen-anchor recipe."""
    root = tmp_path_factory.mktemp("isolated")
    a = make_run_dir(str(root / "a"), k=K, depth=DEPTH, seqs_per_leaf=SEQS, row_group_size=4)
    b = make_run_dir(str(root / "b"), k=K, depth=DEPTH, seqs_per_leaf=[8, 11, 12, 6], row_group_size=4)  # a's tree
    give_back_subtree_1(a, b)
    anchor = str(root / "anchor")
    os.makedirs(anchor)
    torch.manual_seed(0)
    weights = Anchor(load_config("tiny", [], read_manifest(a)).model).state_dict()
    save_file({n: t.detach().clone().contiguous() for n, t in weights.items()}, f"{anchor}/anchor.safetensors")
    return a, b, anchor


def isolated(anchor: str, *more: str) -> tuple[str, ...]:
    return (
        "data.isolated=true",
        "recipe.name=memory_only",
        f"recipe.init_anchor={anchor}",
        "memory.p_generic=0",
        "data.shuffle_buffer=8",  # chunks of 1 sequence, windows of 8: several windows and epochs in 8 steps
        f"schedule.max_steps={STEPS}",
        *more,
    )


def exported(out: str) -> dict[int, dict[str, torch.Tensor]]:
    return blocks_of(load_model(os.path.join(out, "export"))[1].store)


def same(x: dict, y: dict) -> bool:
    return set(x) == set(y) and all(torch.equal(x[n], y[n]) for n in x)


@pytest.fixture(scope="module")
def one_rank(runs, tmp_path_factory):
    a, _, anchor = runs
    out = str(tmp_path_factory.mktemp("one_rank") / "out")
    train("python", a, out, *isolated(anchor))
    return exported(out)


@pytest.mark.slow
def test_a_subtree_does_not_see_another_subtree_change(runs, one_rank, tmp_path):
    a, b, anchor = runs
    out = str(tmp_path / "b")
    train("python", b, out, *isolated(anchor))
    other = exported(out)
    assert all(same(one_rank[i], other[i]) for i in subtree_blocks(1))  # bit-identical
    assert not all(same(one_rank[i], other[i]) for i in subtree_blocks(0))  # the changed subtree's moved
    anchor_model, mem, _ = load_model(os.path.join(out, "export"))
    fresh = blocks_of(TensorBlockStore.create(mem.config, anchor_model.cfg))
    assert all(same(other[i], fresh[i]) for i in generic_block_ids(K, DEPTH).tolist())  # generic: untrained


@pytest.fixture(scope="module")
def two_ranks(runs, tmp_path_factory):
    """A 2-rank run (one subtree each) with checkpoints at steps 4 and 8."""
    a, _, anchor = runs
    out = str(tmp_path_factory.mktemp("two_ranks") / "out")
    train("deepspeed", a, out, *isolated(anchor, "schedule.checkpoint_every=4"), nproc=2)
    return out


def resume_from_step_4(ckpts: str, out: str, nproc: int, runs) -> dict:
    """The blocks at the end of a run of ``nproc`` ranks resumed from ``ckpts``'s step-4 checkpoint in ``out``."""
    a, _, anchor = runs
    shutil.copytree(os.path.join(ckpts, "step00000004"), os.path.join(out, "checkpoints", "step00000004"))
    with open(os.path.join(out, "checkpoints", "latest"), "w") as f:
        f.write("step00000004")
    launcher = "deepspeed" if nproc > 1 else "python"
    assert "resumed from" in train(launcher, a, out, *isolated(anchor, "schedule.checkpoint_every=4"), nproc=nproc)
    return exported(out)


TREE = subtree_blocks(0) | subtree_blocks(1)


@pytest.mark.slow
def test_one_rank_and_two_ranks_and_a_resume_train_the_same_blocks(runs, one_rank, two_ranks, tmp_path):
    """Both subtrees on one rank, or one each on two, and two resumed from step 4: the same blocks, bit for bit."""
    assert all(same(one_rank[i], exported(two_ranks)[i]) for i in TREE)
    resumed = resume_from_step_4(os.path.join(two_ranks, "checkpoints"), str(tmp_path / "out"), 2, runs)
    assert all(same(one_rank[i], resumed[i]) for i in TREE)


@pytest.mark.slow
def test_a_resume_on_another_number_of_ranks_trains_the_same_blocks(runs, one_rank, two_ranks, tmp_path):
    """The 2-rank step-4 checkpoint finished on 1 rank: each subtree's stream state moves with its subtree."""
    resumed = resume_from_step_4(os.path.join(two_ranks, "checkpoints"), str(tmp_path / "out"), 1, runs)
    assert all(same(one_rank[i], resumed[i]) for i in TREE)


@pytest.mark.parametrize(
    "sets, world, message",
    [
        (("recipe.name=cotrain",), 1, "data.isolated trains each level-1 subtree on its own and needs a frozen anchor"),
        (("memory.p_generic=0.25",), 1, "needs memory.p_generic=0 (not 0.25)"),
        ((), 3, "data.isolated: 3 ranks but the run has 2 non-empty level-1 subtrees"),
    ],
    ids=["cotrain", "p_generic", "ranks"],
)
def test_refusals_are_one_line_before_the_launch(runs, tmp_path, monkeypatch, capsys, sets, world, message):
    a, _, anchor = runs
    monkeypatch.setenv("WORLD_SIZE", str(world))  # what a launcher of ``world`` ranks sets
    monkeypatch.delenv("RANK", raising=False)
    argv = ["--config", "tiny", "--data", a, "--out", str(tmp_path / "out")]
    for s in isolated(anchor, *sets):
        argv += ["--set", s]
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not os.path.exists(tmp_path / "out")
