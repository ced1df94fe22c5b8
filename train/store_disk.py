"""A BlockStore on local disk under a RAM budget (``memory.store: disk``): blocks AND AdamW moments.

Files (DIR = OUT/bank_store/rank<r>; scratch, rebuilt at every start: a checkpoint is the durable copy)
  DIR/<field>.level<l>.bin   one fixed-size record per owned block of level l, rows in id order; a
                             record is the block's tensors (``shapes`` order) in fp32, back to back
Fields: ``param`` (the blocks) and one per optimiser state (``state``, e.g. exp_avg, exp_avg_sq):
``state_store(name)`` is the optimiser's view of one, so the moments follow the blocks to disk.

RAM. Levels are pinned from the root down while all their records (every field) fit in half the
budget (``PIN_FRACTION``); the rest of the budget is an LRU cache of deep records. A dirty record
is written when it is evicted (write-behind: evictions mostly happen on the prefetch thread of
train/prefetch.py, which loads the next batches' records while the current step computes). Records
are read with pread, not mmap: a mapped page stays in the process's RSS (RssFile) until the kernel
wants it back, so the budget would not bound the RSS; here the process holds exactly the pinned
levels and the cache (RssAnon), and the kernel's page cache is outside it. The budget is exceeded
only by records in flight (being loaded or written) and by what ``read`` returns (copies).

Lazy. The files are created sparse and a record is materialised on its first use: the per-block
seeded init of ``train.memory.init_block`` for ``param``, zeros for the state. A record reaches its
file only when evicted dirty, so start-up costs one flag per block, whatever the bank's size.

Threads. ``read`` (main thread) never inserts into the cache: a hit is copied, a miss is read from
the file or materialised. ``prefetch`` (any thread) inserts clean records; ``write`` inserts dirty
ones. A record being loaded or written is ``busy``: whoever wants it waits, so a read never sees a
file record older than a cached or in-flight one.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from index.tree import block_level
from train.memory import (
    BlockStore,
    MemoryConfig,
    bank_metadata,
    block_shapes,
    init_block,
    store_rows,
)
from train.model import ModelConfig

PIN_FRACTION = 0.5  # of the budget, at most, for whole shallow levels
CHUNK_BYTES = 64 << 20  # rows per chunk when a whole level is streamed (save, load)
_ST_DTYPES = {torch.float32: "F32", torch.int64: "I64"}


def row_chunks(shapes: dict[str, tuple[int, ...]], n_rows: int):
    """(start, end) row ranges of about CHUNK_BYTES of fp32 blocks with these ``shapes``."""
    row_bytes = 4 * sum(math.prod(s) for s in shapes.values())
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    return [(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]


class SafetensorsWriter:
    """A safetensors file written piecewise: the header (names, dtypes, shapes) first, then rows at their
    offsets, so a bank never has to be in memory at once to be saved."""

    def __init__(self, path: str, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict | None = None):
        header, self.offsets, pos = {}, {}, 0
        if metadata:
            header["__metadata__"] = metadata
        for name, (dtype, shape) in layout.items():
            row = dtype.itemsize * math.prod(shape[1:])
            header[name] = {
                "dtype": _ST_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [pos, pos + row * shape[0]],
            }
            self.offsets[name] = (pos, row)
            pos += row * shape[0]
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-aligned
        self.base = 8 + len(text)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        _pwrite(self.fd, len(text).to_bytes(8, "little") + text, 0)
        os.ftruncate(self.fd, self.base + pos)

    def write(self, name: str, row: int, t: torch.Tensor) -> None:
        """Rows ``row``.. of tensor ``name`` from ``t`` ([n, *shape], the layout's dtype)."""
        start, row_bytes = self.offsets[name]
        _pwrite(self.fd, t.detach().cpu().contiguous().numpy(), self.base + start + row * row_bytes)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def _pwrite(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _pread(fd: int, out: np.ndarray, offset: int) -> None:
    view = memoryview(out).cast("B")
    while view:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise EOFError(f"short read at offset {offset} of a bank file")
        view, offset = view[n:], offset + n


@dataclass
class _Entry:
    data: torch.Tensor  # the record, flat fp32
    dirty: bool


class _DiskBank:
    """The shared part of the field views: files, pinned levels, the LRU of deep records, the lock."""

    def __init__(
        self,
        directory: str,
        shapes: dict[int, dict[str, tuple[int, ...]]],
        ids: dict[int, torch.Tensor],
        mem_cfg: MemoryConfig,
        fields: tuple[str, ...],
        budget_bytes: int,
    ):
        self.shapes, self.ids, self.mem_cfg, self.fields = shapes, ids, mem_cfg, fields
        self.spans = {}  # level -> [(name, start, end, shape)] within a record
        for l, named in shapes.items():
            pos, spans = 0, []
            for n, s in named.items():
                spans.append((n, pos, pos + math.prod(s), s))
                pos += math.prod(s)
            self.spans[l] = spans
        self.record = {l: spans[-1][2] for l, spans in self.spans.items()}  # floats per record
        self.pinned: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        used = 0
        for l in sorted(shapes):
            size = len(ids[l]) * self.record[l] * 4 * len(fields)
            if used + size > PIN_FRACTION * budget_bytes:
                break
            for f in fields:
                self.pinned[f, l] = {n: torch.zeros((len(ids[l]), *s)) for n, s in shapes[l].items()}
            used += size
        self.pinned_bytes, self.budget = used, budget_bytes - used
        # pinned params are materialised on first use too (state starts at zero, which it is)
        self.initialised = {l: np.zeros(len(ids[l]), dtype=bool) for l in shapes if ("param", l) in self.pinned}
        os.makedirs(directory, exist_ok=True)
        self.fds, self.on_disk = {}, {}
        for l in shapes:
            if ("param", l) in self.pinned:
                continue
            for f in fields:
                path = os.path.join(directory, f"{f}.level{l}.bin")
                self.fds[f, l] = fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                os.ftruncate(fd, len(ids[l]) * self.record[l] * 4)  # sparse: no block is written yet
                self.on_disk[f, l] = np.zeros(len(ids[l]), dtype=bool)
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # a record stopped being busy
        self.entries: OrderedDict[tuple[str, int, int], _Entry] = OrderedDict()
        self.busy: set[tuple[str, int, int]] = set()  # records being loaded or written
        self.cached = 0  # bytes of self.entries
        self.stats = {"hits": 0, "misses": 0, "loaded": 0, "written": 0}

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    # -- pinned levels
    def materialise_pinned(self, level: int, rows: torch.Tensor) -> None:
        todo = rows[~torch.from_numpy(self.initialised[level][rows.numpy()])]
        for row in torch.unique(todo).tolist():
            for n, t in init_block(self.mem_cfg, int(self.ids[level][row]), self.shapes[level]).items():
                self.pinned["param", level][n][row] = t
            self.initialised[level][row] = True

    # -- deep records
    def _load(self, key) -> torch.Tensor:
        """The record from its file, or materialised; the caller holds ``key`` busy or knows no one writes it."""
        field, level, row = key
        if self.on_disk[field, level][row]:
            out = np.empty(self.record[level], dtype=np.float32)
            _pread(self.fds[field, level], out, row * out.nbytes)
            return torch.from_numpy(out)
        if field != "param":
            return torch.zeros(self.record[level])
        block = init_block(self.mem_cfg, int(self.ids[level][row]), self.shapes[level])
        return torch.cat([block[n].flatten() for n, *_ in self.spans[level]])

    def _wait_idle(self, key) -> _Entry | None:
        """Under the lock: wait until ``key`` is not busy; its cached entry (now most recent) or None."""
        self.changed.wait_for(lambda: key not in self.busy)
        e = self.entries.get(key)
        if e is not None:
            self.entries.move_to_end(key)
        return e

    def _insert(self, key, data: torch.Tensor, dirty: bool) -> list:
        """Under the lock: insert or replace an entry, evict past the budget; returns the dirty victims
        (marked busy) for ``_write_behind`` to write after the lock is released."""
        old = self.entries.pop(key, None)
        if old is not None:
            self.cached -= old.data.nbytes
        self.entries[key] = _Entry(data, dirty or (old is not None and old.dirty))
        self.cached += data.nbytes
        victims = []
        while self.cached > self.budget and len(self.entries) > 1:
            vkey, v = self.entries.popitem(last=False)
            self.cached -= v.data.nbytes
            if v.dirty:
                self.busy.add(vkey)
                victims.append((vkey, v.data))
        return victims

    def _write_behind(self, victims: list) -> None:
        for key, data in victims:
            field, level, row = key
            _pwrite(self.fds[field, level], data.numpy(), row * data.nbytes)
            self.on_disk[field, level][row] = True
            with self.lock:
                self.busy.discard(key)
                self.stats["written"] += 1
                self.changed.notify_all()

    def get(self, key, insert: bool) -> torch.Tensor:
        """A record's data (not to be modified); ``insert``: keep it in the cache."""
        with self.lock:
            e = self._wait_idle(key)
            self.stats["hits" if e is not None else "misses"] += 1
            if e is not None:
                return e.data
            if insert:
                self.busy.add(key)
        if not insert:  # no one writes this record meanwhile: writes come from this (the main) thread
            return self._load(key)
        try:
            data = self._load(key)
        except BaseException:
            with self.lock:
                self.busy.discard(key)
                self.changed.notify_all()
            raise
        with self.lock:
            self.busy.discard(key)
            victims = self._insert(key, data, dirty=False)
            self.stats["loaded"] += 1
            self.changed.notify_all()
        self._write_behind(victims)
        return data

    def put(self, key, data: torch.Tensor) -> None:
        """Replace a record (dirty: it reaches the file when evicted)."""
        with self.lock:
            self._wait_idle(key)  # an in-flight load or write of the old record finishes first
            victims = self._insert(key, data, dirty=True)
        self._write_behind(victims)


class DiskBlockStore(BlockStore):
    """One field (``param`` or an optimiser state) of a ``_DiskBank``; see the module docstring."""

    def __init__(self, bank: _DiskBank, field: str = "param"):
        if field not in bank.fields:
            raise KeyError(f"the disk store holds {bank.fields}, not {field!r}: list it in ``state`` at creation")
        self.bank, self.field, self.shapes, self.ids = bank, field, bank.shapes, bank.ids

    @classmethod
    def create(
        cls,
        mem_cfg: MemoryConfig,
        model_cfg: ModelConfig,
        owned_ids,
        directory: str,
        budget_bytes: int,
        state: tuple[str, ...] = (),
    ) -> "DiskBlockStore":
        """The store of ``owned_ids`` (all levels, generic included) under ``directory``, lazily initialised
        (the same blocks as ``TensorBlockStore.create``); ``state``: optimiser state fields it also holds."""
        shapes = block_shapes(mem_cfg, model_cfg)
        owned = torch.as_tensor(owned_ids, dtype=torch.long).flatten()
        levels = np.array([block_level(int(i), mem_cfg.k, mem_cfg.depth) for i in owned.tolist()], dtype=np.int64)
        ids = {l: torch.sort(owned[torch.from_numpy(levels == l)])[0] for l in shapes}
        return cls(_DiskBank(directory, shapes, ids, mem_cfg, ("param", *state), int(budget_bytes)))

    def state_store(self, name: str) -> "DiskBlockStore":
        return DiskBlockStore(self.bank, name)

    def owned_ids(self) -> torch.Tensor:
        parts = [self.ids[l] for l in sorted(self.ids)]
        return torch.sort(torch.cat(parts))[0] if parts else torch.zeros(0, dtype=torch.long)

    def nbytes(self) -> int:
        return sum(len(self.ids[l]) * self.bank.record[l] * 4 for l in self.shapes)

    def resident_bytes(self) -> int:
        """RAM held for all fields: pinned levels and cached records."""
        return self.bank.pinned_bytes + self.bank.cached

    def read(self, level: int, ids) -> dict[str, torch.Tensor]:
        rows = store_rows(self.ids, level, ids)
        if (self.field, level) in self.bank.pinned:
            if self.field == "param":
                self.bank.materialise_pinned(level, rows)
            return {n: t.index_select(0, rows) for n, t in self.bank.pinned[self.field, level].items()}
        out = {n: torch.empty((len(rows), *s)) for n, s in self.shapes[level].items()}
        for i, row in enumerate(rows.tolist()):
            data = self.bank.get((self.field, level, row), insert=False)
            for n, a, b, s in self.bank.spans[level]:
                out[n][i] = data[a:b].view(s)
        return out

    @torch.no_grad()
    def write(self, level: int, ids, tensors: dict[str, torch.Tensor]) -> None:
        rows = store_rows(self.ids, level, ids)
        tensors = {n: t.detach().to(device="cpu", dtype=torch.float32) for n, t in tensors.items()}
        if (self.field, level) in self.bank.pinned:
            if self.field == "param":
                self.bank.materialise_pinned(level, rows)  # names not given keep their initial values
            for n, t in self.bank.pinned[self.field, level].items():
                if n in tensors:
                    t.index_copy_(0, rows, tensors[n])
            return
        for i, row in enumerate(rows.tolist()):
            key = (self.field, level, row)
            if all(n in tensors for n, *_ in self.bank.spans[level]):
                data = torch.cat([tensors[n][i].flatten() for n, *_ in self.bank.spans[level]])
            else:
                data = self.bank.get(key, insert=False).clone()
                for n, a, b, _ in self.bank.spans[level]:
                    if n in tensors:
                        data[a:b] = tensors[n][i].flatten()
            self.bank.put(key, data)

    def prefetch(self, level: int, ids) -> None:
        """Bring the records of blocks ``ids`` (every field) into the cache; pinned levels are always there."""
        if ("param", level) in self.bank.pinned:
            return
        for row in store_rows(self.ids, level, ids).tolist():
            for f in self.bank.fields:
                self.bank.get((f, level, row), insert=True)

    def save(self, path: str, metadata: dict | None = None) -> None:
        """The ``TensorBlockStore.save`` format, streamed a chunk of blocks at a time."""
        layout = {}
        for l, named in self.shapes.items():
            layout[f"level{l}.ids"] = (torch.int64, tuple(self.ids[l].shape))
            layout.update({f"level{l}.{n}": (torch.float32, (len(self.ids[l]), *s)) for n, s in named.items()})
        with SafetensorsWriter(path, layout, bank_metadata(self.shapes, metadata)) as w:
            for l, ids in self.ids.items():
                w.write(f"level{l}.ids", 0, ids)
                for a, b in row_chunks(self.shapes[l], len(ids)):
                    for n, t in self.read(l, ids[a:b]).items():
                        w.write(f"level{l}.{n}", a, t)
