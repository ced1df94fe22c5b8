"""Checkpoint layout, save and resume.

OUT/checkpoints/
  step00000120/                DeepSpeed's files for the anchor (module, ZeRO optimizer partitions)
    rank<r>/bank.safetensors       rank r's bank shard (only its blocks)
    rank<r>/bank_optim.safetensors its touched-block AdamW state
    rank<r>/state.json             format (STATE_FORMAT), step, loader state, counters, world size
    rank<r>/state.safetensors      the state's tensors (RNG: torch, cuda), referenced from state.json
  latest                       the tag of the newest COMPLETE checkpoint, written last by rank 0

A kill at any moment leaves ``latest`` pointing at a checkpoint whose files all exist.
The project's own files load without unpickling (JSON, safetensors); DeepSpeed's are its own
(docs/FORMATS.md).
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from index.tree import block_level
from train.memory import BANK_FORMAT, open_safetensors

STATE_FORMAT = "hmem-state/1"
_TENSOR = "$tensor"  # in state.json, {"$tensor": key} stands for state.safetensors' tensor ``key``


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def latest(root: str) -> str | None:
    """Directory of the newest complete checkpoint under ``root``, or None."""
    path = os.path.join(root, "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return os.path.join(root, f.read().strip())


def rank_dir(ckpt: str, rank: int) -> str:
    return os.path.join(ckpt, f"rank{rank}")


def write_state(d: str, state: dict) -> None:
    """``state`` (JSON values and tensors, nested in dicts and lists) as d/state.json + d/state.safetensors."""
    tensors = {}

    def split(x, key):
        if isinstance(x, torch.Tensor):
            tensors[key] = x.contiguous()
            return {_TENSOR: key}
        if isinstance(x, dict):
            return {k: split(v, f"{key}.{k}") for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [split(v, f"{key}.{i}") for i, v in enumerate(x)]
        return x

    plain = {k: split(v, k) for k, v in state.items()}
    save_file(tensors, os.path.join(d, "state.safetensors"))
    with open(os.path.join(d, "state.json"), "w") as f:
        json.dump({"format": STATE_FORMAT, "state": plain}, f)


def read_state(d: str) -> dict:
    """The state ``write_state`` wrote to ``d`` (a checkpoint's rank<r>/), refusing anything else in one line."""
    path = os.path.join(d, "state.json")
    if not os.path.exists(path) and os.path.exists(os.path.join(d, "state.pt")):
        raise ValueError(
            f"{os.path.join(d, 'state.pt')}: a checkpoint in the old pickle format, not read (unpickling "
            f"can run code); this code reads {STATE_FORMAT} (state.json + state.safetensors)"
        )
    try:
        with open(path) as f:
            doc = json.load(f)
    except ValueError as e:  # not JSON (e.g. a pickle put in its place)
        raise ValueError(f"{path}: not a {STATE_FORMAT} file ({e})") from None
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if fmt != STATE_FORMAT:
        raise ValueError(f"{path}: format {fmt!r}, this code reads {STATE_FORMAT!r}")
    with open_safetensors(os.path.join(d, "state.safetensors")) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    def join(x):
        if isinstance(x, dict):
            return tensors[x[_TENSOR]] if set(x) == {_TENSOR} else {k: join(v) for k, v in x.items()}
        return [join(v) for v in x] if isinstance(x, list) else x

    return join(doc["state"])


def save(root: str, step: int, engine, rank: int, state: dict, store=None, mem_optim=None) -> str:
    """Called by every rank. ``state`` holds the rank's loader state and counters; RNG is added here."""
    tag = tag_for(step)
    engine.save_checkpoint(root, tag=tag, save_latest=False)
    d = rank_dir(os.path.join(root, tag), rank)
    os.makedirs(d, exist_ok=True)
    if store is not None:
        store.save(os.path.join(d, "bank.safetensors"))
        mem_optim.save(os.path.join(d, "bank_optim.safetensors"))
    rng = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    write_state(d, {**state, "step": step, "rng": rng})
    dist.barrier()  # every rank's files are on disk before `latest` moves
    if rank == 0:
        tmp = os.path.join(root, "latest.tmp")
        with open(tmp, "w") as f:
            f.write(tag)
        os.replace(tmp, os.path.join(root, "latest"))
    return os.path.join(root, tag)


def check_file_list(paths) -> None:
    """A str is iterable too: one path given where a list is expected would be read as its characters."""
    if isinstance(paths, str):
        raise TypeError(f"expected a list of files, got the string {paths!r}: pass [{paths!r}]")


def gather_rows(paths: list[str], id_key: str, want: torch.Tensor, keys: list[str], shapes: dict, put) -> None:
    """Call ``put(ids, {key: rows})`` for every global block id of ``want`` (sorted), taking each from the first of
    ``paths`` (safetensors files keyed by ``id_key``) that holds it, a chunk of rows at a time. The same code loads
    a rank's own shard (one file) and, after a change of world size, its new blocks from the old shards."""
    from train.store_disk import row_chunks

    check_file_list(paths)
    found = torch.zeros(len(want), dtype=torch.bool)
    for path in paths:
        with open_safetensors(path) as f:
            if id_key not in f.keys() or not len(want):
                continue
            have = f.get_tensor(id_key)
            pos = torch.searchsorted(want, have).clamp(max=len(want) - 1)
            take = (want[pos] == have) & ~found[pos]
            for a, b in row_chunks(shapes, len(have)):
                rows = torch.nonzero(take[a:b]).flatten()
                if len(rows):
                    put(have[a:b][rows], {key: f.get_slice(key)[a:b][rows] for key in keys})
            found[pos[take]] = True
    if not found.all():
        raise ValueError(
            f"blocks {want[~found][:8].tolist()} are in none of {paths}: the checkpoint is incomplete "
            "or was written for another run directory"
        )


def bank_files(ckpt: str, ranks: list[int], name: str) -> list[str]:
    return [os.path.join(rank_dir(ckpt, r), name) for r in ranks]


def load_bank(paths: list[str], store, k: int, depth: int) -> None:
    """Overwrite every block of ``store`` from bank files (``BlockStore.save``) that together hold them."""
    check_file_list(paths)
    ids = store.owned_ids()
    levels = torch.tensor([block_level(int(i), k, depth) for i in ids.tolist()])
    for path in paths:
        with open_safetensors(path) as f:
            if (f.metadata() or {}).get("format") != BANK_FORMAT:
                raise ValueError(f"{path}: not a {BANK_FORMAT} file")
    for level, named in store.shapes.items():

        def put(lids, rows, level=level, named=named):
            store.write(level, lids, {n: rows[f"level{level}.{n}"] for n in named})

        gather_rows(paths, f"level{level}.ids", ids[levels == level], [f"level{level}.{n}" for n in named], named, put)


def load_anchor(ckpt: str, engine, trains_anchor: bool, elastic: bool) -> None:
    """The anchor and, when it trains, its optimizer. With ``elastic`` (another world size) DeepSpeed's engine
    loads the module only: it refuses ZeRO optimizer partitions of another data-parallel size. The partitions
    are then re-cut by the ZeRO-1/2 optimizer's own elastic routines (zero_optimization.elastic_checkpoint,
    train/config.py), which take any number of old partitions; its public load_state_dict would too, but it
    indexes the old list by the new rank, so a grown world fails there (DeepSpeed 0.19.8)."""
    root, tag = os.path.split(os.path.normpath(ckpt))
    partitioned = trains_anchor and engine.zero_optimization_stage() in (1, 2)
    load_path, _ = engine.load_checkpoint(
        root,
        tag=tag,
        load_optimizer_states=trains_anchor and not (elastic and partitioned),
        load_lr_scheduler_states=False,
        load_module_strict=True,
    )
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no anchor checkpoint in {ckpt}")
    if elastic and partitioned:
        opt = engine.optimizer
        steps = ("_load_global_state", "_restore_from_elastic_fp32_weights", "_restore_elastic_base_optimizer_state")
        if not all(hasattr(opt, name) for name in steps + ("_link_all_hp_params",)):
            raise RuntimeError(
                f"{ckpt}: resuming on another number of ranks needs DeepSpeed's ZeRO-1/2 elastic "
                f"routines ({', '.join(steps)}), which this DeepSpeed lacks; resume with "
                "the checkpoint's number of ranks, or use DeepSpeed 0.19"
            )
        partitions = engine._get_all_zero_checkpoints(root, tag)  # DeepSpeed's reader of its own files
        opt._load_global_state(partitions[0])  # loss scale, clipping: the same on every old rank
        opt._restore_from_elastic_fp32_weights(partitions)
        opt._restore_elastic_base_optimizer_state(partitions)
        opt._link_all_hp_params()


def load(
    ckpt: str,
    engine,
    rank: int,
    world_size: int,
    trains_anchor: bool,
    store=None,
    mem_optim=None,
    k: int = 0,
    depth: int = 0,
) -> dict:
    """Restore the anchor (and its optimizer), this rank's bank shard and optimizer, and RNG; returns the state.

    With another world size than the checkpoint's (elastic), each rank gathers the blocks it now owns from the
    old ranks' shards, DeepSpeed re-partitions the anchor's optimizer (ZeRO ``elastic_checkpoint``), and the
    returned ``state["loader"]`` holds every old rank's loader state under ``"elastic"`` (ShardLoader.resume).
    """
    first = rank_dir(ckpt, 0)
    if not os.path.isdir(first):
        raise FileNotFoundError(f"{first} is missing: {ckpt} is not a complete checkpoint")
    saved = read_state(first)["world_size"]
    old = list(range(saved))
    missing = [r for r in old if not os.path.isdir(rank_dir(ckpt, r))]
    if missing:
        raise FileNotFoundError(
            f"{rank_dir(ckpt, missing[0])} is missing: {ckpt} was written by {saved} ranks; copy "
            "every rank<r>/ directory of it"
        )
    states = [read_state(rank_dir(ckpt, r)) for r in old] if saved != world_size else None
    state = read_state(rank_dir(ckpt, rank)) if saved == world_size else dict(states[min(rank, saved - 1)])
    load_anchor(ckpt, engine, trains_anchor, elastic=saved != world_size)
    if store is not None:
        ranks = [rank] if saved == world_size else old
        load_bank(bank_files(ckpt, ranks, "bank.safetensors"), store, k, depth)
        mem_optim.load(bank_files(ckpt, ranks, "bank_optim.safetensors"))
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and saved == world_size:  # another world: another device count
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    if states is not None:
        state["loader"] = {"elastic": [s["loader"] for s in states]}
    return state
