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
from safetensors.torch import load_file, save_file

from index.tree import block_level


def lr_at(step: int, peak: float, max_steps: int, warmup_steps: int = 0, decay: str = "cosine",
          min_lr_ratio: float = 0.1) -> float:
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

    ``store`` is a train.memory BlockStore holding this rank's blocks; the optimizer keeps
    fp32 moments and step counts for exactly ``store.owned_ids()`` (levels with blocks).
    """

    def __init__(self, store, k: int, depth: int, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, device: torch.device | str = "cpu"):
        self.store, self.betas, self.eps, self.weight_decay = store, betas, eps, weight_decay
        by_level: dict[int, list[int]] = {}
        for i in store.owned_ids().tolist():
            by_level.setdefault(block_level(int(i), k, depth), []).append(int(i))
        # level -> sorted owned global ids: the row order of the state
        self.ids = {l: torch.tensor(sorted(v), dtype=torch.long) for l, v in sorted(by_level.items()) if l in store.shapes}
        self.steps: dict[int, torch.Tensor] = {}
        self.exp_avg: dict[int, dict[str, torch.Tensor]] = {}
        self.exp_avg_sq: dict[int, dict[str, torch.Tensor]] = {}
        for l, ids in self.ids.items():
            self.steps[l] = torch.zeros(len(ids), dtype=torch.long)
            self.exp_avg[l] = {n: torch.zeros((len(ids), *s), dtype=torch.float32, device=device) for n, s in store.shapes[l].items()}
            self.exp_avg_sq[l] = {n: torch.zeros_like(t) for n, t in self.exp_avg[l].items()}

    def rows(self, level: int, ids: torch.Tensor) -> torch.Tensor:
        """State rows of global block ids; raises if a block is not held by this rank."""
        own = self.ids.get(level)
        ids = ids.to(torch.long)
        if own is None:
            raise KeyError(f"level {level} has no blocks on this rank")
        rows = torch.searchsorted(own, ids).clamp(max=len(own) - 1)
        bad = own[rows] != ids
        if bad.any():
            raise KeyError(f"blocks {ids[bad].tolist()} of level {level} are not held by this rank; "
                           "a rank may only update blocks of its own subtrees (train/data.py assign_subtrees)")
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
            for name, g in u.grads.items():
                p = params[name]
                shape = (-1,) + (1,) * (p.dim() - 1)
                bc1 = (1 - b1 ** t.double()).float().view(shape).to(p.device)
                bc2_sqrt = (1 - b2 ** t.double()).sqrt().float().view(shape).to(p.device)
                g = g.to(device=p.device, dtype=torch.float32)
                m = self.exp_avg[u.level][name][rows].lerp_(g, 1 - b1)
                v = self.exp_avg_sq[u.level][name][rows].mul_(b2).addcmul_(g, g, value=1 - b2)
                self.exp_avg[u.level][name][rows] = m
                self.exp_avg_sq[u.level][name][rows] = v
                p32 = p.to(torch.float32)
                p32.mul_(1 - lr * self.weight_decay)
                p32.addcdiv_(m / bc1, v.sqrt() / bc2_sqrt + self.eps, value=-lr)
                params[name] = p32.to(p.dtype)
            self.store.write(u.level, u.ids, params)

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in (self.exp_avg, self.exp_avg_sq)
                   for d in s.values() for t in d.values())

    def save(self, path: str) -> None:
        tensors = {}
        for l, ids in self.ids.items():
            tensors[f"l{l}.ids"] = ids
            tensors[f"l{l}.steps"] = self.steps[l]
            for n in self.exp_avg[l]:
                tensors[f"l{l}.{n}.exp_avg"] = self.exp_avg[l][n]
                tensors[f"l{l}.{n}.exp_avg_sq"] = self.exp_avg_sq[l][n]
        save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, path)

    def load(self, path: str) -> None:
        tensors = load_file(path)
        for l, ids in self.ids.items():
            saved = tensors.get(f"l{l}.ids")
            if saved is None or not torch.equal(saved, ids):
                raise ValueError(f"{path}: optimizer state is for other blocks than this rank holds at level {l}; "
                                 "resume with the same number of ranks as the checkpoint")
            self.steps[l] = tensors[f"l{l}.steps"]
            for n, t in self.exp_avg[l].items():
                self.exp_avg[l][n] = tensors[f"l{l}.{n}.exp_avg"].to(t.device)
                self.exp_avg_sq[l][n] = tensors[f"l{l}.{n}.exp_avg_sq"].to(t.device)
