"""Learn new documents: route them into the model's frozen tree and train only the blocks on their paths.

    python -m hmem.learn --run RUN --model EXPORT --out OUT new.jsonl [--id-column id] [--epochs E]

The job routes and packs the new documents with RUN's tree, tokenizer and job config. The model's memory then
trains on them alone (recipe memory_only: the anchor stays as it is; ``data.isolated``: each level-1 subtree
its own stream; the generic memory untouched), starting from EXPORT's bank (``recipe.init_memory``). The
touched-block optimizer moves only blocks that a new sequence fetches, and only those are copied into the new
export, so a prompt routed to any other block gets bit-identical logits. ``--epochs`` (default: as many passes
as the model's own training gave an average subtree's sequences) sets the steps.

Writes OUT/run (RUN plus the new documents, its document index rebuilt, so prompts find them), OUT/export
(meta.json ``learned`` records the documents, steps and cost) and OUT/learn.json.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hmem.forget import (
    _link,
    command_line,
    finish,
    link_tree,
    path_blocks,
    repack,
    retrain,
    routed,
    subtree_counts,
)
from hmem.cli import respond
from index.docindex import build_document_index
from index.rundir import read_manifest, write_manifest
from train.export import read_meta

GROUP_SHIFT, LEAF_SHIFT = 20, 31  # seq_id = leaf << 31 | group << 20 | i (pipeline/pack.py make_pack)


def check_new_ids(run: str, new: str) -> None:
    ids = routed(new, None, ("doc_id",))["doc_id"].to_pylist()
    taken = routed(run, pc.field("doc_id").isin(ids), ("doc_id",))["doc_id"].to_pylist()
    if taken:
        raise ValueError(f"{len(taken)} new documents have ids RUN already holds, e.g. {taken[:3]}: give them new ids")


def next_groups(run: str, subtree: int) -> dict[int, int]:
    """Per leaf of ``subtree``, the first packing group number RUN does not use."""
    d = os.path.join(run, "shards", f"l1={subtree}")
    out: dict[int, int] = {}
    for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        if f.endswith(".parquet") and not f.startswith("."):
            s = pq.read_table(os.path.join(d, f), columns=["seq_id"])["seq_id"].to_numpy()
            for leaf, g in zip((s >> LEAF_SHIFT).tolist(), ((s >> GROUP_SHIFT) & 0x7FF).tolist()):
                out[leaf] = max(out.get(leaf, 0), g + 1)
    return out


def add_shards(run: str, new: str, out: str, subtree: int, tag: str) -> None:
    """The new run's shards of ``subtree`` into OUT/run, their packing groups numbered after RUN's so that every
    seq_id stays unique."""
    src, dst = os.path.join(new, "shards", f"l1={subtree}"), os.path.join(out, "shards", f"l1={subtree}")
    os.makedirs(dst, exist_ok=True)
    base = next_groups(run, subtree)
    for f in sorted(os.listdir(src)):
        if not f.endswith(".parquet") or f.startswith("."):
            continue
        t = pq.read_table(os.path.join(src, f))
        s = t["seq_id"].to_numpy()
        leaf, group = s >> LEAF_SHIFT, (s >> GROUP_SHIFT) & 0x7FF
        shift = np.array([base.get(int(lf), 0) for lf in leaf], dtype=np.int64)
        if int((group + shift).max(initial=0)) >= 1 << (LEAF_SHIFT - GROUP_SHIFT):
            raise ValueError(f"leaf {int(leaf[0])}: too many packing groups for seq_id numbering")
        t = t.set_column(0, "seq_id", pc.add(t["seq_id"], shift << GROUP_SHIFT))
        pq.write_table(t, os.path.join(dst, f"{tag}-{f}"))


def build_run(run: str, new: str, out: str, tag: str, record: dict) -> dict:
    """OUT/run: RUN (hard links) plus the new run's documents, routes and shards; counts summed; indexed."""
    link_tree(run, out, ignore=("index", "work", "stages", "embeddings", "manifest.json"))
    subtrees = sorted({int(d[3:]) for d in os.listdir(os.path.join(new, "routed")) if d.startswith("l1=")})
    for s in subtrees:
        add_shards(run, new, out, s, tag)
        d = os.path.join(out, "routed", f"l1={s}")
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(os.path.join(new, "routed", f"l1={s}")):
            if f.endswith(".parquet") and not f.startswith("."):
                _link(os.path.join(new, "routed", f"l1={s}", f), os.path.join(d, f"{tag}-{f}"))
    for f in os.listdir(os.path.join(new, "documents")):
        if f.endswith(".parquet") and not f.startswith("."):
            _link(os.path.join(new, "documents", f), os.path.join(out, "documents", f"{tag}-{f}"))
    m, mn = read_manifest(run), read_manifest(new)
    add = subtree_counts(new, subtrees)
    m.pop("checksums", None)  # they sum over the job's input, which this run no longer equals
    for key, src in (
        ("documents_in", "documents"),
        ("documents_routed", "documents"),
        ("documents_distinct", "distinct"),
    ):
        m[key] += add[src]
    for key in ("sequences", "tokens", "valid_tokens"):
        m[key] += add[key]
    for lv, lnew in zip(m["levels"], mn["levels"]):
        for key in ("node_documents", "node_tokens"):
            lv[key] = [a + b for a, b in zip(lv[key], lnew[key])]
    m["learned"] = m.get("learned", []) + [record]
    m["derived_from"] = os.path.abspath(run)
    write_manifest(out, m)
    build_document_index(out, log=lambda s: print(s, file=sys.stderr))
    return m


def learn(args) -> dict:
    meta, manifest = read_meta(args.model), read_manifest(args.run)
    if meta["tree_version"] != manifest["tree_version"] or meta["memory"] is None:
        raise ValueError(f"{args.model}: a memory model trained on {args.run}'s tree is needed")
    if os.path.exists(args.out):
        raise ValueError(f"{args.out} exists; learn writes a new run and export there: give a new directory")
    t0 = time.time()
    work = os.path.join(args.out, "work")
    os.makedirs(work)
    new = os.path.join(work, "new")
    repack(args.run, args.input, new, args.master, os.path.join(work, "job.log"), args.id_column)
    check_new_ids(args.run, new)
    mn = read_manifest(new)
    docs = routed(new, None, ("doc_id", "path"))
    paths = docs["path"].to_pylist()
    cfg = meta["train"]
    batch, active = cfg["data"]["batch_size"], sum(1 for d in manifest["levels"][0]["node_documents"] if d)
    epochs = args.epochs or cfg["schedule"]["max_steps"] * batch * active / manifest["sequences"]
    per_subtree = [subtree_counts(new, [s])["sequences"] for s in sorted({p[0] for p in paths})]
    steps = max(1, math.ceil(epochs * max(per_subtree) / batch))
    learn_cfg = json.loads(json.dumps(meta))
    anchor = None if meta["model"].get("hf") else args.model  # a transformers base is referenced, not exported
    learn_cfg["train"]["recipe"].update(name="memory_only", init_anchor=anchor, init_memory=args.model)
    learn_cfg["train"]["data"]["isolated"] = True
    learn_cfg["train"]["memory"]["p_generic"] = 0.0
    learn_cfg["train"]["schedule"].update(max_steps=steps, checkpoint_every=0)
    trained = os.path.join(work, "train")
    seconds = retrain(learn_cfg, new, trained, os.path.join(work, "train.log"))
    blocks = path_blocks(manifest["k"], paths, 1)
    tokens = steps * batch * manifest["seq_len"] * len(per_subtree)
    full = cfg["schedule"]["max_steps"] * batch * manifest["seq_len"] * active
    record = {
        "doc_ids": docs["doc_id"].to_pylist(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sequences": mn["sequences"],
        "epochs": epochs,
        "steps": steps,
        "blocks": blocks.tolist(),
        "tokens_trained": tokens,
        "tokens_full_memory_training": full,
        "share_of_full": tokens / full,
        "train_seconds": round(seconds, 1),
    }
    build_run(args.run, new, os.path.join(args.out, "run"), "learn" + time.strftime("%Y%m%d%H%M%S"), record)
    from train.lazy_store import LazyBlockStore

    bank = os.path.join(trained, "export", "bank")
    source = LazyBlockStore([os.path.join(bank, f) for f in sorted(os.listdir(bank))]).read
    return finish(args, meta, "learned", record, blocks, source, t0)


def main(argv: list[str] | None = None) -> int:
    p = command_line("learn", __doc__, "job")
    p.add_argument("input", help="the new documents: JSONL or Parquet, as the job reads them")
    p.add_argument("--id-column", default="id", help="the documents' id field (default id)")
    p.add_argument("--epochs", type=float, default=None, help="passes over the new sequences")
    args = p.parse_args(argv)

    def summary(r: dict) -> str:
        return (
            f"learned {len(r['doc_ids'])} documents: {r['steps']} steps ({r['epochs']:.1f} epochs) on "
            f"{len(r['blocks'])} blocks, {r['tokens_trained']:,} tokens = {r['share_of_full']:.1%} of the "
            f"memory's training, {r['seconds']} s; new run {args.out}/run, new model {args.out}/export"
        )

    return respond(lambda: [learn(args)], args.json, summary)


if __name__ == "__main__":
    sys.exit(main())
