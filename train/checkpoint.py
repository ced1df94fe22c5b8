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


def load_bank(path: str, store, k: int, depth: int) -> None:
    """Overwrite every block of ``store`` from a bank file (``BlockStore.save``), a chunk of blocks at a time."""
    from train.store_disk import row_chunks

    ids = store.owned_ids()
    levels = torch.tensor([block_level(int(i), k, depth) for i in ids.tolist()])
    with open_safetensors(path) as f:
        if (f.metadata() or {}).get("format") != BANK_FORMAT:
            raise ValueError(f"{path}: not a {BANK_FORMAT} file")
        saved = [f.get_tensor(f"level{l}.ids") for l in store.shapes if f"level{l}.ids" in f.keys()]
        if len(saved) != len(store.shapes) or not torch.equal(torch.sort(torch.cat(saved))[0], ids):
            raise ValueError(f"{path} holds other blocks than this rank owns; same ranks and run directory needed")
        for level, named in store.shapes.items():
            lids = ids[levels == level]
            for a, b in row_chunks(named, len(lids)):
                store.write(level, lids[a:b], {n: f.get_slice(f"level{level}.{n}")[a:b] for n in named})


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
    """Restore the anchor (and its optimizer), this rank's bank shard and optimizer, and RNG; returns the state."""
    d = rank_dir(ckpt, rank)
    if not os.path.isdir(d):
        raise FileNotFoundError(
            f"{d} is missing: {ckpt} was written by fewer ranks; resume with the same number of ranks"
        )
    state = read_state(d)
    if state["world_size"] != world_size:
        raise ValueError(
            f"{ckpt} was written by {state['world_size']} ranks, this job has {world_size}: "
            "subtree ownership depends on it; resume with the same number of ranks"
        )
    root, tag = os.path.split(os.path.normpath(ckpt))
    load_path, _ = engine.load_checkpoint(
        root, tag=tag, load_optimizer_states=trains_anchor, load_lr_scheduler_states=False, load_module_strict=True
    )
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no anchor checkpoint in {ckpt}")
    if store is not None:
        load_bank(os.path.join(d, "bank.safetensors"), store, k, depth)
        mem_optim.load(os.path.join(d, "bank_optim.safetensors"))
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state
