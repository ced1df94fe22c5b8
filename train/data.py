"""What rank r reads: subtree ownership, and the loader over the packed shards.

Ownership. At start the subtrees of one level are bin-packed onto the ranks by
token count (manifest ``levels[l].node_tokens``, greedy: largest subtree to the
least-loaded rank). The level is 1 when there are at least as many non-empty
level-1 nodes as ranks, else the first level deep enough. A rank reads only
the shards of its subtrees and holds only the blocks on their paths: the
subtrees' own nodes, their ancestors (shared with the other ranks under the
same ancestor when the level is > 1) and the generic blocks.

Loader. The rank's sequences are shuffled across all its subtrees with a
permutation drawn per epoch from (seed, rank, epoch); a sequence draws the
generic memory instead of its path with probability ``p_generic`` from the
same generator. The state is (epoch, position), so a resumed run continues
exactly where the checkpoint was taken.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch

from index.tree import generic_block_ids, level_offset, local_index, path_block_ids


def read_manifest(run_dir: str) -> dict:
    path = os.path.join(run_dir, "manifest.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: --data must be the run directory of a finished "
                                "jobs/cluster_corpus.py run (see docs/FORMATS.md)")
    with open(path) as f:
        return json.load(f)


@dataclass(frozen=True)
class Ownership:
    """Subtrees (local indices at ``level``) assigned to each rank, and the blocks that follow from them."""

    k: int
    depth: int
    level: int
    subtrees: tuple[tuple[int, ...], ...]  # per rank
    tokens: tuple[int, ...]  # per rank

    @property
    def world_size(self) -> int:
        return len(self.subtrees)

    def blocks(self, rank: int) -> np.ndarray:
        """Sorted global ids of the blocks rank ``rank`` holds (tree blocks of its subtrees + ancestors, generic)."""
        k, L = self.k, self.level
        ids = set(generic_block_ids(k, self.depth).tolist())
        for s in self.subtrees[rank]:
            for m in range(1, self.depth + 1):
                if m < L:
                    ids.add(level_offset(m, k) + s // k ** (L - m))
                else:
                    lo = s * k ** (m - L)
                    ids.update(range(level_offset(m, k) + lo, level_offset(m, k) + lo + k ** (m - L)))
        return np.array(sorted(ids), dtype=np.int64)

    def holders(self) -> dict[int, tuple[int, ...]]:
        """Block id -> ranks holding it, for blocks held by more than one rank."""
        by_block: dict[int, list[int]] = {}
        for r in range(self.world_size):
            for b in self.blocks(r).tolist():
                by_block.setdefault(b, []).append(r)
        return {b: tuple(rs) for b, rs in by_block.items() if len(rs) > 1}

    def owns(self, rank: int, paths: np.ndarray) -> np.ndarray:
        """Bool [N]: whether each path [N, p] lies in one of rank's subtrees."""
        return np.isin(local_index(paths, self.k, self.level), self.subtrees[rank])


def assign_subtrees(manifest: dict, world_size: int) -> Ownership:
    """Greedy bin packing of subtrees onto ``world_size`` ranks by token count (deterministic)."""
    k, depth = int(manifest["k"]), int(manifest["depth"])
    for level in range(1, depth + 1):
        tokens = np.asarray(manifest["levels"][level - 1]["node_tokens"], dtype=np.int64)
        if len(tokens) != k**level:
            raise ValueError(f"manifest levels[{level - 1}].node_tokens has {len(tokens)} entries, expected {k**level}")
        if (tokens > 0).sum() >= world_size:
            break
    else:
        raise ValueError(f"{world_size} ranks but only {(tokens > 0).sum()} non-empty leaves: use fewer ranks")
    load = np.zeros(world_size, dtype=np.int64)
    subtrees: list[list[int]] = [[] for _ in range(world_size)]
    for node in np.argsort(-tokens, kind="stable"):  # largest first; ties by node index
        r = int(np.argmin(load))  # least loaded; ties to the lowest rank
        subtrees[r].append(int(node))
        load[r] += tokens[node]
    return Ownership(k, depth, level, tuple(tuple(sorted(s)) for s in subtrees), tuple(int(x) for x in load))


@dataclass
class Batch:
    """Sequences with their paths. ``block_ids`` are the path's blocks, or the generic ones where ``generic``."""

    tokens: torch.Tensor  # [B, T+1] int64; inputs = tokens[:, :-1], targets = tokens[:, 1:]
    mask: torch.Tensor  # [B, T] bool: target positions that carry loss (before n_valid)
    paths: torch.Tensor  # [B, p] int64
    block_ids: torch.Tensor  # [B, p] int64 global block ids
    generic: torch.Tensor  # [B] bool
    seq_ids: torch.Tensor  # [B] int64


class ShardLoader:
    """Endless, seeded, resumable batches over the shards of one rank's subtrees."""

    def __init__(self, run_dir: str, ownership: Ownership, rank: int, batch_size: int, seed: int, p_generic: float):
        self.ownership, self.rank, self.batch_size, self.seed, self.p_generic = ownership, rank, batch_size, seed, p_generic
        k = ownership.k
        # Level-1 partitions this rank needs; deeper subtrees are filtered by path prefix inside them.
        l1s = sorted({s // k ** (ownership.level - 1) for s in ownership.subtrees[rank]})
        tables = []
        for i1 in l1s:
            d = os.path.join(run_dir, "shards", f"l1={i1}")
            if os.path.isdir(d):  # an empty subtree has no shard directory
                tables.append(pq.read_table(d, columns=["seq_id", "path", "tokens", "n_valid"]))
        if not tables:
            raise FileNotFoundError(f"{run_dir}/shards has no l1=<i> directory for rank {rank}'s subtrees {list(l1s)}; "
                                    "is the cluster_corpus run complete (stages/pack.json)?")
        seq_id = np.concatenate([t.column("seq_id").to_numpy() for t in tables])
        paths = np.concatenate([np.stack(t.column("path").to_numpy(zero_copy_only=False)) for t in tables]).astype(np.int64)
        n_valid = np.concatenate([t.column("n_valid").to_numpy() for t in tables]).astype(np.int64)
        flat = np.concatenate([t.column("tokens").combine_chunks().flatten().to_numpy() for t in tables])
        if flat.size % len(seq_id):
            raise ValueError(f"{run_dir}/shards: sequences of unequal length; every row must hold seq_len + 1 tokens")
        tokens = flat.reshape(len(seq_id), -1)
        keep = ownership.owns(rank, paths)
        order = np.argsort(seq_id[keep], kind="stable")  # file order is not part of the contract; seq_id is
        self.seq_id, self.paths, self.n_valid, self.tokens = (a[keep][order] for a in (seq_id, paths, n_valid, tokens))
        if len(self.seq_id) == 0:
            raise ValueError(f"rank {rank} owns subtrees {ownership.subtrees[rank]} at level {ownership.level} but "
                             f"{run_dir}/shards holds no sequence of them")
        self.block_ids = path_block_ids(self.paths, k)
        self.generic_ids = generic_block_ids(k, ownership.depth)
        self.epoch, self.position = 0, 0
        self._draw_epoch()

    def __len__(self) -> int:
        return len(self.seq_id)

    def _draw_epoch(self) -> None:
        rng = np.random.default_rng([self.seed, self.rank, self.epoch])
        self.order = rng.permutation(len(self.seq_id))
        self.use_generic = rng.random(len(self.seq_id)) < self.p_generic

    def next_batch(self) -> Batch:
        idx, generic = [], []
        while len(idx) < self.batch_size:
            if self.position == len(self.order):
                self.epoch, self.position = self.epoch + 1, 0
                self._draw_epoch()
            take = min(self.batch_size - len(idx), len(self.order) - self.position)
            idx.extend(self.order[self.position:self.position + take])
            generic.extend(self.use_generic[self.position:self.position + take])
            self.position += take
        idx, generic = np.asarray(idx), np.asarray(generic)
        tokens = self.tokens[idx].astype(np.int64)
        mask = np.arange(1, tokens.shape[1])[None, :] < self.n_valid[idx, None]
        block_ids = np.where(generic[:, None], self.generic_ids[None, :], self.block_ids[idx])
        return Batch(tokens=torch.from_numpy(tokens), mask=torch.from_numpy(mask), paths=torch.from_numpy(self.paths[idx]),
                     block_ids=torch.from_numpy(block_ids), generic=torch.from_numpy(generic),
                     seq_ids=torch.from_numpy(self.seq_id[idx]))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "rank": self.rank,
                "n_sequences": len(self.seq_id)}

    def load_state_dict(self, state: dict) -> None:
        mine = {"seed": self.seed, "rank": self.rank, "n_sequences": len(self.seq_id)}
        theirs = {key: state[key] for key in mine}
        if theirs != mine:
            raise ValueError(f"loader state {theirs} does not match this loader {mine}: same seed, ranks and run directory needed")
        self.epoch, self.position = state["epoch"], state["position"]
        self._draw_epoch()
