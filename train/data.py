"""What rank r reads: subtree ownership, and the loader over the packed shards.

Ownership. At start the subtrees of one level are bin-packed onto the ranks by
token count (manifest ``levels[l].node_tokens``, greedy: largest subtree to the
least-loaded rank). The level is 1 when there are at least as many non-empty
level-1 nodes as ranks, else the first level deep enough. A rank reads only
the shards of its subtrees and holds only the blocks on their paths: the
subtrees' own nodes, their ancestors (shared with the other ranks under the
same ancestor when the level is > 1) and the generic blocks.

Loader. It streams Parquet row groups and never holds more than one shuffle
window: it lists the row groups of the rank's level-1 partitions
(``shards/l1=<i1>/``) and keeps those whose ``leaf`` statistics meet its leaves
(the shards are sorted by leaf, so a level-L subtree is a few row groups); a
row group that also holds other ranks' leaves is filtered by its ``leaf``
column. Per epoch, a generator seeded by (seed, rank, epoch) permutes the row
groups; consecutive ones are grouped into windows of at least
``shuffle_buffer`` sequences (the job writes row groups of about
``row_group_sequences``, so a window mixes many random pieces of the rank's
subtrees; ``mixing`` warns when it cannot), and each window is read and shuffled by a
generator seeded by (seed, rank, epoch, window), which also draws which
sequences use the generic memory (probability ``p_generic``). The state is
(epoch, position): a resumed run reads only the window holding the position
and continues exactly where the checkpoint was taken.

Isolated subtrees (``data.isolated``, ``IsolatedLoader``): each level-1 subtree of the rank is its own
stream (``SubtreeStream``), ordered from its own sequences alone, and gives its own batch every step.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch

from index.rundir import TRAINING, read_manifest
from index.tree import generic_block_ids, level_offset, local_index, path_block_ids


# what must agree between runs trained together: one tree, one tokenizer, one sequence length
SHARED_KEYS = ("tree_version", "k", "depth", "seq_len", "vocab_size", "eot_id", "pad_id")
SUMMED_KEYS = ("documents_in", "documents_routed", "documents_quarantined", "sequences", "tokens")


def read_manifests(run_dirs: list[str]) -> dict:
    """One manifest for several runs routed with the same tree (``cluster_corpus.py --tree RUN_A``).

    Runs must agree on SHARED_KEYS and on tokenizer.json; per-node counts (``levels[l].node_tokens``,
    ``node_documents``) and SUMMED_KEYS add up, so ownership is bin-packed over all runs' tokens.
    """
    manifests = [read_manifest(d, TRAINING) for d in run_dirs]
    first, out = run_dirs[0], dict(manifests[0])
    tok = _tokenizer_bytes(first)
    for d, m in zip(run_dirs[1:], manifests[1:]):
        for key in SHARED_KEYS:
            if m.get(key) != out.get(key):
                raise ValueError(
                    f"--data: {d} has {key} {m.get(key)!r} but {first} has {out.get(key)!r}; runs trained "
                    f"together must share one tree and tokenizer (route the new corpus with "
                    f"jobs/cluster_corpus.py --tree {first})"
                )
        if _tokenizer_bytes(d) != tok:
            raise ValueError(
                f"--data: {d}/tokenizer.json differs from {first}/tokenizer.json; runs trained together "
                f"must share one tokenizer (route the new corpus with jobs/cluster_corpus.py --tree {first})"
            )
    if len(run_dirs) > 1:
        for key in SUMMED_KEYS:
            out[key] = sum(int(m.get(key, 0)) for m in manifests)
        out["levels"] = [
            {
                **lv,
                **{
                    c: np.sum([m["levels"][i][c] for m in manifests], axis=0).tolist()
                    for c in ("node_documents", "node_tokens")
                },
            }
            for i, lv in enumerate(out["levels"])
        ]
    out["runs"] = [os.path.abspath(d) for d in run_dirs]
    return out


def _tokenizer_bytes(run_dir: str) -> bytes | None:
    path = os.path.join(run_dir, "tokenizer.json")
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return f.read()


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


def nonempty_l1(manifest: dict) -> list[int]:
    """The level-1 nodes holding tokens: data.isolated's streams, and the most ranks it can use."""
    return [i for i, t in enumerate(manifest["levels"][0]["node_tokens"]) if t > 0]


@dataclass
class Batch:
    """Sequences with their paths. ``block_ids`` are the path's blocks, or the generic ones where ``generic``."""

    tokens: torch.Tensor  # [B, T+1] int64; inputs = tokens[:, :-1], targets = tokens[:, 1:]
    mask: torch.Tensor  # [B, T] bool: target positions that carry loss (before n_valid)
    paths: torch.Tensor  # [B, p] int64
    block_ids: torch.Tensor  # [B, p] int64 global block ids
    generic: torch.Tensor  # [B] bool
    seq_ids: torch.Tensor  # [B] int64, unique within one run directory
    runs: torch.Tensor  # [B] int64: which of the loader's ``run_dirs`` each sequence comes from


MIN_ROW_GROUPS_PER_WINDOW = 16  # fewer, and a window is a handful of leaves (see ShardLoader.mixing)
RUN_SHIFT = 40  # a sequence's key across runs: run << RUN_SHIFT | seq_id (seq_id < 2^40 within one run)


def sequence_keys(run: int, table) -> np.ndarray:
    """The keys of a shard table's rows (its ``seq_id`` column), read from run directory ``run``."""
    return (np.int64(run) << RUN_SHIFT) | table.column("seq_id").to_numpy().astype(np.int64)


@dataclass(frozen=True)
class RowGroup:
    """A Parquet row group holding sequences of this rank; ``partial``: it holds other ranks' leaves too."""

    run: int
    file: str
    index: int
    rows: int  # this rank's sequences in it
    partial: bool


class Window:
    """The shuffle buffer: this rank's rows of consecutive row groups, as flat arrays (no per-row objects)."""

    def __init__(self, n: int, depth: int):
        self.n, self.depth, self.filled = n, depth, 0
        self.tokens = None  # [n, seq_len + 1] int32, allocated at the first row group (its width)
        self.paths = np.empty((n, depth), dtype=np.int64)
        self.n_valid = np.empty(n, dtype=np.int64)
        self.seq_id = np.empty(n, dtype=np.int64)
        self.runs = np.empty(n, dtype=np.int64)

    def append(self, table, run: int, keep: np.ndarray | None, where: str) -> None:
        rows = table.num_rows
        flat = table.column("tokens").combine_chunks().flatten().to_numpy()
        path = table.column("path").combine_chunks().flatten().to_numpy()
        if self.tokens is None and rows:
            self.tokens = np.empty((self.n, flat.size // rows), dtype=np.int32)
        if rows and flat.size != rows * self.tokens.shape[1]:
            raise ValueError(f"{where}: sequences of unequal length; every row must hold seq_len + 1 tokens")
        if path.size != rows * self.depth:
            raise ValueError(f"{where}: a path is not {self.depth} long (the run's tree depth)")
        cols = (
            flat.reshape(rows, -1),
            path.reshape(rows, self.depth),
            table.column("n_valid").to_numpy(),
            table.column("seq_id").to_numpy(),
        )
        if keep is not None:
            cols = tuple(c[keep] for c in cols)
        lo = self.filled
        self.filled += len(cols[-1])
        for dst, src in zip((self.tokens, self.paths, self.n_valid, self.seq_id), cols):
            dst[lo : self.filled] = src
        self.runs[lo : self.filled] = run


class ShardLoader:
    """Endless, seeded, resumable batches streamed from the shards of one rank's subtrees (one or more runs).

    Memory: one window (``shuffle_buffer`` sequences, or more when one row group is larger) plus the row
    group being decoded; it does not grow with the amount of shard data.
    """

    def __init__(
        self,
        run_dirs: str | list[str],
        ownership: Ownership,
        rank: int,
        batch_size: int,
        seed: int,
        p_generic: float,
        shuffle_buffer: int = 16384,
    ):
        if shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer = {shuffle_buffer}: must be at least 1 sequence")
        self.run_dirs = [run_dirs] if isinstance(run_dirs, str) else list(run_dirs)
        self.ownership, self.rank, self.batch_size, self.seed = ownership, rank, batch_size, seed
        self.p_generic, self.shuffle_buffer = p_generic, shuffle_buffer
        k, depth = ownership.k, ownership.depth
        span = k ** (depth - ownership.level)  # a level-L subtree s holds the leaves [s*span, (s+1)*span)
        self.owned_leaf = np.zeros(k**depth, dtype=bool)
        for s in ownership.subtrees[rank]:
            self.owned_leaf[s * span : (s + 1) * span] = True
        self.row_groups = [rg for run, d in enumerate(self.run_dirs) for rg in self._scan(run, d)]
        self.n_sequences = sum(rg.rows for rg in self.row_groups)
        if self.n_sequences == 0:
            raise ValueError(
                f"rank {rank} owns subtrees {ownership.subtrees[rank]} at level {ownership.level} but "
                f"the shards of {self.run_dirs} hold no sequence of them"
            )
        self.generic_ids = generic_block_ids(k, depth)
        self.epoch, self.position = 0, 0
        self.skip = np.zeros(0, dtype=np.int64)  # sorted keys this epoch does not read again (``resume``)
        self._plan_epoch()

    def mixing(self) -> str | None:
        """A warning when a shuffle window holds too few row groups to mix the rank's subtrees, else None.

        Row groups are leaf-sorted, so a window of a few large ones trains on a few leaves at a time and the
        model forgets the rest between windows (shards of a job before row_group_sequences: one per file).
        """
        per_window = len(self.row_groups) / len(self.windows)
        if len(self.windows) == 1 or per_window >= MIN_ROW_GROUPS_PER_WINDOW:
            return None
        return (
            f"rank {self.rank}: each shuffle window of ~{self.shuffle_buffer} sequences mixes only "
            f"{per_window:.1f} of {len(self.row_groups)} row groups (~{self.n_sequences // len(self.row_groups)} "
            f"sequences each): training sees a few leaves at a time; raise data.shuffle_buffer to "
            f"{self.n_sequences} or re-pack with a smaller row_group_sequences"
        )

    def _scan(self, run: int, run_dir: str) -> list[RowGroup]:
        """This rank's row groups in one run: its level-1 partitions, then the row groups' ``leaf`` statistics."""
        k = self.ownership.k
        l1s = sorted({s // k ** (self.ownership.level - 1) for s in self.ownership.subtrees[self.rank]})
        if not any(os.path.isdir(os.path.join(run_dir, "shards", f"l1={i}")) for i in range(k)):
            raise FileNotFoundError(
                f"{run_dir}/shards has no l1=<i> directory; is the cluster_corpus run complete (stages/pack.json)?"
            )
        out = []
        for i1 in l1s:
            d = os.path.join(run_dir, "shards", f"l1={i1}")
            files = sorted(f for f in os.listdir(d) if f.endswith(".parquet")) if os.path.isdir(d) else []
            for name in files:  # an empty subtree has no directory
                path = os.path.join(d, name)
                meta = pq.read_metadata(path)
                if "leaf" not in meta.schema.names:
                    raise ValueError(f"{path} has no 'leaf' column (docs/FORMATS.md, shards/)")
                col = meta.schema.names.index("leaf")
                for i in range(meta.num_row_groups):
                    rg = meta.row_group(i)
                    stats = rg.column(col).statistics
                    if stats is not None and stats.has_min_max:
                        inside = self.owned_leaf[int(stats.min) : int(stats.max) + 1]
                        if not inside.any():
                            continue  # other ranks' leaves only: never read
                        if inside.all():
                            out.append(RowGroup(run, path, i, rg.num_rows, False))
                            continue
                    # mixed leaves, or no statistics: count this rank's rows from the leaf column alone
                    leaf = pq.ParquetFile(path).read_row_group(i, columns=["leaf"]).column("leaf").to_numpy()
                    if n := int(self.owned_leaf[leaf].sum()):
                        out.append(RowGroup(run, path, i, n, True))
        return out

    def __len__(self) -> int:
        return self.n_sequences

    def _rng(self, *window: int) -> np.random.Generator:
        """The generator of this epoch's order (with ``window``: of that window's shuffle)."""
        return np.random.default_rng([self.seed, self.rank, self.epoch, *window])

    def _plan_epoch(self) -> None:
        """Row-group order of this epoch, cut into windows of >= shuffle_buffer sequences."""
        self._cut_windows(self._rows_left() if len(self.skip) else [rg.rows for rg in self.row_groups])

    def _cut_windows(self, rows: list[int]) -> None:
        """This epoch's order of the pieces (row groups, or a stream's chunks) of ``rows`` sequences each, cut
        into windows of >= shuffle_buffer sequences."""
        order = self._rng().permutation(len(rows))
        self.windows, size = [[]], 0
        for i in order:
            if size >= self.shuffle_buffer:
                self.windows.append([])
                size = 0
            self.windows[-1].append(int(i))
            size += rows[i]
        sizes = [sum(rows[i] for i in w) for w in self.windows]
        self.window_start = np.concatenate([[0], np.cumsum(sizes)])
        self.epoch_size = int(self.window_start[-1])
        self.window = None

    def _keys(self, g: RowGroup) -> np.ndarray:
        """Keys of this rank's sequences in row group ``g``, in the order a window appends them."""
        table = pq.ParquetFile(g.file).read_row_group(g.index, columns=["seq_id", "leaf"])
        keys = sequence_keys(g.run, table)
        return keys[self.owned_leaf[table.column("leaf").to_numpy()]] if g.partial else keys

    def _rows_left(self) -> list[int]:
        """Per row group, this rank's sequences not in ``skip`` (reads the seq_id and leaf columns only)."""
        return [int((~np.isin(self._keys(g), self.skip, assume_unique=True)).sum()) for g in self.row_groups]

    def consumed(self) -> np.ndarray:
        """Sorted keys of the sequences this loader has read in its current epoch."""
        w = int(np.searchsorted(self.window_start, self.position, side="right")) - 1
        done = [self._keys(self.row_groups[i]) for win in self.windows[:w] for i in win]
        if self.position > self.window_start[w]:
            keys = np.concatenate([self._keys(self.row_groups[i]) for i in self.windows[w]])
            keys = keys[~np.isin(keys, self.skip, assume_unique=True)]
            order = self._rng(w).permutation(len(keys))
            done.append(keys[order[: self.position - int(self.window_start[w])]])
        done = np.concatenate(done) if done else np.zeros(0, dtype=np.int64)
        return np.union1d(done[~np.isin(done, self.skip, assume_unique=True)], self.skip)

    def _load_window(self, w: int) -> None:
        groups = [self.row_groups[i] for i in self.windows[w]]
        win = Window(int(self.window_start[w + 1] - self.window_start[w]), self.ownership.depth)
        columns = ["seq_id", "path", "leaf", "tokens", "n_valid"]
        for g in groups:
            table = pq.ParquetFile(g.file).read_row_group(g.index, columns=columns)
            keep = self.owned_leaf[table.column("leaf").to_numpy()] if g.partial else None
            if len(self.skip):
                keys = sequence_keys(g.run, table)
                fresh = ~np.isin(keys, self.skip, assume_unique=True)
                keep = fresh if keep is None else keep & fresh
            win.append(table, g.run, keep, f"{g.file} row group {g.index}")
            del table
        rng = self._rng(w)
        self.order = rng.permutation(win.n)
        self.use_generic = rng.random(win.n) < self.p_generic
        self.window, self.window_index = win, w

    def next_batch(self) -> Batch:
        names = ("tokens", "paths", "n_valid", "seq_id", "runs")
        parts = []  # rows copied out of each window the batch spans (it may cross windows and epochs)
        need = self.batch_size
        while need:
            if self.position == self.epoch_size:
                self.epoch, self.position = self.epoch + 1, 0
                self.skip = self.skip[:0]
                self._plan_epoch()
            w = int(np.searchsorted(self.window_start, self.position, side="right")) - 1
            if self.window is None or self.window_index != w:
                self.window = None  # release the old window before the new one is read
                self._load_window(w)
            offset = self.position - int(self.window_start[w])
            take = min(need, self.window.n - offset)
            rows = self.order[offset : offset + take]
            parts.append([getattr(self.window, n)[rows] for n in names] + [self.use_generic[offset : offset + take]])
            self.position += take
            need -= take
        tokens, paths, n_valid, seq_id, runs, generic = (np.concatenate(c) for c in zip(*parts))
        tokens = tokens.astype(np.int64)
        mask = np.arange(1, tokens.shape[1])[None, :] < n_valid[:, None]
        block_ids = np.where(generic[:, None], self.generic_ids[None, :], path_block_ids(paths, self.ownership.k))
        return Batch(
            tokens=torch.from_numpy(tokens),
            mask=torch.from_numpy(mask),
            paths=torch.from_numpy(paths),
            block_ids=torch.from_numpy(block_ids),
            generic=torch.from_numpy(generic),
            seq_ids=torch.from_numpy(seq_id),
            runs=torch.from_numpy(runs),
        )

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "rank": self.rank,
            "n_sequences": self.n_sequences,
            "shuffle_buffer": self.shuffle_buffer,
            "runs": len(self.run_dirs),
            "skip": torch.from_numpy(self.skip),
        }

    def load_state_dict(self, state: dict) -> None:
        mine = {
            "seed": self.seed,
            "rank": self.rank,
            "n_sequences": self.n_sequences,
            "shuffle_buffer": self.shuffle_buffer,
            "runs": len(self.run_dirs),
        }
        theirs = {key: state.get(key) for key in mine}
        if theirs != mine:
            raise ValueError(
                f"loader state {theirs} does not match this loader {mine}: same seed, ranks, "
                "data.shuffle_buffer and run directories needed"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self.skip = state["skip"].numpy() if "skip" in state else np.zeros(0, dtype=np.int64)
        self._plan_epoch()

    def resume(self, ownership: Ownership, states: list[dict]) -> None:
        """Continue from a checkpoint of another world size: ``ownership`` and ``states`` are the old ranks'.

        Each old rank's sequences read in its current epoch are read again by no new rank until that epoch
        ends, so a change of world size reads every sequence exactly once per epoch. Reading the old ranks'
        progress costs their shards' seq_id and leaf columns, not the tokens; memory: 8 B per sequence of this
        rank and per sequence one old rank has read, one old rank at a time.
        """
        mine = np.sort(np.concatenate([self._keys(g) for g in self.row_groups]))
        self.skip = np.zeros(0, dtype=np.int64)
        for r, state in enumerate(states):
            old = ShardLoader(
                self.run_dirs, ownership, r, self.batch_size, self.seed, self.p_generic, self.shuffle_buffer
            )
            old.load_state_dict(state)
            self.skip = np.union1d(self.skip, np.intersect1d(old.consumed(), mine, assume_unique=True))
        self.epoch, self.position = max(s["epoch"] for s in states), 0
        self._plan_epoch()


class SubtreeStream(ShardLoader):
    """One level-1 subtree's own endless batches (data.isolated): their order is a function of the subtree's
    sequences alone, whatever the other subtrees, the rank that reads it or the layout of its shard files.

    The subtree's keys (run, seq_id) are sorted and cut into chunks of shuffle_buffer / 16 consecutive keys
    (so a window mixes >= 16 of them); each epoch permutes the chunks (seeded by seed, subtree, epoch) into
    windows of >= shuffle_buffer sequences, and a window's rows, taken in key order from whichever row groups
    hold them, are shuffled (seed, subtree, epoch, window). Only the order of the keys matters, not their
    values: pipeline/pack.py numbers a sequence by (leaf, packing group, index), from its leaf's documents.
    """

    def __init__(self, run_dirs, k: int, depth: int, subtree: int, batch_size: int, seed: int, shuffle_buffer: int):
        self.subtree = subtree
        self.chunk = max(1, shuffle_buffer // MIN_ROW_GROUPS_PER_WINDOW)
        ownership = Ownership(k, depth, 1, ((subtree,),), (0,))
        super().__init__(run_dirs, ownership, 0, batch_size, seed, 0.0, shuffle_buffer)

    @functools.cached_property
    def group_keys(self) -> list[np.ndarray]:
        """Per row group, the keys of this subtree's sequences in it."""
        return [self._keys(g) for g in self.row_groups]

    @functools.cached_property
    def sorted_keys(self) -> np.ndarray:
        return np.sort(np.concatenate(self.group_keys))

    def _rng(self, *window: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.subtree, self.epoch, *window])

    def _plan_epoch(self) -> None:
        n = len(self.sorted_keys)
        self._cut_windows([min(self.chunk, n - lo) for lo in range(0, n, self.chunk)])

    def _load_window(self, w: int) -> None:
        want = np.sort(
            np.concatenate([self.sorted_keys[c * self.chunk : (c + 1) * self.chunk] for c in self.windows[w]])
        )
        win, keys = Window(len(want), self.ownership.depth), []
        for g, have in zip(self.row_groups, self.group_keys):
            i = np.searchsorted(want, have.min())
            if i == len(want) or want[i] > have.max():
                continue  # none of this window's keys in this row group
            table = pq.ParquetFile(g.file).read_row_group(g.index, columns=["seq_id", "path", "tokens", "n_valid"])
            got = sequence_keys(g.run, table)
            keep = np.isin(got, want, assume_unique=True)
            win.append(table, g.run, keep, f"{g.file} row group {g.index}")
            keys.append(got[keep])
        # key order first, so that the shuffle does not depend on which files and row groups held the rows
        self.order = np.argsort(np.concatenate(keys))[self._rng(w).permutation(win.n)]
        self.use_generic = np.zeros(win.n, dtype=bool)
        self.window, self.window_index = win, w


class IsolatedLoader:
    """data.isolated: a SubtreeStream per level-1 subtree of this rank; each step, each gives its own batch.

    The state is each stream's, keyed by subtree, so a checkpoint resumes on any number of ranks: a rank
    takes its subtrees' states from whichever old rank held them.
    """

    def __init__(
        self,
        run_dirs,
        ownership: Ownership,
        rank: int,
        subtrees: list[int],
        batch_size: int,
        seed: int,
        shuffle_buffer: int,
    ):
        if ownership.level != 1:
            raise ValueError(f"data.isolated needs level-1 ownership, not level {ownership.level}: use fewer ranks")
        self.streams = {
            s: SubtreeStream(run_dirs, ownership.k, ownership.depth, s, batch_size, seed, shuffle_buffer)
            for s in ownership.subtrees[rank]
            if s in subtrees
        }

    def __len__(self) -> int:
        return sum(len(s) for s in self.streams.values())

    def mixing(self) -> None:
        """Never a warning: a stream's chunks hold at most shuffle_buffer / 16 sequences, so a window mixes >= 16
        of them (or single sequences)."""

    def next_batches(self) -> list[Batch]:
        """One batch from each of this rank's subtrees, in subtree order."""
        return [s.next_batch() for s in self.streams.values()]

    def state_dict(self) -> dict:
        return {"streams": {str(s): stream.state_dict() for s, stream in self.streams.items()}}

    def load_state_dict(self, state: dict) -> None:
        for s, stream in self.streams.items():
            if str(s) not in state.get("streams", {}):
                raise ValueError(
                    f"the checkpoint's loader state has no stream of subtree {s}: not written with data.isolated"
                )
            stream.load_state_dict(state["streams"][str(s)])

    def resume(self, ownership: Ownership, states: list[dict]) -> None:
        """From a checkpoint of another world size (``ownership`` unused: a stream does not depend on its rank)."""
        self.load_state_dict({"streams": {s: st for state in states for s, st in state.get("streams", {}).items()}})
