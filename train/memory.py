"""Hierarchical memories: bank storage, the per-batch gather, and the FFN / LoRA-FFN / KV memory math.

See docs/MODEL_API.md for the contract (names are fixed: the trainer codes against them).

How a sequence gets its memory
------------------------------
1. Its root-to-leaf path becomes global block ids ``index.tree.path_block_ids`` ([B, p]); with
   probability ``p_generic`` (training) or on request (evaluation) the ids of the generic memory
   (``index.tree.generic_block_ids``, one block per level) are used instead; -1 disables a level.
   ``MemoryBank.block_ids`` does this.
2. ``MemoryBank.fetch(block_ids)`` reads each level's UNIQUE ids once from the ``BlockStore`` into
   leaf tensors with ``requires_grad=True``: ``Fetched.params[l][name]`` is [U_l, n_layers, r_l, ...]
   and ``Fetched.index[l]`` [B] maps each sequence to its row (-1: none).
3. ``Anchor.forward(tokens, fetched)`` calls ``fetched.layers(dtype)`` once: the rows of every
   level are gathered per sequence and concatenated along the unit axis into ONE tensor per weight
   kind for all layers, laid out [n_layers, B, R, ...] (R = sum of r_l) so each layer takes a
   contiguous slice and applies it with one batched matmul. When every sequence has the same ids
   (``Fetched.all_same``) nothing is copied per sequence: the weights are [n_layers, R, ...] and
   each layer does plain GEMMs over the whole batch.
4. After ``backward`` the gradients are on the fetched leaves (only blocks on the batch's paths
   exist there, so nothing else can receive one); the trainer updates them and writes the rows back
   with ``store.write`` (or ``MemoryBank.write``). The bank is not an ``nn.Module`` parameter.

Memory kinds (all stored with the unit axis second, so concatenating blocks of a path is a cat on
that axis; a fresh block is an exact no-op because the tensor on its output side starts at zero):

- ``ffn`` (default, the paper's winner): r_l extra SwiGLU hidden units per layer.
  ``w_gate``, ``w_up``, ``w_down``: [L, r, d] (``w_down`` is the transpose of a down-projection,
  one row per unit; it starts at zero). Concatenating a path's blocks is the same as one FFN
  widened by R units. Block size 3*r*L*d.
- ``lora``: per level a rank-r LoRA on each FFN matrix: ``a_gate, a_up`` [L, r, d],
  ``b_gate, b_up`` [L, r, F], ``a_down`` [L, r, F], ``b_down`` [L, r, d] (``b_*`` start at zero;
  no scaling factor). Concatenating blocks = one LoRA of rank R. Block size 3*r*L*(d + F).
- ``kv``: per layer r learned key/value slots (width n_heads*head_dim, no RoPE). Every position
  attends to the path's R slots with a softmax of its own, and the result is added to the causal
  attention output before the output projection (values start at zero, so fresh = no-op; a joint
  softmax with the causal keys could not be an exact no-op). Block size 2*r*L*A.
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from index.tree import block_level, generic_block_ids, n_tree_blocks, path_block_ids
from train.model import ModelConfig

KINDS = ("ffn", "lora", "kv")
STORES = ("ram", "disk")
BANK_FORMAT = "hmem-bank/1"


@dataclass
class MemoryConfig:
    kind: str = "ffn"
    ranks: tuple[int, ...] = (256, 64, 16, 0)  # r_1..r_p: units (or LoRA rank / KV slots) per block at each level
    k: int = 16
    depth: int | None = None  # None: len(ranks)
    p_generic: float = 1 / 17
    init_std: float = 0.02
    seed: int = 0  # block init depends only on (seed, global id), not on which rank builds it
    store: str = "ram"  # ram: TensorBlockStore; disk: train/store_disk.py (blocks + AdamW moments in files)
    ram_budget_mb: float = 1024.0  # disk store: RAM for pinned shallow levels + cached deep blocks, per rank
    prefetch_batches: int = 2  # disk store: batches whose blocks are read ahead (train/prefetch.py)

    def __post_init__(self):
        self.ranks = tuple(int(r) for r in self.ranks)
        if self.depth is None:
            self.depth = len(self.ranks)
        if self.kind not in KINDS:
            raise ValueError(f"memory kind {self.kind!r}; one of {KINDS}")
        if len(self.ranks) != self.depth:
            raise ValueError(f"{len(self.ranks)} ranks for a tree of depth {self.depth}")
        if any(r < 0 for r in self.ranks):
            raise ValueError(f"ranks must be >= 0, got {self.ranks}")
        if not 0.0 <= self.p_generic <= 1.0:
            raise ValueError(f"p_generic {self.p_generic} is not a probability")
        if self.store not in STORES:
            raise ValueError(f"memory store {self.store!r}; one of {STORES}")
        if self.ram_budget_mb <= 0 or self.prefetch_batches < 0:
            raise ValueError(
                f"ram_budget_mb {self.ram_budget_mb} must be > 0, prefetch_batches {self.prefetch_batches} >= 0"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- shapes and parameter accounting

# names per kind; the second set starts at zero (the output side), which makes a fresh block a no-op
_NAMES = {
    "ffn": (("w_gate", "w_up", "w_down"), {"w_down"}),
    "lora": (("a_gate", "b_gate", "a_up", "b_up", "a_down", "b_down"), {"b_gate", "b_up", "b_down"}),
    "kv": (("k", "v"), {"v"}),
}


def _unit_shapes(kind: str, model_cfg: ModelConfig) -> dict[str, int]:
    d, f, a = model_cfg.d_model, model_cfg.ffn_hidden, model_cfg.attn_dim
    return {
        "ffn": {"w_gate": d, "w_up": d, "w_down": d},
        "lora": {"a_gate": d, "b_gate": f, "a_up": d, "b_up": f, "a_down": f, "b_down": d},
        "kv": {"k": a, "v": a},
    }[kind]


def block_shapes(mem_cfg: MemoryConfig, model_cfg: ModelConfig) -> dict[int, dict[str, tuple[int, ...]]]:
    """Per level (1-based, levels with r_l > 0 only): the shape of each named tensor of ONE block."""
    L = model_cfg.n_layers
    return {
        l: {n: (L, r, w) for n, w in _unit_shapes(mem_cfg.kind, model_cfg).items()}
        for l, r in enumerate(mem_cfg.ranks, start=1)
        if r > 0
    }


def param_counts(model_cfg: ModelConfig, mem_cfg: MemoryConfig) -> dict:
    """The paper's accounting. FFN-memory: 3*r*L*d per block; LoRA-FFN: 3*r*L*(d+F); KV: 2*r*L*A.

    ``fetched`` = sum of one block per level (what a sequence uses); ``bank`` = sum over all tree
    nodes (k^l blocks at level l), NOT counting the generic memory, which is reported separately
    (``generic`` = one more block set, the size of ``fetched``).
    """
    per_unit = sum(_unit_shapes(mem_cfg.kind, model_cfg).values()) * model_cfg.n_layers
    per_level = []
    for l, r in enumerate(mem_cfg.ranks, start=1):
        nodes = mem_cfg.k**l
        per_level.append({"level": l, "rank": r, "nodes": nodes, "block": r * per_unit, "total": nodes * r * per_unit})
    fetched = sum(x["block"] for x in per_level)
    bank = sum(x["total"] for x in per_level)
    anchor = model_cfg.num_params()
    return {
        "anchor": anchor,
        "fetched": fetched,
        "bank": bank,
        "generic": fetched,
        "total": anchor + bank + fetched,
        "per_level": per_level,
    }


def init_block(mem_cfg: MemoryConfig, gid: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Block ``gid``'s initial tensors: input side N(0, init_std) from a generator seeded by (seed, gid),
    output side zero (fresh = no-op). The same whichever rank or store builds it, and whenever."""
    zero = _NAMES[mem_cfg.kind][1]
    g = torch.Generator().manual_seed(mem_cfg.seed * 1_000_003 + gid)
    return {
        n: torch.zeros(s) if n in zero else torch.randn(s, generator=g) * mem_cfg.init_std for n, s in shapes.items()
    }


def bank_metadata(shapes: dict[int, dict[str, tuple[int, ...]]], metadata: dict | None) -> dict[str, str]:
    """The safetensors metadata of a bank file (format, per-level shapes, the caller's entries as JSON)."""
    meta = {"format": BANK_FORMAT, "shapes": json.dumps({str(l): s for l, s in shapes.items()})}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    return meta


def open_safetensors(path: str):
    """``safe_open`` naming the file when it is no safetensors file (e.g. a pickle left in its place): the
    format holds no code, so such a file is refused, never run."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="pt")
    except SafetensorError as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from None


def all_block_ids(mem_cfg: MemoryConfig, include_generic: bool = True) -> torch.Tensor:
    """Every global block id of the bank (tree nodes of all levels, then the generic blocks)."""
    n = n_tree_blocks(mem_cfg.k, mem_cfg.depth) + (mem_cfg.depth if include_generic else 0)
    return torch.arange(n, dtype=torch.long)


# ---------------------------------------------------------------- storage


class BlockStore(ABC):
    """A mapping from GLOBAL block id to the block's named tensors; blocks of one level share names/shapes.

    ``shapes[level][name]`` is the per-block shape. Implementations: ``TensorBlockStore`` (in memory);
    an mmap/on-disk store only has to provide the same methods.
    """

    shapes: dict[int, dict[str, tuple[int, ...]]]

    @abstractmethod
    def owned_ids(self) -> torch.Tensor:
        """Sorted global ids this store holds (all levels, generic ids included)."""

    @abstractmethod
    def read(self, level: int, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Copies of the blocks ``ids`` (all of level ``level``): name -> [len(ids), *shape]."""

    @abstractmethod
    def write(self, level: int, ids: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
        """Overwrite the blocks ``ids`` of level ``level`` with ``tensors`` (name -> [len(ids), *shape])."""

    @abstractmethod
    def save(self, path: str, metadata: dict | None = None) -> None:
        """Write the owned blocks to one safetensors file."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes the owned blocks take where they are held (RAM, device or disk)."""

    def state_store(self, name: str) -> "BlockStore":
        """A zero-initialised fp32 store with the same ids and shapes for per-block optimiser state
        ``name`` (train/optim.py), held where this store holds its blocks."""
        raise NotImplementedError(f"{type(self).__name__} holds no optimiser state")


def store_rows(owned: dict[int, torch.Tensor], level: int, ids, where: str = "owned by this store") -> torch.Tensor:
    """Rows of global block ``ids`` of ``level`` in a store whose sorted ids per level are ``owned``; a missing
    block is a KeyError saying where it is not."""
    if level not in owned:
        raise KeyError(f"level {level} has no blocks in this store (rank 0 or not a level)")
    # numpy: a serving fetch asks for one block per level, where torch's per-op overhead costs more than the lookup
    have = owned[level].numpy()
    ids = torch.as_tensor(ids, dtype=torch.long).flatten().cpu().numpy()
    rows = np.searchsorted(have, ids).clip(max=max(have.size - 1, 0))
    if have.size == 0 or not (have[rows] == ids).all():
        missing = ids[have[rows] != ids] if have.size else ids
        raise KeyError(f"level {level}: blocks {missing[:8].tolist()} are not {where}")
    return torch.from_numpy(rows)


class TensorBlockStore(BlockStore):
    """Blocks held as one tensor per (level, name): [n_owned_at_level, *shape], rows in id order.

    Built for any set of owned ids (a trainer rank holds only its subtrees' blocks; generic ids
    ``n_tree_blocks + l - 1`` are ordinary members of level l).
    """

    def __init__(
        self,
        shapes: dict[int, dict[str, tuple[int, ...]]],
        ids: dict[int, torch.Tensor],
        tensors: dict[int, dict[str, torch.Tensor]] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        self.shapes = {int(l): {n: tuple(s) for n, s in named.items()} for l, named in shapes.items()}
        self.ids: dict[int, torch.Tensor] = {}
        self.tensors: dict[int, dict[str, torch.Tensor]] = {}
        for l, named in self.shapes.items():
            lid = torch.as_tensor(ids.get(l, []), dtype=torch.long).flatten().cpu()
            lid, order = torch.sort(lid)
            if lid.numel() > 1 and bool((lid[1:] == lid[:-1]).any()):
                raise ValueError(f"level {l}: duplicate block ids")
            self.ids[l] = lid
            given = (tensors or {}).get(l)
            self.tensors[l] = {}
            for n, s in named.items():
                if given is None:
                    t = torch.zeros((lid.numel(), *s), dtype=dtype, device=device)
                else:
                    t = given[n]
                    if tuple(t.shape) != (lid.numel(), *s):
                        raise ValueError(f"level {l} {n}: shape {tuple(t.shape)}, expected {(lid.numel(), *s)}")
                    t = t.index_select(0, order.to(t.device)).to(device=device or t.device).contiguous()
                self.tensors[l][n] = t

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for named in self.tensors.values() for t in named.values())

    # -- construction helpers
    @classmethod
    def create(
        cls,
        mem_cfg: MemoryConfig,
        model_cfg: ModelConfig,
        owned_ids=None,
        *,
        init: bool = True,
        dtype: torch.dtype = torch.float32,
        device=None,
    ) -> "TensorBlockStore":
        """A store holding ``owned_ids`` (default: the whole bank incl. generic blocks), freshly initialised.

        Input-side tensors are N(0, init_std) drawn from a generator seeded by (seed, global id), so a
        block starts the same whichever rank owns it; output-side tensors are zero (fresh = no-op).
        Ids of levels with rank 0 are accepted and ignored.
        """
        shapes = block_shapes(mem_cfg, model_cfg)
        owned = all_block_ids(mem_cfg) if owned_ids is None else torch.as_tensor(owned_ids, dtype=torch.long).flatten()
        limit = n_tree_blocks(mem_cfg.k, mem_cfg.depth) + mem_cfg.depth
        if owned.numel() and (int(owned.min()) < 0 or int(owned.max()) >= limit):
            raise ValueError(f"block ids must lie in [0, {limit}) for k={mem_cfg.k}, depth={mem_cfg.depth}")
        levels = np.array([block_level(int(i), mem_cfg.k, mem_cfg.depth) for i in owned.tolist()], dtype=np.int64)
        ids = {l: owned[torch.from_numpy(levels == l)] for l in shapes}
        store = cls(shapes, ids, dtype=dtype, device=device)
        if init:
            store.initialise(mem_cfg)
        return store

    @torch.no_grad()
    def initialise(self, mem_cfg: MemoryConfig) -> None:
        for l, named in self.shapes.items():
            for row, gid in enumerate(self.ids[l].tolist()):
                for n, t in init_block(mem_cfg, gid, named).items():
                    self.tensors[l][n][row].copy_(t)

    def state_store(self, name: str) -> "TensorBlockStore":
        """Same ids and shapes, fp32 zeros on this store's device (``name`` does not matter in RAM)."""
        any_t = next((t for named in self.tensors.values() for t in named.values()), None)
        return TensorBlockStore(self.shapes, self.ids, device=any_t.device if any_t is not None else None)

    # -- the interface
    def owned_ids(self) -> torch.Tensor:
        parts = [self.ids[l] for l in sorted(self.ids)]
        return torch.sort(torch.cat(parts))[0] if parts else torch.zeros(0, dtype=torch.long)

    def read(self, level: int, ids) -> dict[str, torch.Tensor]:
        rows = store_rows(self.ids, level, ids)
        return {n: t.index_select(0, rows.to(t.device)) for n, t in self.tensors[level].items()}

    @torch.no_grad()
    def write(self, level: int, ids, tensors: dict[str, torch.Tensor]) -> None:
        rows = store_rows(self.ids, level, ids)
        for n, t in self.tensors[level].items():
            if n not in tensors:
                continue
            t.index_copy_(0, rows.to(t.device), tensors[n].detach().to(device=t.device, dtype=t.dtype))

    def save(self, path: str, metadata: dict | None = None) -> None:
        from safetensors.torch import save_file

        out = {}
        for l, named in self.tensors.items():
            out[f"level{l}.ids"] = self.ids[l].contiguous()
            for n, t in named.items():
                out[f"level{l}.{n}"] = t.detach().cpu().contiguous()
        save_file(out, path, metadata=bank_metadata(self.shapes, metadata))

    @classmethod
    def load(cls, path: str, owned_ids=None, device=None) -> "TensorBlockStore":
        """Read a file written by ``save``; with ``owned_ids`` keep only those blocks (all must be present)."""
        with open_safetensors(path) as f:
            meta = f.metadata() or {}
            if meta.get("format") != BANK_FORMAT:
                raise ValueError(f"{path}: format {meta.get('format')!r}, this code reads {BANK_FORMAT!r}")
            shapes = {
                int(l): {n: tuple(s) for n, s in named.items()} for l, named in json.loads(meta["shapes"]).items()
            }
            ids = {l: f.get_tensor(f"level{l}.ids") for l in shapes}
            tensors = {l: {n: f.get_tensor(f"level{l}.{n}") for n in named} for l, named in shapes.items()}
        store = cls(shapes, ids, tensors, device=device)
        if owned_ids is None:
            return store
        want = torch.as_tensor(owned_ids, dtype=torch.long).flatten()
        keep_ids, keep_t = {}, {}
        for l in shapes:
            mask = torch.isin(want, store.ids[l])
            keep_ids[l] = want[mask]
            keep_t[l] = store.read(l, keep_ids[l])
        n_kept = sum(v.numel() for v in keep_ids.values())
        if n_kept != torch.unique(want).numel():
            raise KeyError(f"{path}: {torch.unique(want).numel() - n_kept} requested blocks are not in the file")
        return cls(shapes, keep_ids, keep_t, device=device)

    @staticmethod
    def read_metadata(path: str) -> dict:
        with open_safetensors(path) as f:
            return dict(f.metadata() or {})


# ---------------------------------------------------------------- per-layer memory math


def _mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [B, T, n] times w^T, w [m, n] (shared: one GEMM over B*T rows) or [B, m, n] (batched)."""
    return x @ w.mT


class LayerMemory:
    """Hooks the anchor calls in each layer; the base class is a no-op."""

    def attend(self, q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y

    def pre_ffn(self, x, g, u):
        return g, u

    def post_ffn(self, x, h, out):
        return out


class FFNLayerMemory(LayerMemory):
    """R extra SwiGLU units: out += silu(x Wg^T) * (x Wu^T) @ Wd, gate and up in one matmul."""

    def __init__(self, w_gu: torch.Tensor, w_down: torch.Tensor):
        self.w_gu, self.w_down = w_gu, w_down  # [(B,) 2R, d], [(B,) R, d]

    def post_ffn(self, x, h, out):
        g, u = _mm(x, self.w_gu).chunk(2, dim=-1)
        h_mem = F.silu(g) * u
        if self.w_down.dim() == 2:  # one leaf for the whole batch: one GEMM over B*T rows, add fused
            return torch.addmm(out.flatten(0, 1), h_mem.flatten(0, 1), self.w_down).view_as(out)
        return torch.baddbmm(out, h_mem, self.w_down)


class LoRALayerMemory(LayerMemory):
    def __init__(self, a_gu, b_gate, b_up, a_down, b_down):
        self.a_gu, self.b_gate, self.b_up, self.a_down, self.b_down = a_gu, b_gate, b_up, a_down, b_down

    def pre_ffn(self, x, g, u):
        zg, zu = _mm(x, self.a_gu).chunk(2, dim=-1)
        return g + zg @ self.b_gate, u + zu @ self.b_up

    def post_ffn(self, x, h, out):
        return out + _mm(h, self.a_down) @ self.b_down


class KVLayerMemory(LayerMemory):
    """Every position attends to the path's R key/value slots (own softmax), added to causal attention."""

    def __init__(self, k, v, slot_mask):
        self.k, self.v, self.slot_mask = k, v, slot_mask  # [(B,) R, A]; mask [B, R] bool or None

    def attend(self, q, y):
        B, H, T, hd = q.shape
        R = self.k.shape[-2]
        k = self.k.reshape(-1, R, H, hd).transpose(1, 2).expand(B, H, R, hd)
        v = self.v.reshape(-1, R, H, hd).transpose(1, 2).expand(B, H, R, hd)
        mask = None if self.slot_mask is None else self.slot_mask[:, None, None, :]
        return y + F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ---------------------------------------------------------------- the fetched memory of a batch


@dataclass
class FetchedLevel:
    level: int
    ids: torch.Tensor
    params: dict[str, torch.Tensor]
    index: torch.Tensor


@dataclass
class Fetched:
    """The memory of one batch. Lists are per level (position l-1 for level l).

    ``ids[l]``: unique global ids [U_l]; ``params[l]``: name -> leaf [U_l, n_layers, r_l, ...] with
    requires_grad (copies read from the store); ``index[l]``: [B] row of each sequence, -1 = none.
    A level with rank 0, or disabled for the whole batch, has U_l = 0 and an empty ``params``.
    """

    kind: str
    ranks: tuple[int, ...]
    ids: list[torch.Tensor]
    params: list[dict[str, torch.Tensor]]
    index: list[torch.Tensor]
    all_same: bool
    n_layers: int
    batch_size: int = field(init=False)

    def __post_init__(self):
        self.batch_size = int(self.index[0].numel()) if self.index else 0

    @property
    def levels(self) -> list[FetchedLevel]:
        return [FetchedLevel(l + 1, i, p, x) for l, (i, p, x) in enumerate(zip(self.ids, self.params, self.index))]

    def leaves(self) -> list[torch.Tensor]:
        return [t for named in self.params for t in named.values()]

    def grads(self) -> list[dict[str, torch.Tensor | None]]:
        return [{n: t.grad for n, t in named.items()} for named in self.params]

    def layers(self, dtype: torch.dtype | None = None) -> list[LayerMemory]:
        """Per-layer memories. The gather happens here, once for all layers (see the module docstring)."""
        active = [(p, x) for p, x in zip(self.params, self.index) if p]
        if not active:
            return [LayerMemory()] * self.n_layers
        layer_cls, groups = _LAYER_GROUPS[self.kind]
        zero = _NAMES[self.kind][1]
        valid = None  # KV only: [B, R] bool of the slots each sequence may attend to
        if self.all_same:  # one block per level for the whole batch: [L, r, w] slices, no per-sequence copy
            rows = [int(x[0]) for _, x in active]
            tensors = [
                torch.cat([p[n][row] for n in group for (p, _), row in zip(active, rows)], dim=1) for group in groups
            ]
        else:
            rows = [x.clamp(min=0) for _, x in active]
            masks = [None if bool((x >= 0).all()) else x >= 0 for _, x in active]

            def part(p, r, m, n):  # [L, B, r, w] for one level and name
                t = p[n].index_select(0, r)
                if m is not None and (n in zero or self.kind == "kv"):
                    t = t * m.to(t.dtype)[:, None, None, None]
                return t.transpose(0, 1)

            # one cat per group: [L, B, R (x names in the group), w], contiguous, one copy per step
            tensors = [
                torch.cat([part(p, r, m, n) for n in group for (p, _), r, m in zip(active, rows, masks)], dim=2)
                for group in groups
            ]
            if self.kind == "kv" and any(m is not None for m in masks):
                B = self.batch_size
                valid = torch.cat(
                    [
                        (torch.ones(B, dtype=torch.bool, device=r.device) if m is None else m)[:, None].expand(
                            B, p["k"].shape[2]
                        )
                        for (p, _), r, m in zip(active, rows, masks)
                    ],
                    dim=1,
                )
                valid = valid | ~valid.any(dim=1, keepdim=True)  # no slots at all: values are zero, keep softmax finite
        if dtype is not None:
            tensors = [t.to(dtype) for t in tensors]
        extra = (valid,) if self.kind == "kv" else ()
        # per-layer views via unbind: its backward is ONE stack, where indexing t[i] per layer would
        # zero-fill and accumulate a full [L, ...] gradient once per layer (O(L^2) memory traffic)
        return [layer_cls(*per_layer, *extra) for per_layer in zip(*(t.unbind(0) for t in tensors))]


class ChainedLayerMemory(LayerMemory):
    """Several memories in one layer, their hooks applied in turn. For FFN memory the result equals one
    memory with all their units (the units' contributions add); LoRA deltas add too; KV memories each
    keep their own softmax."""

    def __init__(self, parts: list[LayerMemory]):
        self.parts = parts

    def attend(self, q, y):
        for m in self.parts:
            y = m.attend(q, y)
        return y

    def pre_ffn(self, x, g, u):
        for m in self.parts:
            g, u = m.pre_ffn(x, g, u)
        return g, u

    def post_ffn(self, x, h, out):
        for m in self.parts:
            out = m.post_ffn(x, h, out)
        return out


@dataclass
class FetchedUnion:
    """Several ``Fetched`` of one batch used together (inference only: e.g. the blocks of two paths)."""

    parts: list[Fetched]

    @property
    def batch_size(self) -> int:
        return self.parts[0].batch_size

    def layers(self, dtype: torch.dtype | None = None) -> list[LayerMemory]:
        return [ChainedLayerMemory(list(per_layer)) for per_layer in zip(*(f.layers(dtype) for f in self.parts))]


# the per-layer tensors each kind's LayerMemory takes; each is a cat of stored names along the unit axis
_LAYER_GROUPS = {
    "ffn": (FFNLayerMemory, (("w_gate", "w_up"), ("w_down",))),
    "lora": (LoRALayerMemory, (("a_gate", "a_up"), ("b_gate",), ("b_up",), ("a_down",), ("b_down",))),
    "kv": (KVLayerMemory, (("k",), ("v",))),
}


# ---------------------------------------------------------------- the bank


class MemoryBank:
    """Routes block ids to a ``BlockStore`` and builds ``Fetched`` batches. Not an ``nn.Module``."""

    def __init__(self, config: MemoryConfig, n_layers: int, d_model: int, store: BlockStore):
        self.config, self.n_layers, self.d_model, self.store = config, n_layers, d_model, store
        for l, r in enumerate(config.ranks, start=1):
            if r == 0:
                continue
            named = store.shapes.get(l)
            if named is None or set(named) != set(_NAMES[config.kind][0]):
                raise ValueError(
                    f"store level {l} holds {sorted(named or [])}, a {config.kind!r} memory needs "
                    f"{list(_NAMES[config.kind][0])}"
                )
            for n, s in named.items():
                if s[0] != n_layers or s[1] != r:
                    raise ValueError(f"store level {l} {n}: shape {s}, expected ({n_layers}, {r}, ...)")
            if config.kind == "ffn" and any(s[2] != d_model for s in named.values()):
                raise ValueError(f"store level {l}: width {named} differs from d_model {d_model}")

    @classmethod
    def create(cls, config: MemoryConfig, model_cfg: ModelConfig, owned_ids=None, **store_kwargs) -> "MemoryBank":
        """A bank over a fresh in-memory ``TensorBlockStore`` holding ``owned_ids`` (default: all)."""
        store = TensorBlockStore.create(config, model_cfg, owned_ids, **store_kwargs)
        return cls(config, model_cfg.n_layers, model_cfg.d_model, store)

    # -- which blocks a sequence uses
    def generic_ids(self) -> torch.Tensor:
        return torch.from_numpy(generic_block_ids(self.config.k, self.config.depth))

    def draw_generic(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Bool [n]: which sequences use the generic memory this step (probability ``p_generic`` each)."""
        return torch.rand(n, generator=generator) < self.config.p_generic

    def block_ids(self, paths, generic: bool | torch.Tensor = False) -> torch.Tensor:
        """Global block ids [B, p] for root-to-leaf ``paths`` [B, p]; ``generic`` (bool, or bool [B])
        swaps in the generic memory for all / the marked sequences."""
        paths = np.asarray(paths.cpu() if torch.is_tensor(paths) else paths, dtype=np.int64)
        ids = torch.from_numpy(path_block_ids(paths, self.config.k))
        gen = torch.as_tensor(generic, dtype=torch.bool)
        if gen.ndim == 0:
            gen = gen.expand(ids.shape[0])
        return torch.where(gen[:, None], self.generic_ids()[None, :], ids)

    # -- fetching and writing back
    def fetch(self, block_ids, *, requires_grad: bool = True, device=None) -> Fetched:
        """Read the blocks of a batch: ``block_ids`` [B, p] (-1 disables a level for that sequence)."""
        block_ids = torch.as_tensor(block_ids, dtype=torch.long).cpu()
        if block_ids.ndim != 2 or block_ids.shape[1] != self.config.depth:
            raise ValueError(f"block_ids of shape {tuple(block_ids.shape)}; expected [B, {self.config.depth}]")
        cols = block_ids.numpy()  # numpy bookkeeping: torch's per-op overhead dominated a one-prompt fetch
        all_same = bool((cols == cols[:1]).all())
        ids, params, index = [], [], []
        for l, r in enumerate(self.config.ranks, start=1):
            col = cols[:, l - 1]
            ok = col >= 0
            idx = np.full(len(col), -1, dtype=np.int64)
            if r == 0 or not ok.any():
                uniq, named = np.zeros(0, dtype=np.int64), {}
            else:
                uniq, inv = np.unique(col[ok], return_inverse=True)
                idx[ok] = inv
                named = self.store.read(l, torch.from_numpy(uniq))
                if requires_grad or device is not None:
                    named = {n: t.to(device).requires_grad_(requires_grad) for n, t in named.items()}
            ids.append(torch.from_numpy(uniq))
            params.append(named)
            index.append(torch.from_numpy(idx).to(device))
        return Fetched(self.config.kind, self.config.ranks, ids, params, index, all_same, self.n_layers)

    def write(self, fetched: Fetched) -> None:
        """Write the (updated) fetched rows back to the store."""
        for l, (uniq, named) in enumerate(zip(fetched.ids, fetched.params), start=1):
            if named:
                self.store.write(l, uniq, named)
