"""Touched-block AdamW for the memory bank, and the learning-rate schedule.

Why an untouched block does not move: the bank lives outside the ZeRO
optimizer (ZeRO-1/2 zero-fill the gradients of unused parameters, and AdamW
would still move them through momentum and weight decay). Here the state is
kept PER BLOCK and a step only reads, updates and writes back the rows of the
blocks on the step's paths. This is "lazy" AdamW:

- each block has its own step count ``t_b``, incremented only when the block is
  touched, so its bias correction is that of a block seen ``t_b`` times;
- decoupled weight decay is applied only when the block is touched (a block
  of level l is touched ~k^l times less often than the anchor, so decaying it
  every step would erase it between visits);
- moments of untouched blocks are left as they are (no decay in between).

With a block touched at every step this is exactly ``torch.optim.AdamW``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from index.tree import block_level


def lr_at(
    step: int, peak: float, max_steps: int, warmup_steps: int = 0, decay: str = "cosine", min_lr_ratio: float = 0.1
) -> float:
    """Learning rate at 1-based ``step``: linear warmup, then cosine (or constant) down to ``min_lr_ratio*peak``."""
    if warmup_steps and step <= warmup_steps:
        return peak * step / warmup_steps
    if decay == "constant":
        return peak
    if decay != "cosine":
        raise ValueError(f"unknown lr decay {decay!r}: use 'cosine' or 'constant'")
    span = max(1, max_steps - warmup_steps)
    frac = min(1.0, (step - warmup_steps) / span)
    return peak * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


@dataclass
class BlockGrads:
    """Gradients of some blocks of one level: ``grads[name]`` is [len(ids), ...], rows in ``ids`` order."""

    level: int
    ids: torch.Tensor
    grads: dict[str, torch.Tensor]


class TouchedAdamW:
    """AdamW with one state per memory block; ``step`` updates only the blocks it is given.

    ``store`` is a train.memory BlockStore holding this rank's blocks. The fp32 moments are two
    more stores from ``store.state_store`` (``STATE``), so they live where the blocks live (RAM,
    device, or disk for train/store_disk.py); the per-block step counts are small and stay here.
    """

    STATE = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        store,
        k: int,
        depth: int,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        self.store, self.betas, self.eps, self.weight_decay = store, betas, eps, weight_decay
        by_level: dict[int, list[int]] = {}
        for i in store.owned_ids().tolist():
            by_level.setdefault(block_level(int(i), k, depth), []).append(int(i))
        # level -> sorted owned global ids: the row order of the step counts
        self.ids = {
            l: torch.tensor(sorted(v), dtype=torch.long) for l, v in sorted(by_level.items()) if l in store.shapes
        }
        self.steps = {l: torch.zeros(len(ids), dtype=torch.long) for l, ids in self.ids.items()}
        self.exp_avg, self.exp_avg_sq = (store.state_store(name) for name in self.STATE)

    def rows(self, level: int, ids: torch.Tensor) -> torch.Tensor:
        """Step-count rows of global block ids; raises if a block is not held by this rank."""
        own = self.ids.get(level)
        ids = ids.to(torch.long)
        if own is None:
            raise KeyError(f"level {level} has no blocks on this rank")
        rows = torch.searchsorted(own, ids).clamp(max=len(own) - 1)
        bad = own[rows] != ids
        if bad.any():
            raise KeyError(
                f"blocks {ids[bad].tolist()} of level {level} are not held by this rank; "
                "a rank may only update blocks of its own subtrees (train/data.py assign_subtrees)"
            )
        return rows

    @torch.no_grad()
    def step(self, updates: list[BlockGrads], lr: float) -> None:
        b1, b2 = self.betas
        for u in updates:
            if len(u.ids) == 0:
                continue
            rows = self.rows(u.level, u.ids)
            t = self.steps[u.level][rows] + 1
            self.steps[u.level][rows] = t
            params = self.store.read(u.level, u.ids)
            exp_avg, exp_avg_sq = self.exp_avg.read(u.level, u.ids), self.exp_avg_sq.read(u.level, u.ids)
            for name, g in u.grads.items():
                p = params[name]
                shape = (-1,) + (1,) * (p.dim() - 1)
                bc1 = (1 - b1 ** t.double()).float().view(shape).to(p.device)
                bc2_sqrt = (1 - b2 ** t.double()).sqrt().float().view(shape).to(p.device)
                g = g.to(device=p.device, dtype=torch.float32)
                m = exp_avg[name].lerp_(g, 1 - b1)
                v = exp_avg_sq[name].mul_(b2).addcmul_(g, g, value=1 - b2)
                p32 = p.to(torch.float32)
                p32.mul_(1 - lr * self.weight_decay)
                p32.addcdiv_(m / bc1, v.sqrt() / bc2_sqrt + self.eps, value=-lr)
                params[name] = p32.to(p.dtype)
            self.store.write(u.level, u.ids, params)
            self.exp_avg.write(u.level, u.ids, exp_avg)
            self.exp_avg_sq.write(u.level, u.ids, exp_avg_sq)

    def state_bytes(self) -> int:
        return self.exp_avg.nbytes() + self.exp_avg_sq.nbytes()

    def save(self, path: str) -> None:
        """One safetensors file (l<l>.ids, l<l>.steps, l<l>.<name>.<state>), written a chunk of blocks at a time."""
        from train.store_disk import SafetensorsWriter, row_chunks

        layout = {}
        for l, ids in self.ids.items():
            layout[f"l{l}.ids"] = (torch.int64, tuple(ids.shape))
            layout[f"l{l}.steps"] = (torch.int64, tuple(ids.shape))
            for n, s in self.store.shapes[l].items():
                for state in self.STATE:
                    layout[f"l{l}.{n}.{state}"] = (torch.float32, (len(ids), *s))
        with SafetensorsWriter(path, layout) as w:
            for l, ids in self.ids.items():
                w.write(f"l{l}.ids", 0, ids)
                w.write(f"l{l}.steps", 0, self.steps[l])
                for a, b in row_chunks(self.store.shapes[l], len(ids)):
                    for state, store in zip(self.STATE, (self.exp_avg, self.exp_avg_sq)):
                        for n, t in store.read(l, ids[a:b]).items():
                            w.write(f"l{l}.{n}.{state}", a, t)

    def load(self, paths: list[str]) -> None:
        """Moments and step counts of this rank's blocks from ``save``'s files that together hold them (one
        file: the rank's own; after a change of world size, every old rank's)."""
        from train.checkpoint import gather_rows

        for l, ids in self.ids.items():
            names = self.store.shapes[l]
            keys = [f"l{l}.steps"] + [f"l{l}.{n}.{state}" for n in names for state in self.STATE]

            def put(got, rows, l=l, names=names):
                self.steps[l][self.rows(l, got)] = rows[f"l{l}.steps"]
                for state, store in zip(self.STATE, (self.exp_avg, self.exp_avg_sq)):
                    store.write(l, got, {n: rows[f"l{l}.{n}.{state}"] for n in names})

            gather_rows(paths, f"l{l}.ids", ids, keys, names, put)
