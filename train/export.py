"""Export a trained model to one directory, and load it back (what ``index.query --model`` loads).

EXPORT/
  anchor.safetensors           the anchor's weights (fp32, consolidated from the ZeRO partitions); absent for
                               a memory on a transformers base, which meta.json's model.hf / hf_sha256 reference
  bank/level<l>.safetensors    every block of level l (tree nodes, then the generic block),
                               train.memory.TensorBlockStore format; one file per level so shallow
                               levels can sit in RAM and deep ones on disk
  tokenizer.json               the run's tokenizer
  meta.json                    tree version, k, depth, model / memory / train configs, step

Usage: python -m train.export --checkpoint OUT/checkpoints/stepN --data RUN_DIR --out EXPORT_DIR
(the trainer calls ``export`` itself at the end of a run).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from index.tree import block_level, generic_block_ids, level_offset
from train.model import Anchor, ModelConfig

FORMAT = "hmem-model/1"


def _merge_bank(files: list[str], k: int, depth: int) -> dict[int, tuple[dict, torch.Tensor, dict[str, torch.Tensor]]]:
    """Per level: (shapes, sorted ids, tensors) from the rank shards; shared blocks must agree across ranks."""
    from train.memory import TensorBlockStore

    levels: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    shapes: dict[int, dict] = {}
    for f in files:
        store = TensorBlockStore.load(f)
        ids = store.owned_ids()
        lv = torch.tensor([block_level(int(i), k, depth) for i in ids.tolist()])
        for level, named in store.shapes.items():
            shapes[level] = named
            lids = ids[lv == level]
            rows = store.read(level, lids)
            for j, b in enumerate(lids.tolist()):
                block = {n: t[j] for n, t in rows.items()}
                seen = levels.setdefault(level, {}).get(b)
                if seen is not None and any(not torch.equal(seen[n], block[n]) for n in block):
                    raise ValueError(f"block {b} differs between rank shards ({f}); the replicas of a shared block diverged")
                levels[level][b] = block
    out = {}
    for level, blocks in levels.items():
        ids = torch.tensor(sorted(blocks), dtype=torch.long)
        first = level_offset(level, k)
        want = set(range(first, first + k**level)) | {int(generic_block_ids(k, depth)[level - 1])}
        if set(ids.tolist()) != want:
            raise ValueError(f"level {level}: the rank shards hold {len(ids)} of its {len(want)} blocks; "
                             "export needs the checkpoint of every rank")
        tensors = {n: torch.stack([blocks[b][n] for b in ids.tolist()]) for n in shapes[level]}
        out[level] = (shapes[level], ids, tensors)
    return out


def export(checkpoint: str, run_dir: str, out_dir: str, cfg_dict: dict, anchor_state: dict[str, torch.Tensor],
           manifest: dict) -> str:
    """Write the export directory from a checkpoint (bank shards of all ranks) and the anchor's weights."""
    from train.memory import TensorBlockStore

    os.makedirs(out_dir, exist_ok=True)
    if anchor_state is not None:  # None: a transformers base, referenced by meta["model"] hf / hf_sha256
        save_file({n: t.detach().float().cpu().contiguous() for n, t in anchor_state.items()}, os.path.join(out_dir, "anchor.safetensors"))
    k, depth = int(manifest["k"]), int(manifest["depth"])
    shards = sorted(glob.glob(os.path.join(checkpoint, "rank*", "bank.safetensors")))
    if shards:
        os.makedirs(os.path.join(out_dir, "bank"), exist_ok=True)
        for level, (shapes, ids, tensors) in _merge_bank(shards, k, depth).items():
            TensorBlockStore({level: shapes}, {level: ids}, {level: tensors}).save(
                os.path.join(out_dir, "bank", f"level{level}.safetensors"))
    tok = os.path.join(run_dir, "tokenizer.json")
    if os.path.exists(tok):
        shutil.copy(tok, os.path.join(out_dir, "tokenizer.json"))
    state = torch.load(os.path.join(checkpoint, "rank0", "state.pt"), weights_only=False)
    meta = {"format": FORMAT, "tree_version": manifest["tree_version"], "k": k, "depth": depth,
            "seq_len": manifest["seq_len"], "eot_id": manifest.get("eot_id", 0), "pad_id": manifest.get("pad_id", 1),
            "model": cfg_dict["model"], "memory": cfg_dict["memory"] if shards else None,
            "train": cfg_dict, "step": state["step"], "run_dir": os.path.abspath(run_dir)}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return out_dir


def anchor_weights(checkpoint: str, cfg_dict: dict) -> dict[str, torch.Tensor] | None:
    """fp32 anchor weights: consolidated from the DeepSpeed checkpoint (any ZeRO stage), or, for a
    frozen anchor (which has no ZeRO optimizer state), the exported anchor the run started from."""
    recipe = cfg_dict["recipe"]
    if cfg_dict["model"].get("hf"):
        return None  # the frozen transformers base stays where it is; the export references it
    if recipe["name"] == "memory_only":
        return load_file(os.path.join(recipe["init_anchor"], "anchor.safetensors"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root, tag = os.path.split(os.path.normpath(checkpoint))
    return get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)


def load_model(directory: str, device: str | torch.device = "cpu"):
    """(anchor, bank, meta) from an export directory; ``bank`` is None for an anchor-only model."""
    from train.memory import MemoryBank, MemoryConfig, TensorBlockStore

    path = os.path.join(directory, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: --model must be an export directory written by train/main.py "
                                "(OUT/export) or python -m train.export")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, this code reads {FORMAT!r}")
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
        mem_cfg = MemoryConfig(**meta["memory"])
        parts = [TensorBlockStore.load(f) for f in sorted(glob.glob(os.path.join(directory, "bank", "level*.safetensors")))]
        shapes = {l: named for p in parts for l, named in p.shapes.items()}
        ids = {l: p.owned_ids() for p in parts for l in p.shapes}
        tensors = {l: p.read(l, ids[l]) for p in parts for l in p.shapes}
        bank = MemoryBank(mem_cfg, anchor.cfg.n_layers, anchor.cfg.d_model,
                          TensorBlockStore(shapes, ids, tensors, device=device))
    return anchor, bank, meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Export a trainer checkpoint to a model directory.")
    ap.add_argument("--checkpoint", required=True, help="OUT/checkpoints/step<N> (all ranks' shards)")
    ap.add_argument("--data", required=True, help="the run directory the model was trained on")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from train.data import read_manifest

    with open(os.path.join(os.path.dirname(os.path.normpath(args.checkpoint)), os.pardir, "config.json")) as f:
        cfg_dict = json.load(f)
    print(export(args.checkpoint, args.data, args.out, cfg_dict, anchor_weights(args.checkpoint, cfg_dict),
                 read_manifest(args.data)))


if __name__ == "__main__":
    main()
