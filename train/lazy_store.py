"""A read-only BlockStore over bank files on disk, for inference: a block is read when it is fetched.

The files are ``TensorBlockStore.save`` files (``level<l>.ids`` + ``level<l>.<name>``), e.g. an
export's ``bank/rank<r>.safetensors``. Opening one maps it (safetensors ``safe_open``) and reads only
its id lists; ``read`` copies the requested rows out of the mapping, so resident memory is the ids
(8 bytes per block) plus the pages of the blocks fetched, whatever the size of the bank.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from train.memory import BANK_FORMAT, BlockStore


class LazyBlockStore(BlockStore):
    def __init__(self, files: list[str], device: torch.device | str | None = None):
        from safetensors import safe_open

        self.files, self.device = list(files), device
        self.handles = [safe_open(f, framework="pt") for f in self.files]
        self.shapes: dict[int, dict[str, tuple[int, ...]]] = {}
        where: dict[int, list[tuple[torch.Tensor, int]]] = {}  # level -> (ids, file index) per file
        for i, (path, f) in enumerate(zip(self.files, self.handles)):
            meta = f.metadata() or {}
            if meta.get("format") != BANK_FORMAT:
                raise ValueError(f"{path}: format {meta.get('format')!r}, this code reads {BANK_FORMAT!r}")
            for l, named in json.loads(meta["shapes"]).items():
                self.shapes[int(l)] = {n: tuple(s) for n, s in named.items()}
                where.setdefault(int(l), []).append((f.get_tensor(f"level{l}.ids"), i))
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
        have = self.ids[level]
        pos = torch.searchsorted(have, ids).clamp(max=max(have.numel() - 1, 0))
        if have.numel() == 0 or not bool((have[pos] == ids).all()):
            raise KeyError(f"level {level}: blocks {ids[have[pos] != ids][:8].tolist()} are not in {self.files}")
        files, rows = self.file_of[level][pos].numpy(), self.row_of[level][pos].numpy()
        out = {n: None for n in self.shapes[level]}
        for fi in np.unique(files):
            want = np.flatnonzero(files == fi)
            want = want[np.argsort(rows[want], kind="stable")]
            r = rows[want]
            cuts = np.flatnonzero(np.diff(r) != 1) + 1  # runs of consecutive rows: one slice each
            for n, s in self.shapes[level].items():
                sl = self.handles[fi].get_slice(f"level{level}.{n}")
                for j, row in zip(np.split(want, cuts), np.split(r, cuts)):
                    part = sl[int(row[0]):int(row[-1]) + 1]  # only these rows' pages are read
                    if out[n] is None:
                        out[n] = torch.empty((len(ids), *s), dtype=part.dtype)
                    out[n][torch.from_numpy(j)] = part
        return {n: (t if t is not None else torch.empty((0, *self.shapes[level][n]))).to(self.device)
                for n, t in out.items()}

    def write(self, level: int, ids, tensors: dict[str, torch.Tensor]) -> None:
        raise TypeError(f"LazyBlockStore over {self.files} is read-only (an exported bank); train from a checkpoint")

    def save(self, path: str, metadata: dict | None = None) -> None:
        raise TypeError(f"LazyBlockStore over {self.files} is read-only; its files are the saved bank")

    def nbytes(self) -> int:
        """Resident bytes: the id tables (the blocks stay in the mapped files)."""
        return sum(t.numel() * t.element_size() for d in (self.ids, self.file_of, self.row_of) for t in d.values())
