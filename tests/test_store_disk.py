"""The disk store (train/store_disk.py) with its prefetcher (train/prefetch.py) against the RAM store."""

import os
import time

import pytest
import torch
import torch.nn.functional as F
from fixtures import make_run_dir
from safetensors import safe_open
from test_trainer import blocks_of

from train.checkpoint import load_bank
from index.rundir import read_manifest
from train.data import ShardLoader, assign_subtrees
from train.memory import MemoryBank, MemoryConfig, TensorBlockStore, param_counts
from train.model import Anchor, ModelConfig
from train.optim import BlockGrads, TouchedAdamW
from train.prefetch import Prefetcher
from train.store_disk import DiskBlockStore

K, DEPTH = 2, 2
MODEL = ModelConfig(vocab_size=300, d_model=16, n_layers=2, n_heads=2, ffn_hidden=32, max_seq_len=32)
MEM = MemoryConfig(kind="ffn", ranks=(2, 4), k=K, depth=DEPTH, p_generic=0.25)
BLOCK_BYTES = {1: 3 * 2 * 2 * 16 * 4, 2: 3 * 4 * 2 * 16 * 4}  # one field of one block, fp32


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run_dir(str(tmp_path_factory.mktemp("run")), k=K, depth=DEPTH, seqs_per_leaf=[6, 9, 12, 6])


def loader_for(run):
    m = read_manifest(run)
    return ShardLoader(run, assign_subtrees(m, 1), 0, batch_size=3, seed=0, p_generic=MEM.p_generic)


def train(store, loader, steps: int, check_untouched: bool = False) -> TouchedAdamW:
    """Memory-only steps over a frozen anchor; with ``check_untouched`` every block off the batch's paths
    must be bit-identical after the step, and every block on them must have moved."""
    torch.manual_seed(0)
    anchor = Anchor(MODEL).requires_grad_(False)
    bank = MemoryBank(MEM, MODEL.n_layers, MODEL.d_model, store)
    opt = TouchedAdamW(store, K, DEPTH, weight_decay=0.1)
    for _ in range(steps):
        batch = loader.next_batch()
        before = blocks_of(store) if check_untouched else None
        fetched = bank.fetch(batch.block_ids)
        logits = anchor(batch.tokens[:, :-1], fetched)
        F.cross_entropy(logits.flatten(0, 1), batch.tokens[:, 1:].flatten()).backward()
        opt.step(
            [
                BlockGrads(l + 1, ids, {n: t.grad for n, t in named.items()})
                for l, (ids, named) in enumerate(zip(fetched.ids, fetched.params))
                if named
            ],
            lr=1e-2,
        )
        if check_untouched:
            after = blocks_of(store)
            changed = {b for b in after if any(not torch.equal(after[b][n], before[b][n]) for n in after[b])}
            assert changed == set(batch.block_ids.flatten().tolist())
    return opt


# 3 records cached, nothing pinned; level 1 (3 blocks x 3 fields) pinned in half the budget, 4 of the 15 level-2
# records cached
@pytest.mark.parametrize("budget, pinned", [(BLOCK_BYTES[2] * 3, set()), (BLOCK_BYTES[1] * 3 * 3 * 2, {1})])
def test_disk_store_trains_bit_identically_to_ram_store(run, tmp_path, budget, pinned):
    steps = 12
    ram = TensorBlockStore.create(MEM, MODEL)
    ram_opt = train(ram, loader_for(run), steps)
    disk = DiskBlockStore.create(MEM, MODEL, ram.owned_ids(), str(tmp_path / "bank"), budget, state=TouchedAdamW.STATE)
    assert {l for (_, l) in disk.bank.pinned} == pinned
    loader = Prefetcher(loader_for(run), disk, depth=2)
    disk_opt = train(disk, loader, steps, check_untouched=True)
    loader.close()
    assert disk.resident_bytes() <= budget
    assert disk.bank.stats["written"] > 0  # updated records did go through the files
    for a, b in ((ram, disk), (ram_opt.exp_avg, disk_opt.exp_avg), (ram_opt.exp_avg_sq, disk_opt.exp_avg_sq)):
        sa, sb = blocks_of(a), blocks_of(b)
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[i][n], sb[i][n]) for i in sa for n in sa[i])
    assert all(torch.equal(ram_opt.steps[l], disk_opt.steps[l]) for l in ram_opt.steps)

    # checkpoint files: the disk store streams the RAM store's format; loading back is exact
    disk.save(str(tmp_path / "bank.safetensors"), {"step": steps})
    disk_opt.save(str(tmp_path / "optim.safetensors"))
    with safe_open(str(tmp_path / "bank.safetensors"), "pt") as f:
        assert f.metadata()["step"] == str(steps)
    saved = blocks_of(TensorBlockStore.load(str(tmp_path / "bank.safetensors")))
    assert all(torch.equal(saved[i][n], v) for i, named in blocks_of(ram).items() for n, v in named.items())
    fresh = DiskBlockStore.create(
        MEM, MODEL, ram.owned_ids(), str(tmp_path / "bank2"), budget, state=TouchedAdamW.STATE
    )
    load_bank([str(tmp_path / "bank.safetensors")], fresh, K, DEPTH)
    fresh_opt = TouchedAdamW(fresh, K, DEPTH, weight_decay=0.1)
    fresh_opt.load([str(tmp_path / "optim.safetensors")])
    ram_opt.load([str(tmp_path / "optim.safetensors")])  # the RAM optimizer reads the same file
    for a, b in ((disk, fresh), (disk_opt.exp_avg_sq, fresh_opt.exp_avg_sq), (ram_opt.exp_avg, fresh_opt.exp_avg)):
        sa, sb = blocks_of(a), blocks_of(b)
        assert all(torch.equal(sa[i][n], sb[i][n]) for i in sa for n in sa[i])


def test_lazy_store_starts_at_once_and_matches_eager_init(tmp_path):
    """A 10 GB bank (blocks + moments): created sparse, blocks materialised on first use with the eager init."""
    model = ModelConfig(vocab_size=300, d_model=256, n_layers=4, n_heads=4, ffn_hidden=512, max_seq_len=32)
    mem = MemoryConfig(kind="ffn", ranks=(64, 64, 64), k=16, depth=3)
    logical = 3 * 4 * param_counts(model, mem)["bank"]
    t0 = time.perf_counter()
    store = DiskBlockStore.create(
        mem, model, torch.arange(16 + 256 + 4096 + 3), str(tmp_path / "big"), 64 << 20, state=TouchedAdamW.STATE
    )
    seconds = time.perf_counter() - t0
    files = [os.path.join(tmp_path / "big", f) for f in os.listdir(tmp_path / "big")]
    assert sum(os.path.getsize(f) for f in files) >= logical > 10e9
    assert sum(os.stat(f).st_blocks * 512 for f in files) == 0  # nothing written: the size costs nothing
    assert seconds < 30, f"creating the lazy store took {seconds:.1f} s"
    ids = {1: torch.tensor([3, 16 + 256 + 4096]), 3: torch.tensor([16 + 256 + 7, 16 + 256 + 4095, 16 + 256 + 4096 + 2])}
    for level, lids in ids.items():
        eager = TensorBlockStore.create(mem, model, lids)
        got = store.read(level, lids)
        assert all(torch.equal(got[n], t) for n, t in eager.read(level, lids).items())
        assert not any(t.any() for t in store.state_store("exp_avg").read(level, lids).values())


@pytest.mark.parametrize("new_world", [1, 3])
def test_another_world_size_gathers_blocks_and_moments_from_the_old_shards(run, tmp_path, new_world):
    """Each old rank saves its shard and optimizer state; each new rank's store and moments then equal,
    block by block, the old shards' (blocks held by two old ranks hold the same values, as training keeps them)."""
    m = read_manifest(run)
    value = {}  # block id -> (params, exp_avg, exp_avg_sq, step), drawn once per block

    def fill(store, opt):
        for level in store.shapes:
            ids = store.ids[level]
            for b in ids.tolist():
                g = torch.Generator().manual_seed(b)
                value.setdefault(
                    b,
                    tuple({n: torch.randn(s, generator=g) for n, s in store.shapes[level].items()} for _ in range(3))
                    + (b + 1,),
                )
            for target, i in ((store, 0), (opt.exp_avg, 1), (opt.exp_avg_sq, 2)):
                target.write(
                    level, ids, {n: torch.stack([value[b][i][n] for b in ids.tolist()]) for n in store.shapes[level]}
                )
            opt.steps[level] = torch.tensor([value[b][3] for b in ids.tolist()])

    old = assign_subtrees(m, 2)
    banks, optims = [], []
    for r in range(2):
        store = TensorBlockStore.create(MEM, MODEL, torch.from_numpy(old.blocks(r)))
        opt = TouchedAdamW(store, K, DEPTH)
        fill(store, opt)
        banks.append(str(tmp_path / f"bank{r}.safetensors"))
        optims.append(str(tmp_path / f"optim{r}.safetensors"))
        store.save(banks[-1])
        opt.save(optims[-1])
    new = assign_subtrees(m, new_world)
    for r in range(new_world):
        store = TensorBlockStore.create(MEM, MODEL, torch.from_numpy(new.blocks(r)))
        opt = TouchedAdamW(store, K, DEPTH)
        load_bank(banks, store, K, DEPTH)
        opt.load(optims)
        for level in store.shapes:
            ids = store.ids[level]
            for got, i in ((store, 0), (opt.exp_avg, 1), (opt.exp_avg_sq, 2)):
                rows = got.read(level, ids)
                for j, b in enumerate(ids.tolist()):
                    assert all(torch.equal(rows[n][j], value[b][i][n]) for n in rows), (r, b, i)
            assert opt.steps[level].tolist() == [value[b][3] for b in ids.tolist()]
    with pytest.raises(ValueError, match="in none of"):
        load_bank(banks[:1], TensorBlockStore.create(MEM, MODEL, torch.from_numpy(old.blocks(1))), K, DEPTH)
