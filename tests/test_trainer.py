"""End-to-end trainer tests: real launchers (deepspeed, torchrun, plain python) on gloo, tiny config."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fixtures import make_run_dir, trainer_args
from safetensors.torch import load_file

from index.tree import generic_block_ids, n_tree_blocks, path_block_ids
from train.config import load_config
from index.rundir import read_manifest
from train.distributed import free_port
from train.export import load_model
from train.memory import TensorBlockStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
ENV = {
    **os.environ,
    "TORCH_EXTENSIONS_DIR": os.path.join(ROOT, ".cache", "torch_extensions"),
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": ROOT,
}


def launcher(kind: str, nproc: int) -> list[str]:
    if kind == "deepspeed":
        return [f"{BIN}/deepspeed", "--num_gpus", str(nproc), "--master_port", str(free_port())]
    if kind == "torchrun":
        return [f"{BIN}/torchrun", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    return [sys.executable]


def train_cmd(kind: str, run: str, out: str, *sets: str, nproc: int = 2) -> list[str]:
    return launcher(kind, nproc) + trainer_args(run, out, *sets)


def shm_buffers(cmd: list[str]) -> list[str]:
    """DeepSpeed's CPU all-reduce buffers left in /dev/shm by a launch of ``cmd`` (named by its port)."""
    if "--master_port" not in cmd:
        return []
    port = cmd[cmd.index("--master_port") + 1]
    return glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")


def train(kind: str, run: str, out: str, *sets: str, nproc: int = 2) -> str:
    cmd = train_cmd(kind, run, out, *sets, nproc=nproc)
    p = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert not shm_buffers(cmd), "a finished run must not leave its shared memory behind (RAM until reboot)"
    return p.stdout


def losses(out: str) -> dict[int, float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {m["step"]: m["loss"] for m in map(json.loads, f)}  # a replayed step keeps its last value


def bank(out: str, step: int, rank: int) -> TensorBlockStore:
    return TensorBlockStore.load(os.path.join(out, "checkpoints", f"step{step:08d}", f"rank{rank}", "bank.safetensors"))


def blocks_of(store: TensorBlockStore) -> dict[int, dict[str, torch.Tensor]]:
    out = {}
    for level in store.shapes:
        ids = store.ids[level]
        rows = store.read(level, ids)
        out.update({b: {n: t[j] for n, t in rows.items()} for j, b in enumerate(ids.tolist())})
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run_dir(str(tmp_path_factory.mktemp("run")), k=2, depth=2, seqs_per_leaf=[6, 9, 12, 6])


@pytest.mark.slow
def test_ranks_update_only_blocks_on_their_paths(run, tmp_path):
    """3 ranks on k=2: level-2 subtrees, so level-1 blocks are shared by subgroups and generic ones by all."""
    out, world = str(tmp_path / "out"), 3
    train(
        "deepspeed",
        run,
        out,
        "schedule.max_steps=3",
        "schedule.checkpoint_every=1",
        "schedule.log_batches=true",
        "memory.p_generic=0.25",
        nproc=world,
    )
    t = pq.read_table(f"{run}/shards").to_pydict()
    path_of = dict(zip(t["seq_id"], t["path"]))
    batches = {}
    for r in range(world):
        with open(os.path.join(out, "batches", f"rank{r}.jsonl")) as f:
            batches[r] = {b["step"]: b for b in map(json.loads, f)}

    generic = set(generic_block_ids(2, 2).tolist())

    def touched(r, step):
        b = batches[r][step]
        paths = np.array([path_of[s] for s, g in zip(b["seq_ids"], b["generic"]) if not g]).reshape(-1, 2)
        return set(path_block_ids(paths, 2).flatten().tolist()) | (generic if any(b["generic"]) else set())

    held = [set(blocks_of(bank(out, 1, r))) for r in range(world)]
    for r in range(world):  # a rank holds the blocks of its sequences' paths
        seq_paths = np.array([path_of[s] for b in batches[r].values() for s in b["seq_ids"]])
        assert set(path_block_ids(seq_paths, 2).flatten().tolist()) <= held[r]
    shared = {b for r in range(world) for q in range(r) for b in held[r] & held[q]}
    assert generic <= shared and shared - generic and shared - generic <= {0, 1}  # only ancestors are shared
    for step in (2, 3):
        anyone = set().union(*(touched(r, step) for r in range(world)))
        after = [blocks_of(bank(out, step, r)) for r in range(world)]
        for r in range(world):
            before = blocks_of(bank(out, step - 1, r))
            changed = {i for i in after[r] if any(not torch.equal(after[r][i][n], before[i][n]) for n in before[i])}
            assert changed == anyone & held[r], f"rank {r} step {step}"  # everything else is bit-identical
        for i in shared:  # replicas of a shared block agree bit for bit
            copies = [a[i] for a in after if i in a]
            assert all(torch.equal(c[n], copies[0][n]) for c in copies for n in c)

    anchor, mem, meta = load_model(os.path.join(out, "export"))
    assert meta["tree_version"] == read_manifest(run)["tree_version"] and meta["step"] == 3
    final = {i: b for r in range(world) for i, b in blocks_of(bank(out, 3, r)).items()}
    exported = blocks_of(mem.store)
    assert set(exported) == set(range(n_tree_blocks(2, 2))) | generic
    assert all(torch.equal(exported[i][n], final[i][n]) for i in final for n in final[i])
    tokens = torch.randint(2, 100, (2, 8))
    logits = anchor(tokens, mem.fetch(mem.block_ids([[0, 1], [1, 0]]), requires_grad=False))
    assert logits.shape == (2, 8, meta["model"]["vocab_size"])


RESUMED = ("schedule.max_steps=40", "schedule.checkpoint_every=10")


@pytest.fixture(scope="module")
def uninterrupted(run, tmp_path_factory):
    """The kill-and-resume tests' reference: RESUMED's run, never killed, its bank in RAM."""
    ref = str(tmp_path_factory.mktemp("uninterrupted"))
    train("torchrun", run, ref, *RESUMED)
    return ref


@pytest.mark.slow
@pytest.mark.parametrize("store", [(), ("memory.store=disk", "memory.ram_budget_mb=0.01")], ids=["ram", "disk"])
def test_kill_and_resume_matches_uninterrupted_run(run, uninterrupted, tmp_path, store):
    """The reference keeps the bank in RAM; the killed run uses ``store`` (disk: ~2 records cached, the rest
    evicted and written behind every step), so the disk store is also held to the RAM store's losses."""
    out = str(tmp_path / "out")
    sets = RESUMED + store
    cmd = train_cmd("deepspeed", run, out, *sets)
    p = subprocess.Popen(
        cmd, env=ENV, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    latest = os.path.join(out, "checkpoints", "latest")
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if os.path.exists(latest) and open(latest).read().strip() >= "step00000020":
            break
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not shm_buffers(cmd), "a killed run must not leave its shared memory behind"
    assert not os.path.exists(os.path.join(out, "export")), "the run finished before it was killed"
    log = train("deepspeed", run, out, *sets)
    assert "resumed from" in log
    assert os.path.isdir(os.path.join(out, "bank_store", "rank1")) == bool(store)
    a, b = losses(uninterrupted), losses(out)
    assert sorted(a) == sorted(b) == list(range(1, 41))
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-5


@pytest.mark.slow
def test_recipes_dense_baseline_then_frozen_anchor(run, tmp_path):
    dense, mem_only = str(tmp_path / "dense"), str(tmp_path / "mem")
    train("python", run, dense, "recipe.name=anchor_only", "schedule.max_steps=3")
    anchor, mem, meta = load_model(os.path.join(dense, "export"))
    assert mem is None and meta["memory"] is None
    train(
        "python", run, mem_only, "recipe.name=memory_only", f"recipe.init_anchor={dense}/export", "schedule.max_steps=3"
    )
    before = load_file(os.path.join(dense, "export", "anchor.safetensors"))
    after = load_file(os.path.join(mem_only, "export", "anchor.safetensors"))
    assert all(torch.equal(before[n], after[n]) for n in before)  # the frozen anchor did not move
    ckpt = os.path.join(mem_only, "checkpoints", "step00000003", "rank0", "bank.safetensors")
    trained = blocks_of(TensorBlockStore.load(ckpt))
    _, mem, _ = load_model(os.path.join(mem_only, "export"))
    fresh = blocks_of(TensorBlockStore.create(mem.config, anchor.cfg))
    assert any(not torch.equal(trained[i]["w_down"], fresh[i]["w_down"]) for i in trained)  # the memory did


def test_config_resolves_against_the_run_and_rejects_unknown_keys(run):
    m = read_manifest(run)
    cfg = load_config("tiny", ["optim.memory.lr=1e-3", "memory.ranks=[2,1]", "deepspeed.zero_stage=3"], m)
    assert cfg.optim.memory.lr == 1e-3 and cfg.memory.ranks == (2, 1) and cfg.deepspeed.zero_stage == 3
    assert (cfg.model.vocab_size, cfg.memory.k, cfg.memory.depth) == (m["vocab_size"], m["k"], m["depth"])
    assert cfg.ds_config(bf16=False)["zero_optimization"]["stage"] == 3
    with pytest.raises(ValueError, match="unknown keys"):
        load_config("tiny", ["optim.lr=1e-3"], m)
    with pytest.raises(ValueError, match="one rank per level"):
        load_config("tiny", ["memory.ranks=[1,2,3]"], m)
    with pytest.raises(ValueError, match="init_anchor"):
        load_config("tiny", ["recipe.name=memory_only"], m)


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["no_manifest", "bad_set"])
def test_input_errors_are_one_line_once_per_launch(problem, run, tmp_path):
    """Two ranks meet the same error; the launch prints it once, as one line, with no traceback."""
    data, sets = (str(tmp_path / "missing"), ()) if problem == "no_manifest" else (run, ("schedule.max_stepz=3",))
    p = subprocess.run(
        train_cmd("deepspeed", data, str(tmp_path / "out"), *sets),
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode != 0
    errors = [line for line in (p.stdout + p.stderr).splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    assert {"no_manifest": "manifest.json is missing", "bad_set": "unknown keys ['max_stepz']"}[problem] in errors[0]
    assert "Traceback" not in p.stdout + p.stderr


@pytest.mark.slow
def test_trains_on_two_runs_with_one_tree(run, tmp_path):
    other = make_run_dir(str(tmp_path / "b"), k=2, depth=2, seqs_per_leaf=[4, 0, 7, 3])  # seed 0: run's tree
    out = str(tmp_path / "out")
    cmd = launcher("torchrun", 2) + trainer_args([run, other], out, "schedule.max_steps=6", "schedule.log_batches=true")
    p = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    paths = [
        dict(zip(*pq.read_table(f"{d}/shards", columns=["seq_id", "path"]).to_pydict().values())) for d in (run, other)
    ]
    read = set()
    for r in range(2):
        with open(os.path.join(out, "batches", f"rank{r}.jsonl")) as f:
            for b in map(json.loads, f):
                read |= {(i, s) for i, s in zip(b["runs"], b["seq_ids"])}
    assert {i for i, _ in read} == {0, 1} and all(s in paths[i] for i, s in read)  # both runs feed the steps
    _, _, meta = load_model(os.path.join(out, "export"))
    assert meta["runs"] == [os.path.abspath(run), os.path.abspath(other)]


@pytest.mark.slow
def test_zero_stage_0_exports_one_bank_file_per_rank(run, tmp_path):
    out = str(tmp_path / "out")
    train("deepspeed", run, out, "deepspeed.zero_stage=0", "schedule.max_steps=3")
    export = os.path.join(out, "export")
    with open(os.path.join(export, "meta.json")) as f:
        files = json.load(f)["bank_files"]
    assert sorted(files) == ["bank/rank0.safetensors", "bank/rank1.safetensors"]
    listed = {}  # block -> file, from meta.json's ranges; every block in exactly one file, as that file holds it
    for name, levels in files.items():
        held = set(blocks_of(TensorBlockStore.load(os.path.join(export, name))))
        ranges = {b for runs in levels.values() for lo, hi in runs for b in range(lo, hi)}
        assert ranges == held and not held & set(listed)
        listed.update(dict.fromkeys(held, name))
    assert set(listed) == set(range(n_tree_blocks(2, 2))) | set(generic_block_ids(2, 2).tolist())
    ckpt = os.path.join(out, "checkpoints", "step00000003")
    module = torch.load(os.path.join(ckpt, "mp_rank_00_model_states.pt"), weights_only=True)["module"]
    anchor, mem, _ = load_model(export)
    assert all(torch.equal(anchor.state_dict()[n], module[n]) for n in module)  # stage 0: the module states
    final = {i: b for r in range(2) for i, b in blocks_of(bank(out, 3, r)).items()}
    exported = blocks_of(mem.store)
    assert all(torch.equal(exported[i][n], final[i][n]) for i in final for n in final[i])
    os.rename(os.path.join(export, "bank", "rank1.safetensors"), os.path.join(out, "rank1.safetensors"))
    with pytest.raises(FileNotFoundError, match="rank1.safetensors.*copy every file listed"):
        load_model(export)
