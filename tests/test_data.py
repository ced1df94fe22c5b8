import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fixtures import make_run_dir

from index.tree import generic_block_ids, local_index, n_tree_blocks, path_block_ids
from train.data import ShardLoader, assign_subtrees, read_manifest


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run_dir(str(tmp_path_factory.mktemp("run")), k=2, depth=2, seqs_per_leaf=[6, 9, 12, 6])


def all_sequences(run):
    t = pq.read_table(f"{run}/shards").to_pydict()
    return dict(zip(t["seq_id"], t["path"]))


def test_bin_packing_assigns_every_subtree_once_and_balances(run):
    m = read_manifest(run)
    tokens = np.array(m["levels"][0]["node_tokens"])
    o = assign_subtrees(m, 2)
    assert o.level == 1
    assert sorted(s for sub in o.subtrees for s in sub) == [0, 1]
    assert sorted(o.tokens) == sorted(tokens.tolist())
    o3 = assign_subtrees(m, 3)  # more ranks than level-1 nodes: level-2 subtrees
    assert o3.level == 2
    assert sorted(s for sub in o3.subtrees for s in sub) == [0, 1, 2, 3]
    t2 = np.array(m["levels"][1]["node_tokens"])
    assert max(o3.tokens) - min(o3.tokens) <= t2.max()  # greedy bound
    with pytest.raises(ValueError, match="fewer ranks"):
        assign_subtrees(m, 5)


def test_blocks_cover_own_paths_and_only_ancestors_are_shared(run):
    m = read_manifest(run)
    seqs = all_sequences(run)
    paths = np.array(list(seqs.values()))
    for world in (2, 3):
        o = assign_subtrees(m, world)
        for r in range(world):
            mine = paths[o.owns(r, paths)]
            needed = set(path_block_ids(mine, 2).flatten().tolist()) | set(generic_block_ids(2, 2).tolist())
            assert needed <= set(o.blocks(r).tolist())
        shared = o.holders()
        generic = set(generic_block_ids(2, 2).tolist())
        assert generic <= set(shared)
        # with level-1 subtrees no tree block is shared; with level-2 ones only level-1 blocks are
        tree_shared = {b for b in shared if b < n_tree_blocks(2, 2)}
        if world == 2:
            assert tree_shared == set()
        else:
            assert tree_shared and tree_shared <= {0, 1}


def test_loader_reads_only_own_subtrees_and_covers_them_once_per_epoch(run):
    m = read_manifest(run)
    seqs = all_sequences(run)
    o = assign_subtrees(m, 3)
    for r in range(3):
        loader = ShardLoader(run, o, r, batch_size=4, seed=0, p_generic=0.0)
        own = {s for s, p in seqs.items() if o.owns(r, np.array([p]))[0]}
        assert len(loader) == len(own)
        seen = []
        while len(seen) < len(own):
            b = loader.next_batch()
            assert set(local_index(b.paths.numpy(), 2, o.level).tolist()) <= set(o.subtrees[r])
            seen += b.seq_ids.tolist()
        assert sorted(seen[: len(own)]) == sorted(own)


def test_loader_is_seeded_and_resumes_exactly(run):
    o = assign_subtrees(read_manifest(run), 2)
    a = ShardLoader(run, o, 0, batch_size=5, seed=1, p_generic=0.3)
    b = ShardLoader(run, o, 0, batch_size=5, seed=1, p_generic=0.3)
    c = ShardLoader(run, o, 0, batch_size=5, seed=2, p_generic=0.3)
    first = [a.next_batch().seq_ids.tolist() for _ in range(3)]
    assert first == [b.next_batch().seq_ids.tolist() for _ in range(3)]
    assert first != [c.next_batch().seq_ids.tolist() for _ in range(3)]
    state = a.state_dict()
    resumed = ShardLoader(run, o, 0, batch_size=5, seed=1, p_generic=0.3)
    resumed.load_state_dict(state)
    for _ in range(6):  # crosses an epoch boundary
        x, y = a.next_batch(), resumed.next_batch()
        assert torch.equal(x.seq_ids, y.seq_ids) and torch.equal(x.block_ids, y.block_ids)
    with pytest.raises(ValueError, match="does not match"):
        ShardLoader(run, o, 1, batch_size=5, seed=1, p_generic=0.3).load_state_dict(state)


def test_generic_memory_and_loss_mask(run):
    o = assign_subtrees(read_manifest(run), 2)
    loader = ShardLoader(run, o, 0, batch_size=8, seed=0, p_generic=0.4)
    generic = generic_block_ids(2, 2)
    t = pq.read_table(f"{run}/shards").to_pydict()
    n_valid = dict(zip(t["seq_id"], t["n_valid"]))
    flags = []
    for _ in range(40):
        b = loader.next_batch()
        flags += b.generic.tolist()
        assert (b.block_ids[b.generic] == torch.from_numpy(generic)).all()
        assert torch.equal(b.block_ids[~b.generic], torch.from_numpy(path_block_ids(b.paths[~b.generic].numpy(), 2)))
        for row, s in enumerate(b.seq_ids.tolist()):  # target j is tokens[j+1]: valid while j+1 < n_valid
            assert b.mask[row].sum() == n_valid[s] - 1 and b.mask[row, : n_valid[s] - 1].all()
    assert 0.3 < np.mean(flags) < 0.5
    none = ShardLoader(run, o, 0, batch_size=8, seed=0, p_generic=0.0)
    assert not any(none.next_batch().generic.any() for _ in range(10))
