"""A read-only BlockStore over bank files on disk, for inference: a block is read when it is fetched.

The files are ``TensorBlockStore.save`` files (safetensors: ``level<l>.ids`` + ``level<l>.<name>``),
e.g. an export's ``bank/rank<r>.safetensors``. Opening one reads its header and id lists only;
``read`` fetches the requested rows with positioned reads (``os.preadv``, one per run of consecutive
rows) straight into the output tensors. Nothing is mapped, so the process holds the id tables
(8 bytes per block) and the blocks of the current fetch, whatever the size of the bank and however
many blocks earlier batches read (the OS page cache may keep them, outside the process).

``CachedBlockStore`` is the serving tier over it (hmem.serve): the shallow levels held in RAM, the
deeper blocks through an LRU cache with a byte budget, with hit / miss / read counters.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections import OrderedDict

import numpy as np
import torch

from train.memory import BANK_FORMAT, BlockStore, TensorBlockStore, store_rows

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
}


class SafetensorsFile:
    """A safetensors file read by row ranges (positioned reads, no mapping)."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        head = os.pread(self.fd, 8, 0)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 <= n <= os.fstat(self.fd).st_size - 8:  # e.g. a pickle in its place: refused before reading n bytes
            raise ValueError(f"{path}: not a safetensors file (header length {n} does not fit the file)")
        try:
            header = json.loads(os.pread(self.fd, n, 8))
        except ValueError as e:
            raise ValueError(f"{path}: not a safetensors file ({e})") from None
        self.metadata: dict = header.pop("__metadata__", {}) or {}
        self.tensors: dict = header  # name -> {"dtype", "shape", "data_offsets"} (offsets after the header)
        self.base = 8 + n

    def rows(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of tensor ``name`` (along its first axis)."""
        info = self.tensors[name]
        out = torch.empty((hi - lo, *info["shape"][1:]), dtype=_DTYPES[info["dtype"]])
        buf = out.view(-1).view(torch.uint8).numpy() if out.numel() else np.empty(0, np.uint8)
        offset = self.base + info["data_offsets"][0] + lo * (buf.size // max(hi - lo, 1))
        done = 0
        while done < buf.size:  # preadv may return fewer bytes than asked (large reads)
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n == 0:
                raise ValueError(f"{self.path}: truncated; {name} rows {lo}..{hi} end past the file's end")
            done += n
        return out

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)


class LazyBlockStore(BlockStore):
    def __init__(self, files: list[str], device: torch.device | str | None = None):
        self.files, self.device = list(files), device
        self.handles = [SafetensorsFile(f) for f in self.files]
        self.shapes: dict[int, dict[str, tuple[int, ...]]] = {}
        where: dict[int, list[tuple[torch.Tensor, int]]] = {}  # level -> (ids, file index) per file
        for i, f in enumerate(self.handles):
            if f.metadata.get("format") != BANK_FORMAT:
                raise ValueError(f"{f.path}: format {f.metadata.get('format')!r}, this code reads {BANK_FORMAT!r}")
            for l, named in json.loads(f.metadata["shapes"]).items():
                self.shapes[int(l)] = {n: tuple(s) for n, s in named.items()}
                n_ids = f.tensors[f"level{l}.ids"]["shape"][0]
                where.setdefault(int(l), []).append((f.rows(f"level{l}.ids", 0, n_ids), i))
        # per level: sorted global ids, and for each the file and the row in it
        self.ids, self.file_of, self.row_of = {}, {}, {}
        for l, parts in where.items():
            ids = torch.cat([p for p, _ in parts])
            order = torch.argsort(ids)
            self.ids[l] = ids[order]
            if self.ids[l].numel() > 1 and bool((self.ids[l][1:] == self.ids[l][:-1]).any()):
                dup = self.ids[l][1:][self.ids[l][1:] == self.ids[l][:-1]][:4].tolist()
                raise ValueError(f"level {l}: blocks {dup} are in more than one of {self.files}")
            self.file_of[l] = torch.cat([torch.full((len(p),), i) for p, i in parts])[order]
            self.row_of[l] = torch.cat([torch.arange(len(p)) for p, _ in parts])[order]

    def owned_ids(self) -> torch.Tensor:
        parts = [self.ids[l] for l in sorted(self.ids)]
        return torch.sort(torch.cat(parts))[0] if parts else torch.zeros(0, dtype=torch.long)

    def read(self, level: int, ids) -> dict[str, torch.Tensor]:
        if level not in self.ids:
            raise KeyError(f"level {level} has no blocks in {self.files}")
        ids = torch.as_tensor(ids, dtype=torch.long).flatten().cpu()
        pos = store_rows(self.ids, level, ids, where=f"in {self.files}")
        files, rows = self.file_of[level][pos].numpy(), self.row_of[level][pos].numpy()
        if len(ids) == 1:  # a serving miss: one positioned read per tensor, straight into its output
            f, row = self.handles[files[0]], int(rows[0])
            return {n: f.rows(f"level{level}.{n}", row, row + 1).to(self.device) for n in self.shapes[level]}
        out = {n: None for n in self.shapes[level]}
        for fi in np.unique(files):
            want = np.flatnonzero(files == fi)
            want = want[np.argsort(rows[want], kind="stable")]
            r = rows[want]
            cuts = np.flatnonzero(np.diff(r) != 1) + 1  # runs of consecutive rows: one read each
            for n, s in self.shapes[level].items():
                for j, run in zip(np.split(want, cuts), np.split(r, cuts)):
                    part = self.handles[fi].rows(f"level{level}.{n}", int(run[0]), int(run[-1]) + 1)
                    if out[n] is None:
                        out[n] = torch.empty((len(ids), *s), dtype=part.dtype)
                    out[n][torch.from_numpy(j)] = part
        return {
            n: (t if t is not None else torch.empty((0, *self.shapes[level][n]))).to(self.device)
            for n, t in out.items()
        }

    def write(self, level: int, ids, tensors: dict[str, torch.Tensor]) -> None:
        raise TypeError(f"LazyBlockStore over {self.files} is read-only (an exported bank); train from a checkpoint")

    def save(self, path: str, metadata: dict | None = None) -> None:
        raise TypeError(f"LazyBlockStore over {self.files} is read-only; its files are the saved bank")

    def nbytes(self) -> int:
        """Resident bytes: the id tables (the blocks stay in the files)."""
        return sum(t.numel() * t.element_size() for d in (self.ids, self.file_of, self.row_of) for t in d.values())


def _nbytes(named: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in named.values())


class CachedBlockStore(BlockStore):
    """Tiered reads over a ``LazyBlockStore``: levels <= ``resident_levels`` read once into RAM (a few large,
    always-fetched blocks), deeper blocks read on demand and kept in an LRU cache of at most ``budget_bytes``
    (a block larger than the whole budget is read every time, never cached). The process holds the resident
    levels, the cache and the blocks of the current fetch, whatever the bank's size. Read-only and not
    thread-safe: hmem.serve reads under its model lock."""

    def __init__(self, lazy: LazyBlockStore, budget_bytes: int, resident_levels: int = 1):
        self.lazy, self.budget = lazy, int(budget_bytes)
        self.shapes = lazy.shapes
        shallow = {l: lazy.ids[l] for l in lazy.shapes if l <= resident_levels}
        self.resident = TensorBlockStore(
            {l: self.shapes[l] for l in shallow},
            shallow,
            {l: lazy.read(l, ids) for l, ids in shallow.items()},
            device=lazy.device,
        )
        self.cache: OrderedDict[tuple[int, int], dict[str, torch.Tensor]] = OrderedDict()  # oldest first
        self.cached_bytes = self.fetched = self.hits = self.misses = self.bytes_read = 0
        self.read_seconds = 0.0  # in ``read``, resident levels included: a request's fetch time

    def stats(self) -> dict:
        """Counters since the start: ``fetched`` blocks asked for (resident ones included), ``hits`` / ``misses``
        of the cache (a miss is a block read from the bank files), bytes read, the cache's and RAM tier's bytes."""
        return {
            "fetched": self.fetched,
            "hits": self.hits,
            "misses": self.misses,
            "bytes_read": self.bytes_read,
            "cached_blocks": len(self.cache),
            "cached_bytes": self.cached_bytes,
            "budget_bytes": self.budget,
            "resident_bytes": self.resident.nbytes(),
            "read_seconds": self.read_seconds,
        }

    def owned_ids(self) -> torch.Tensor:
        return self.lazy.owned_ids()

    def read(self, level: int, ids) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        self.fetched += ids.numel()
        try:
            if level in self.resident.shapes:
                if ids.numel() == 1:  # one prompt's block: a view, no copy (nothing writes through this store)
                    row = int(store_rows(self.resident.ids, level, ids)[0])
                    return {n: t.narrow(0, row, 1) for n, t in self.resident.tensors[level].items()}
                return self.resident.read(level, ids)
            ids = ids.tolist()
            if not ids:
                return self.lazy.read(level, ids)
            missing = [i for i in dict.fromkeys(ids) if (level, i) not in self.cache]
            # one block per read: each cached block owns its storage (a view of a batch would pin the batch)
            got = {i: {n: t[0] for n, t in self.lazy.read(level, [i]).items()} for i in missing}
            self.bytes_read += sum(_nbytes(b) for b in got.values())
            self.misses += len(missing)
            self.hits += len(ids) - len(missing)
            for i in ids:
                if i not in got:
                    got[i] = self.cache[(level, i)]
                    self.cache.move_to_end((level, i))
            if len(ids) == 1:  # the cached block itself, viewed: no copy
                out = {n: got[ids[0]][n].unsqueeze(0) for n in self.shapes[level]}
            else:
                out = {n: torch.stack([got[i][n] for i in ids]) for n in self.shapes[level]}
            for i in missing:
                self._keep((level, i), got[i])
            return out
        finally:
            self.read_seconds += time.perf_counter() - t0

    def _keep(self, key: tuple[int, int], block: dict[str, torch.Tensor]) -> None:
        size = _nbytes(block)
        if size > self.budget:
            return
        while self.cached_bytes + size > self.budget:
            _, old = self.cache.popitem(last=False)
            self.cached_bytes -= _nbytes(old)
        self.cache[key] = block
        self.cached_bytes += size

    def write(self, level: int, ids, tensors: dict[str, torch.Tensor]) -> None:
        self.lazy.write(level, ids, tensors)  # read-only: says so

    def save(self, path: str, metadata: dict | None = None) -> None:
        self.lazy.save(path, metadata)

    def nbytes(self) -> int:
        """Resident bytes: the shallow levels, the cache and the id tables."""
        return self.resident.nbytes() + self.cached_bytes + self.lazy.nbytes()
