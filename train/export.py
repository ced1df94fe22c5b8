"""Export a trained model to one directory, and load it back (what ``hmem.query --model`` loads).

EXPORT/
  anchor.safetensors           the anchor's weights (fp32, consolidated from the ZeRO partitions); absent for
                               a memory on a transformers base, which meta.json's model.hf / hf_sha256 reference
  bank/rank<r>.safetensors     the blocks rank r exports: those of its subtrees, and a block several
                               ranks hold (ancestors, generic) from the lowest of them only;
                               train.memory.TensorBlockStore format, written by rank r itself
  tokenizer.json               the run's tokenizer
  meta.json                    tree version, k, depth, model / memory / train configs, step,
                               ``bank_files``: file -> level -> [[first_id, last_id + 1], ...], and
                               ``routing``: the default routing of prompts (index.router.RoutingConfig)

No gather: each rank writes its own bank file from its own checkpoint shard, so no rank holds more
than its shard and the ranks need no shared filesystem for these writes (OUT/export/bank/ may be a
local disk on each node). Rank 0 writes the anchor, the tokenizer and meta.json; it derives the
block -> file table from the ownership (deterministic from the manifest and the world size), without
hearing from the other ranks. To load, every file listed in ``bank_files`` must sit in EXPORT/bank/
on the loading machine (copy them there from each node); ``load_model`` names a missing one.
``load_model`` opens the bank lazily (train/lazy_store.py): a query or an evaluation batch reads
only the blocks it fetches.

Usage: python -m train.export --checkpoint OUT/checkpoints/stepN --data RUN_DIR [RUN_DIR ...] --out EXPORT_DIR
(the trainer calls ``write_bank_file`` on every rank and ``export`` on rank 0 at the end of a run).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pickle
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from index.tree import block_level
from train.checkpoint import rank_dir, read_state
from train.model import Anchor, ModelConfig

FORMAT = "hmem-model/2"


def export_blocks(ownership, rank: int) -> np.ndarray:
    """Sorted ids rank ``rank`` exports: its blocks, less those a lower rank also holds."""
    lower = {b for b, rs in ownership.holders().items() if min(rs) < rank}
    return np.array([b for b in ownership.blocks(rank).tolist() if b not in lower], dtype=np.int64)


def _levels(ids: np.ndarray, k: int, depth: int) -> np.ndarray:
    return np.array([block_level(int(i), k, depth) for i in ids.tolist()], dtype=np.int64)


def bank_files(ownership, levels: list[int]) -> dict[str, dict[str, list[list[int]]]]:
    """meta.json ``bank_files``: per rank's file, per level (with memory), runs [first, last + 1) of its ids."""
    out = {}
    for r in range(ownership.world_size):
        ids = export_blocks(ownership, r)
        lv = _levels(ids, ownership.k, ownership.depth)
        table = {}
        for level in levels:
            x = ids[lv == level]
            if len(x):
                cuts = np.flatnonzero(np.diff(x) != 1) + 1
                table[str(level)] = [[int(run[0]), int(run[-1]) + 1] for run in np.split(x, cuts)]
        if table:
            out[f"bank/rank{r}.safetensors"] = table
    return out


def write_bank_file(checkpoint: str, rank: int, out_dir: str, ownership) -> str:
    """Rank ``rank``'s export file from its own checkpoint shard (read lazily: only the exported rows)."""
    from train.lazy_store import LazyBlockStore
    from train.memory import TensorBlockStore

    shard = LazyBlockStore([os.path.join(checkpoint, f"rank{rank}", "bank.safetensors")])
    ids = export_blocks(ownership, rank)
    lv = _levels(ids, ownership.k, ownership.depth)
    mine = {l: torch.from_numpy(ids[lv == l]) for l in shard.shapes}
    path = os.path.join(out_dir, "bank", f"rank{rank}.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    TensorBlockStore(shard.shapes, mine, {l: shard.read(l, x) for l, x in mine.items()}).save(path)
    return path


def export(
    checkpoint: str,
    run_dir: str,
    out_dir: str,
    cfg_dict: dict,
    anchor_state: dict[str, torch.Tensor],
    manifest: dict,
    ownership,
) -> str:
    """Rank 0's part: anchor, tokenizer and meta.json (the ranks write their bank files themselves)."""
    os.makedirs(out_dir, exist_ok=True)
    if anchor_state is not None:  # None: a transformers base, referenced by meta["model"] hf / hf_sha256
        save_file(
            {n: t.detach().float().cpu().contiguous() for n, t in anchor_state.items()},
            os.path.join(out_dir, "anchor.safetensors"),
        )
    tok = os.path.join(run_dir, "tokenizer.json")
    if os.path.exists(tok):
        shutil.copy(tok, os.path.join(out_dir, "tokenizer.json"))
    state = read_state(rank_dir(checkpoint, 0))
    memory = cfg_dict["memory"] if cfg_dict["recipe"]["name"] != "anchor_only" else None
    levels = [l for l, r in enumerate(memory["ranks"], start=1) if r > 0] if memory else []
    meta = {
        "tree_version": manifest["tree_version"],
        "k": ownership.k,
        "depth": ownership.depth,
        "seq_len": manifest["seq_len"],
        "eot_id": manifest.get("eot_id", 0),
        "pad_id": manifest.get("pad_id", 1),
        "model": cfg_dict["model"],
        "memory": memory,
        "routing": cfg_dict.get("routing"),
        "train": cfg_dict,
        "step": state["step"],
        "run_dir": os.path.abspath(run_dir),
        "runs": manifest.get("runs", [os.path.abspath(run_dir)]),
        "bank_files": bank_files(ownership, levels) if memory else {},
    }
    write_meta(out_dir, meta)
    return out_dir


def write_meta(directory: str, meta: dict) -> None:
    """An export's meta.json, stamped with FORMAT; written to a new file and renamed, so a crash leaves the old
    one and a hard link to another export's meta.json (hmem.forget, hmem.learn) is replaced, never written."""
    path = os.path.join(directory, "meta.json")
    with open(path + ".tmp", "w") as f:
        json.dump({**meta, "format": FORMAT}, f, indent=2)
    os.replace(path + ".tmp", path)


def read_meta(directory: str) -> dict:
    """An export's meta.json, refusing a missing file or another format in one line."""
    path = os.path.join(directory, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: --model must be an export directory written by train/main.py "
            "(OUT/export) or python -m train.export"
        )
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, this code reads {FORMAT!r}")
    return meta


def anchor_weights(checkpoint: str, cfg_dict: dict) -> dict[str, torch.Tensor] | None:
    """fp32 anchor weights: consolidated from the DeepSpeed checkpoint (ZeRO 1-3 partitions, or the module
    states at stage 0), or, for a frozen anchor (no optimizer state), the exported anchor the run started from;
    None for a frozen transformers base (the export references it)."""
    recipe = cfg_dict["recipe"]
    if cfg_dict["model"].get("hf"):
        return None  # the frozen transformers base stays where it is; the export references it
    if recipe["name"] == "memory_only":
        return load_file(os.path.join(recipe["init_anchor"], "anchor.safetensors"))
    if not glob.glob(os.path.join(checkpoint, "*optim_states.pt")):
        # ZeRO stage 0 in fp32: no partitioned optimizer files; the module states hold the full weights. DeepSpeed
        # writes them as tensors, plain containers and scalars only, which weights_only loads without help.
        path = os.path.join(checkpoint, "mp_rank_00_model_states.pt")
        try:
            module = torch.load(path, map_location="cpu", weights_only=True)["module"]
        except pickle.UnpicklingError:  # torch's message runs to a page: name the file, in one line
            raise ValueError(
                f"{path}: holds objects other than tensors and plain containers; refused "
                "(torch.load weights_only=True), nothing in it was run"
            ) from None
        return {n: t.float() for n, t in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root, tag = os.path.split(os.path.normpath(checkpoint))
    return get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)


def load_model(directory: str, device: str | torch.device = "cpu"):
    """(anchor, bank, meta) from an export directory; ``bank`` is None for an anchor-only model."""
    from train.memory import MemoryBank, MemoryConfig

    meta = read_meta(directory)
    model_cfg = ModelConfig(**meta["model"])
    if model_cfg.hf:  # memory on a transformers base: load it, refusing one whose content hash differs
        from train.hf import load_base

        anchor = load_base(model_cfg, device)
    else:
        anchor = Anchor(model_cfg)
        anchor.load_state_dict(load_file(os.path.join(directory, "anchor.safetensors")))
        anchor.to(device).eval()
    bank = None
    if meta["memory"] is not None:
        from train.lazy_store import LazyBlockStore

        files = [os.path.join(directory, f) for f in sorted(meta["bank_files"])]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise FileNotFoundError(
                f"{directory}: bank files {missing} are missing; each rank wrote its own at export "
                "(on its node's disk): copy every file listed in meta.json bank_files into "
                f"{os.path.join(directory, 'bank')}/"
            )
        mem_cfg = MemoryConfig(**meta["memory"])
        store = LazyBlockStore(files, device=device)
        for l, r in enumerate(mem_cfg.ranks, start=1):
            if r and store.ids.get(l, torch.zeros(0)).numel() != mem_cfg.k**l + 1:
                raise ValueError(
                    f"{directory}/bank: level {l} has {store.ids.get(l, torch.zeros(0)).numel()} blocks, "
                    f"expected {mem_cfg.k**l} tree blocks + 1 generic"
                )
        bank = MemoryBank(mem_cfg, anchor.cfg.n_layers, anchor.cfg.d_model, store)
    return anchor, bank, meta


def export_transformers(export_dir: str, out_dir: str) -> str:
    """Write a project export's anchor as a transformers Llama checkpoint (a bank, if any, is not part of it)."""
    from transformers import LlamaForCausalLM

    from pipeline import tokenizer
    from train.hf import llama_config, llama_state_dict

    meta = read_meta(export_dir)
    if meta["model"].get("hf"):
        raise ValueError(
            f"{export_dir} is a memory on the transformers model {meta['model']['hf']}: that base is "
            "already a transformers checkpoint"
        )
    cfg = ModelConfig(**meta["model"])
    anchor = Anchor(cfg)
    anchor.load_state_dict(load_file(os.path.join(export_dir, "anchor.safetensors")))
    eos_id, pad_id = int(meta["eot_id"]), int(meta["pad_id"])
    model = LlamaForCausalLM(llama_config(cfg, eos_id, pad_id))
    missing, unexpected = model.load_state_dict(llama_state_dict(anchor.state_dict()), strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if cfg.tied_embeddings else set()):
        raise RuntimeError(f"weight names do not map onto LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    if cfg.tied_embeddings:
        model.tie_weights()
    model.save_pretrained(out_dir)
    tokenizer.save_transformers(os.path.join(export_dir, "tokenizer.json"), out_dir, eos_id, pad_id)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description="Export a trainer checkpoint to a model directory (one process, "
        "each rank's shard in turn; the trainer itself writes the bank files on each rank)."
    )
    ap.add_argument("--checkpoint", required=True, help="OUT/checkpoints/step<N> (all ranks' shards)")
    ap.add_argument(
        "--data", required=True, nargs="+", metavar="RUN", help="the run directories the model was trained on"
    )
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from train.data import assign_subtrees, read_manifests

    with open(os.path.join(os.path.dirname(os.path.normpath(args.checkpoint)), os.pardir, "config.json")) as f:
        cfg_dict = json.load(f)
    manifest = read_manifests(args.data)
    world = read_state(rank_dir(args.checkpoint, 0))["world_size"]
    ownership = assign_subtrees(manifest, world)
    if cfg_dict["recipe"]["name"] != "anchor_only":
        for r in range(world):
            write_bank_file(args.checkpoint, r, args.out, ownership)
    print(
        export(
            args.checkpoint,
            args.data[0],
            args.out,
            cfg_dict,
            anchor_weights(args.checkpoint, cfg_dict),
            manifest,
            ownership,
        )
    )


if __name__ == "__main__":
    main()
