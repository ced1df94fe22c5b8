"""train/lazy_store.py: a read-only BlockStore over bank files, read block by block, and its serving cache."""

import math

import pytest
import torch

from train.lazy_store import CachedBlockStore, LazyBlockStore
from train.memory import MemoryConfig, TensorBlockStore
from train.model import load_model_config


def test_reads_equal_the_in_memory_store_across_files(tmp_path):
    mem = MemoryConfig(ranks=(4, 2), k=3)
    full = TensorBlockStore.create(mem, load_model_config("tiny"))
    ids = full.owned_ids()
    paths = []
    for i, part in enumerate((ids[ids % 2 == 0], ids[ids % 2 == 1])):  # interleaved ids over two files
        paths.append(str(tmp_path / f"rank{i}.safetensors"))
        sub = TensorBlockStore.create(mem, load_model_config("tiny"), part)
        sub.save(paths[-1])
    lazy = LazyBlockStore(paths)
    assert torch.equal(lazy.owned_ids(), ids)
    for level in full.shapes:
        want = full.ids[level][torch.randperm(full.ids[level].numel(), generator=torch.Generator().manual_seed(level))]
        want = torch.cat([want, want[:2]])  # unordered, with repeats
        a, b = lazy.read(level, want), full.read(level, want)
        assert all(torch.equal(a[n], b[n]) for n in b)
        for i in want.tolist():  # one block: the serving path (one positioned read per tensor)
            a, b = lazy.read(level, [i]), full.read(level, [i])
            assert all(torch.equal(a[n], b[n]) and a[n].shape == b[n].shape for n in b)
    for absent in (ids.max() + 100, -1):  # past the last id, before the first
        with pytest.raises(KeyError, match="not in"):
            lazy.read(1, torch.tensor([absent]))
    with pytest.raises(TypeError, match="read-only"):
        lazy.write(1, full.ids[1][:1], full.read(1, full.ids[1][:1]))
    with pytest.raises(ValueError, match="more than one"):
        LazyBlockStore(paths + paths[:1])
    assert lazy.nbytes() < full.nbytes() / 10  # the blocks stay in the files


def test_cached_store_reads_the_same_blocks_within_its_budget(tmp_path):
    mem = MemoryConfig(ranks=(4, 2, 2), k=3)
    full = TensorBlockStore.create(mem, load_model_config("tiny"))
    full.save(str(tmp_path / "bank.safetensors"))
    block = sum(4 * math.prod(s) for s in full.shapes[2].values())  # levels 2 and 3 blocks are the same size
    cached = CachedBlockStore(LazyBlockStore([str(tmp_path / "bank.safetensors")]), 3 * block, resident_levels=1)
    assert cached.stats()["resident_bytes"] == sum(t.numel() * 4 for t in full.tensors[1].values())
    for level, ids in ((1, [0, 2]), (1, [1]), (2, [3, 4]), (2, [4, 5]), (3, [12, 13]), (2, [5]), (2, [3])):
        a, b = cached.read(level, torch.tensor(ids)), full.read(level, torch.tensor(ids))
        assert all(torch.equal(a[n], b[n]) for n in b)
        assert cached.cached_bytes <= cached.budget
    s = cached.stats()
    # a single block (a view, not a copy) equals a batch's row
    # 3, 4 read; 4 hit, 5 read; 12, 13 read (3 and 4 evicted: the least recently used); 5 hit; 3 read again
    assert (s["fetched"], s["hits"], s["misses"], s["cached_blocks"]) == (11, 2, 6, 3)
    assert s["bytes_read"] == 6 * block and cached.nbytes() < full.nbytes()
    with pytest.raises(TypeError, match="read-only"):
        cached.write(2, torch.tensor([3]), full.read(2, torch.tensor([3])))
