"""Process groups, and the reduction of memory-block gradients among exactly the ranks that hold a block.

The anchor's gradients are reduced by DeepSpeed (ZeRO). The bank's are not: a block of rank r's
subtrees exists only on rank r, so its gradient stays local. A block held by several ranks (an
ancestor of subtrees on different ranks, when there are more ranks than level-1 nodes) is summed
over a torch.distributed subgroup of exactly those ranks. The generic blocks are used by every
rank, so their gradient IS reduced across all ranks; they are small (one block per level). The
whole bank is never all-reduced.

Gradients are divided by the world size first, so every block receives the gradient of the
global mean loss, as the anchor does under DeepSpeed's data-parallel averaging.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from index.tree import block_level
from train.data import Ownership
from train.optim import BlockGrads


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init() -> DistInfo:
    """Join the job started by deepspeed/torchrun; a plain ``python train/main.py`` is a world of one."""
    import deepspeed

    if "RANK" not in os.environ:  # no launcher: a single-process world, for debugging
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    if not cuda:
        _unlink_shm_buffer()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    return DistInfo(
        dist.get_rank(),
        dist.get_world_size(),
        local_rank,
        torch.device("cuda", local_rank) if cuda else torch.device("cpu"),
    )


def _unlink_shm_buffer() -> None:
    """Remove the name of this rank's DeepSpeed shared-memory all-reduce buffer, keeping the buffer.

    On CPU, when every rank is local, DeepSpeed's shm_comm op creates /dev/shm/deepspeed_allreduce_buffer_
    <uid>_<addr>_<port>_<rank> (69 MB per rank) and never unlinks it, so each run leaked RAM until reboot
    (293 files, 19 GiB, filled this machine's /dev/shm). Its initialize returns only once this rank has
    mapped every peer's buffer; after a barrier every rank has, the names are no longer needed, and the
    mappings keep the memory until the ranks exit, however they exit (a killed run leaks nothing).
    """
    name = (
        f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
        f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}"
    )
    dist.barrier()
    try:
        os.unlink(name)
    except FileNotFoundError:  # no shm op (not all ranks local, or a world of one)
        pass


def teardown() -> None:
    """Leave the process group cleanly: pending collectives done, then destroyed (avoids crashes at exit)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class BlockReducer:
    """Sums the gradients of shared blocks over the subgroup of their holders; local blocks stay local."""

    def __init__(
        self, ownership: Ownership, rank: int, device: torch.device, shapes: dict[int, dict[str, tuple[int, ...]]]
    ):
        self.rank, self.world_size, self.device, self.shapes = rank, ownership.world_size, device, shapes
        by_set: dict[tuple[tuple[int, ...], int], list[int]] = {}
        for block, ranks in ownership.holders().items():
            level = block_level(block, ownership.k, ownership.depth)
            if level in shapes:  # levels of rank 0 have no blocks
                by_set.setdefault((ranks, level), []).append(block)
        self.shared: dict[int, tuple[int, ...]] = {}  # block -> holders, for this rank's shared blocks
        self.groups = []  # (process group, level, sorted block ids) for the holder sets that include this rank
        made: dict[tuple[int, ...], object] = {}
        for ranks, level in sorted(
            by_set
        ):  # every rank creates every group, in the same order (new_group is collective)
            if ranks not in made:
                made[ranks] = dist.group.WORLD if len(ranks) == self.world_size else dist.new_group(list(ranks))
            if rank in ranks:
                blocks = sorted(by_set[ranks, level])
                self.groups.append((made[ranks], level, torch.tensor(blocks, dtype=torch.long)))
                self.shared.update({b: ranks for b in blocks})

    @torch.no_grad()
    def reduce(self, updates: list[BlockGrads]) -> list[BlockGrads]:
        """Local per-level gradients -> the gradients to apply on this rank (shared blocks summed over holders).

        Every holder takes part in every step (with zeros for blocks it did not touch), and a shared
        block is updated on all its holders when any of them touched it, so the replicas stay identical.
        """
        scale = 1.0 / self.world_size
        local: dict[int, tuple[dict[int, int], dict[str, torch.Tensor]]] = {}
        out = []
        for u in updates:
            grads = {n: g.to(torch.float32) * scale for n, g in u.grads.items()}
            keep = torch.tensor([int(i) not in self.shared for i in u.ids.tolist()], dtype=torch.bool)
            out.append(BlockGrads(u.level, u.ids[keep], {n: g[keep.to(g.device)] for n, g in grads.items()}))
            local[u.level] = ({int(b): row for row, b in enumerate(u.ids.tolist())}, grads)
        for group, level, blocks in self.groups:
            pos, have = local.get(level, ({}, {}))
            touched = torch.tensor([b in pos for b in blocks.tolist()], dtype=torch.int32, device=self.device)
            dist.all_reduce(touched, group=group)
            ids = blocks[(touched > 0).cpu()]
            if len(ids) == 0:
                continue
            shapes = self.shapes[level]
            rows = [(i, pos[b]) for i, b in enumerate(ids.tolist()) if b in pos]
            parts = []
            for n, shape in shapes.items():
                buf = torch.zeros((len(ids), *shape), dtype=torch.float32, device=self.device)
                if rows:
                    dst, src = (torch.tensor(x, device=self.device) for x in zip(*rows))
                    buf[dst] = have[n][src]
                parts.append(buf.flatten())
            flat = torch.cat(parts)
            dist.all_reduce(flat, group=group)  # one collective per (holder set, level)
            sizes = [len(ids) * math.prod(s) for s in shapes.values()]
            grads = {n: t.view(len(ids), *s) for (n, s), t in zip(shapes.items(), flat.split(sizes))}
            out.append(BlockGrads(level, ids, grads))
        return out

    def clip(self, updates: list[BlockGrads], max_norm: float, local: bool = False) -> float:
        """Scale all block gradients by one factor so their global norm is <= max_norm; returns the norm.

        Each block is counted once: a shared block by its lowest-ranked holder only. The factor is
        the same on every rank, so replicas of a shared block stay identical. ``local``: the norm of
        ``updates`` alone, no collective (data.isolated: one subtree's blocks, held by no other rank).
        """
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for u in updates:
            counted = torch.tensor(
                [self.shared.get(int(b), (self.rank,))[0] == self.rank for b in u.ids.tolist()],
                dtype=torch.bool,
                device=self.device,
            )
            for g in u.grads.values():
                sq += (g.double().flatten(1).pow(2).sum(1) * counted).sum()
        if self.world_size > 1 and not local:
            dist.all_reduce(sq)  # one scalar: the norm, not the bank
        norm = float(sq.sqrt())
        if max_norm > 0 and norm > max_norm:
            for u in updates:
                for g in u.grads.values():
                    g.mul_(max_norm / (norm + 1e-6))
        return norm
