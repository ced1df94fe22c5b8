import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fixtures import make_run_dir

from index.tree import generic_block_ids, local_index, n_tree_blocks, path_block_ids
from index.rundir import read_manifest
from train.data import ShardLoader, assign_subtrees


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


@pytest.fixture(scope="module")
def small_groups(tmp_path_factory):
    """Row groups of 4 sequences: some hold one leaf, some straddle two."""
    return make_run_dir(str(tmp_path_factory.mktemp("rg")), k=2, depth=2, seqs_per_leaf=[6, 9, 12, 6], row_group_size=4)


def test_loader_reads_only_row_groups_of_its_leaves(small_groups):
    o = assign_subtrees(read_manifest(small_groups), 3)  # level-2 subtrees: two ranks share each l1 file
    partial = 0
    for r in range(3):
        loader = ShardLoader(small_groups, o, r, batch_size=4, seed=0, p_generic=0.0)
        listed = {(g.file, g.index): g for g in loader.row_groups}
        for path in sorted({g.file for g in loader.row_groups}):
            f = pq.ParquetFile(path)
            for i in range(f.num_row_groups):
                leaves = set(f.read_row_group(i, columns=["leaf"]).column("leaf").to_pylist())
                owned = {leaf for leaf in leaves if loader.owned_leaf[leaf]}
                if not owned:
                    assert (path, i) not in listed  # another rank's row group is never read
                else:
                    assert listed[(path, i)].partial == (owned != leaves) and listed[(path, i)].rows > 0
                    partial += owned != leaves
    assert partial  # the straddling case was exercised


def test_shuffle_buffer_bounds_the_window_and_resume_is_exact_across_windows(small_groups):
    seqs = all_sequences(small_groups)
    o = assign_subtrees(read_manifest(small_groups), 2)
    own = {s for s, p in seqs.items() if o.owns(0, np.array([p]))[0]}
    a = ShardLoader(small_groups, o, 0, batch_size=5, seed=3, p_generic=0.2, shuffle_buffer=4)
    largest = max(g.rows for g in a.row_groups)
    epochs, seen, states = {}, [], []
    for step in range(3 * len(own) // 5 + 1):
        states.append((a.state_dict(), step))
        epoch = a.epoch if a.position < len(a) else a.epoch + 1
        b = a.next_batch()
        assert a.window.n <= 4 - 1 + largest  # a window stops growing once it reaches the buffer size
        seen.append(b.seq_ids.tolist())
        epochs.setdefault(epoch, []).extend(b.seq_ids.tolist())
    assert sorted(epochs[0][: len(own)]) == sorted(own)
    assert epochs[0][: len(own)] != epochs[1][: len(own)]  # a new order each epoch
    for state, step in states[3::4]:  # resume from states inside, at the start of and across windows
        resumed = ShardLoader(small_groups, o, 0, batch_size=5, seed=3, p_generic=0.2, shuffle_buffer=4)
        resumed.load_state_dict(state)
        assert [resumed.next_batch().seq_ids.tolist() for _ in range(min(3, len(seen) - step))] == seen[step : step + 3]
    with pytest.raises(ValueError, match="shuffle_buffer"):
        ShardLoader(small_groups, o, 0, batch_size=5, seed=3, p_generic=0.2, shuffle_buffer=8).load_state_dict(state)


def test_mixing_warns_when_windows_hold_few_row_groups(small_groups, tmp_path):
    o = assign_subtrees(read_manifest(small_groups), 1)
    few = ShardLoader(small_groups, o, 0, batch_size=4, seed=0, p_generic=0.0, shuffle_buffer=4)
    assert "raise data.shuffle_buffer to 33" in few.mixing()  # windows of one or two row groups of 4
    assert ShardLoader(small_groups, o, 0, batch_size=4, seed=0, p_generic=0.0, shuffle_buffer=33).mixing() is None
    many = make_run_dir(str(tmp_path / "many"), k=2, depth=2, seqs_per_leaf=[40, 40, 40, 40], row_group_size=2)
    assert ShardLoader(many, o, 0, batch_size=4, seed=0, p_generic=0.0, shuffle_buffer=40).mixing() is None


def test_several_runs_with_one_tree_add_up(run, tmp_path):
    from train.data import read_manifests

    other = make_run_dir(str(tmp_path / "b"), k=2, depth=2, seqs_per_leaf=[3, 0, 5, 8])  # seed 0: the same tree
    a, b, both = read_manifest(run), read_manifest(other), read_manifests([run, other])
    assert both["tree_version"] == a["tree_version"] == b["tree_version"]
    assert both["sequences"] == a["sequences"] + b["sequences"] and both["tokens"] == a["tokens"] + b["tokens"]
    for la, lb, lab in zip(a["levels"], b["levels"], both["levels"]):
        assert lab["node_tokens"] == (np.array(la["node_tokens"]) + lb["node_tokens"]).tolist()
    o = assign_subtrees(both, 2)
    assert sum(o.tokens) == both["tokens"]
    seqs = [all_sequences(run), all_sequences(other)]
    for r in range(2):
        loader = ShardLoader([run, other], o, r, batch_size=4, seed=0, p_generic=0.0)
        own = {(i, s) for i, sq in enumerate(seqs) for s, p in sq.items() if o.owns(r, np.array([p]))[0]}
        assert len(loader) == len(own)
        seen = []
        while len(seen) < len(own):
            batch = loader.next_batch()
            seen += list(zip(batch.runs.tolist(), batch.seq_ids.tolist()))
            for run_i, s, p in zip(batch.runs.tolist(), batch.seq_ids.tolist(), batch.paths.tolist()):
                assert seqs[run_i][s] == p
        assert sorted(seen[: len(own)]) == sorted(own)  # both runs, every owned sequence once per epoch


def test_runs_with_different_trees_are_refused(run, tmp_path, capsys):
    from train.main import main

    other = make_run_dir(str(tmp_path / "c"), k=2, depth=2, seed=1)
    with pytest.raises(SystemExit) as e:  # before any process group: one line, exit code 2
        main(["--data", run, other, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and re.match(r"error: .*tree_version .* --tree", err) and "\n" not in err


@pytest.mark.parametrize("new_world", [1, 3])
def test_a_change_of_world_size_reads_every_sequence_once_per_epoch(small_groups, new_world):
    """2 ranks read part of an epoch (one of them into a partial shuffle window); after resuming on
    ``new_world`` ranks, each new rank first reads exactly its sequences the old ranks had not read, then
    full epochs of its own."""
    seqs = all_sequences(small_groups)
    m = read_manifest(small_groups)
    old = assign_subtrees(m, 2)
    args = dict(batch_size=3, seed=5, p_generic=0.0, shuffle_buffer=4)
    read_before, states = [], []
    for r, steps in ((0, 2), (1, 3)):
        loader = ShardLoader(small_groups, old, r, **args)
        for _ in range(steps):
            read_before += loader.next_batch().seq_ids.tolist()
        states.append(loader.state_dict())
    assert len(set(read_before)) == len(read_before)
    new = assign_subtrees(m, new_world)
    after = set()
    for r in range(new_world):
        loader = ShardLoader(small_groups, new, r, **args)
        loader.resume(old, states)
        own = {s for s, p in seqs.items() if new.owns(r, np.array([p]))[0]}
        left = own - set(read_before)
        stream = []
        while len(stream) < len(left) + len(own):
            stream += loader.next_batch().seq_ids.tolist()
        assert sorted(stream[: len(left)]) == sorted(left)  # the rest of the epoch, each once
        assert sorted(stream[len(left) : len(left) + len(own)]) == sorted(own)  # then a whole epoch
        after |= set(stream[: len(left)])
        # a checkpoint inside the remainder resumes it exactly (same world size)
        again = ShardLoader(small_groups, new, r, **args)
        again.resume(old, states)
        again.next_batch()
        copy = ShardLoader(small_groups, new, r, **args)
        copy.load_state_dict(again.state_dict())
        assert [copy.next_batch().seq_ids.tolist() for _ in range(3)] == [
            again.next_batch().seq_ids.tolist() for _ in range(3)
        ]
    assert sorted(set(read_before) | after) == sorted(seqs) and not set(read_before) & after
