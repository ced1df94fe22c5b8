"""train/lazy_store.py: a read-only BlockStore over bank files, read block by block."""
import pytest
import torch

from train.lazy_store import LazyBlockStore
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
    with pytest.raises(KeyError, match="not in"):
        lazy.read(1, torch.tensor([ids.max() + 100]))
    with pytest.raises(TypeError, match="read-only"):
        lazy.write(1, full.ids[1][:1], full.read(1, full.ids[1][:1]))
    with pytest.raises(ValueError, match="more than one"):
        LazyBlockStore(paths + paths[:1])
    assert lazy.nbytes() < full.nbytes() / 10  # the blocks stay in the files
