"""Learn new documents: route them into the model's frozen tree and train only the blocks on their paths.

    python -m hmem.learn --run RUN --model EXPORT --out OUT new.jsonl [--id-column id] [--epochs E]
                         [--from-level L] [--replay R]

The job routes and packs the new documents with RUN's tree, tokenizer and job config. The model's memory then
trains on them (recipe memory_only: the anchor stays as it is; ``data.isolated``: each level-1 subtree its own
stream; the generic memory untouched), starting from EXPORT's bank (``recipe.init_memory``):
  - only the blocks of levels ``--from-level`` and deeper train (default: the leaves). A shallower block is
    shared by every document under its node, which a few new documents would overwrite;
  - beside the new sequences, ``--replay`` R of RUN's own sequences per new one, drawn (seeded) from the leaves
    the new documents reach: the blocks that learn the new facts keep reading the old ones they hold.
The touched-block optimizer moves only blocks that a training sequence fetches at those levels, and only
those are copied into the new export, so a prompt routed to any other block gets bit-identical logits.
``--epochs`` (default: as many passes as the model's own training gave an average subtree's sequences) passes
over the new and replayed sequences set the steps.

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
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from hmem.forget import (
    _link,
    command_line,
    finish,
    link_tree,
    path_blocks,
    repack,
    resolve_from_level,
    retrain,
    routed,
    shard_totals,
    subtree_counts,
)
from hmem.cli import respond
from index.docindex import build_document_index
from index.rundir import SHARD_SCHEMA, read_manifest, write_manifest
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


def replay_run(run: str, new: str, out: str, ratio: float, seed: int) -> int:
    """OUT: a run directory of RUN's own sequences from the leaves ``new``'s sequences reach, ``ceil(ratio x``
    the leaf's new sequences``)`` of them per leaf (all where it has fewer), drawn by (seed, leaf); the trainer
    reads it beside ``new``. Returns its sequences. Memory: one level-1 subtree's rows of those leaves."""
    m = read_manifest(run)
    k, depth = m["k"], m["depth"]
    os.makedirs(os.path.join(out, "shards"))
    for name in ("tokenizer.json", "config.json"):
        if os.path.exists(os.path.join(run, name)):
            _link(os.path.join(run, name), os.path.join(out, name))
    n, packed, docs_per_leaf, tokens_per_leaf = 0, 0, {}, {}
    for d in sorted(x for x in os.listdir(os.path.join(new, "shards")) if x.startswith("l1=")):
        if not os.path.isdir(os.path.join(run, "shards", d)):
            continue  # a subtree RUN never filled: nothing to replay
        fresh = ds.dataset(os.path.join(new, "shards", d), format="parquet").to_table(columns=["leaf"])
        want = pc.value_counts(fresh["leaf"]).to_pylist()
        old = ds.dataset(os.path.join(run, "shards", d), format="parquet")
        rows = old.to_table(filter=pc.field("leaf").isin([w["values"] for w in want]))
        picks = []
        for w in want:
            leaf = w["values"]
            mine = pc.indices_nonzero(pc.equal(rows["leaf"], leaf)).to_numpy()
            n_leaf = min(len(mine), math.ceil(ratio * w["counts"]))
            picks.append(np.sort(np.random.default_rng([seed, leaf]).choice(mine, n_leaf, replace=False)))
        table = rows.take(pa.array(np.concatenate(picks), type=pa.int64())).select(SHARD_SCHEMA.names)
        if not table.num_rows:
            continue
        table = table.sort_by([("leaf", "ascending"), ("seq_id", "ascending")]).cast(SHARD_SCHEMA)
        os.makedirs(os.path.join(out, "shards", d))
        pq.write_table(table, os.path.join(out, "shards", d, "replay.parquet"), row_group_size=256)
        n += table.num_rows
        for leaf, ids, valid in zip(*(table[c].to_pylist() for c in ("leaf", "doc_ids", "n_valid"))):
            docs_per_leaf.setdefault(leaf, set()).update(ids)
            packed += len(ids)
            tokens_per_leaf[leaf] = tokens_per_leaf.get(leaf, 0) + valid
    docs_per_leaf = {leaf: len(ids) for leaf, ids in docs_per_leaf.items()}
    docs, tokens = sum(docs_per_leaf.values()), sum(tokens_per_leaf.values())
    for lv in m["levels"]:
        width = k ** (depth - lv["level"])  # leaves under one node of this level
        nodes = len(lv["node_documents"])
        lv["node_documents"] = [sum(docs_per_leaf.get(j * width + i, 0) for i in range(width)) for j in range(nodes)]
        lv["node_tokens"] = [sum(tokens_per_leaf.get(j * width + i, 0) for i in range(width)) for j in range(nodes)]
    m.pop("checksums", None)
    m.update(documents_in=docs, documents_routed=docs, documents_distinct=docs, documents_quarantined=0)
    m["documents_packed"] = packed
    m.update(sequences=n, tokens=tokens, valid_tokens=tokens, replay_of=os.path.abspath(run))
    write_manifest(out, m)
    return n


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
        ("documents_packed", "packed"),
    ):
        if key in m:  # documents_packed: runs from before the data mix have none
            m[key] += add[src]
    for key in ("sequences", "tokens", "valid_tokens"):
        m[key] += add[key]
    for lv, lnew in zip(m["levels"], mn["levels"]):
        for key in ("node_documents", "node_tokens"):
            lv[key] = [a + b for a, b in zip(lv[key], lnew[key])]
    m["learned"] = m.get("learned", []) + [record]
    m["derived_from"] = os.path.abspath(run)
    write_manifest(out, m)
    build_document_index(out, log=lambda s: print(s, file=sys.stderr), codebooks_from=run)
    return m


def learn_warmup(cfg: dict, steps: int) -> int:
    """The memory's warmup for a learn of ``steps``: the same share of them as in the model's own training. Its
    warmup kept whole (30 of 174 steps, say) holds a learn of a few steps at a fraction of the peak learning rate,
    where the blocks barely move (the long-tail bench's learn reached 0% of the facts that way)."""
    return round(cfg["optim"]["memory"].get("warmup_steps", 0) * steps / cfg["schedule"]["max_steps"])


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
    repack(args.run, [args.input], new, args.master, os.path.join(work, "job.log"), args.id_column)
    check_new_ids(args.run, new)
    mn = read_manifest(new)
    docs = routed(new, None, ("doc_id", "path"))
    paths = docs["path"].to_pylist()
    cfg = meta["train"]
    data = [new]
    replayed = 0
    if args.replay > 0:
        replayed = replay_run(args.run, new, os.path.join(work, "replay"), args.replay, cfg["data"]["seed"])
        data += [os.path.join(work, "replay")] if replayed else []  # new leaves hold no old sequences
    batch, active = cfg["data"]["batch_size"], sum(1 for d in manifest["levels"][0]["node_documents"] if d)
    epochs = args.epochs or cfg["schedule"]["max_steps"] * batch * active / manifest["sequences"]
    subtrees = sorted({p[0] for p in paths})
    per_subtree = [sum(shard_totals(r, [s])["sequences"] for r in data) for s in subtrees]
    steps = max(1, math.ceil(epochs * max(per_subtree) / batch))
    learn_cfg = json.loads(json.dumps(meta))
    anchor = None if meta["model"].get("hf") else args.model  # a transformers base is referenced, not exported
    learn_cfg["train"]["recipe"].update(
        name="memory_only", init_anchor=anchor, init_memory=args.model, memory_from_level=args.from_level
    )
    learn_cfg["train"]["data"]["isolated"] = True
    learn_cfg["train"]["memory"]["p_generic"] = 0.0
    learn_cfg["train"]["schedule"].update(max_steps=steps, checkpoint_every=0)
    learn_cfg["train"]["optim"]["memory"]["warmup_steps"] = warmup = learn_warmup(cfg, steps)
    trained = os.path.join(work, "train")
    seconds = retrain(learn_cfg, data, trained, os.path.join(work, "train.log"))
    blocks = path_blocks(manifest["k"], paths, args.from_level)
    tokens = steps * batch * manifest["seq_len"] * len(per_subtree)
    full = cfg["schedule"]["max_steps"] * batch * manifest["seq_len"] * active
    record = {
        "doc_ids": docs["doc_id"].to_pylist(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sequences": mn["sequences"],
        "replayed_sequences": replayed,
        "from_level": args.from_level,
        "epochs": epochs,
        "steps": steps,
        "warmup_steps": warmup,
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
    p.add_argument("--epochs", type=float, default=None, help="passes over the new (and replayed) sequences")
    p.add_argument("--from-level", type=int, default=0, help="the first level whose blocks train (default: the leaf)")
    p.add_argument(
        "--replay", type=float, default=1.0, help="RUN's sequences of the same leaves per new sequence (default 1)"
    )
    args = p.parse_args(argv)

    def summary(r: dict) -> str:
        return (
            f"learned {len(r['doc_ids'])} documents: {r['steps']} steps ({r['epochs']:.1f} epochs) on "
            f"{len(r['blocks'])} blocks, {r['tokens_trained']:,} tokens = {r['share_of_full']:.1%} of the "
            f"memory's training, {r['seconds']} s; new run {args.out}/run, new model {args.out}/export"
        )

    def work() -> list[dict]:
        resolve_from_level(args)
        if args.replay < 0:
            raise ValueError(f"--replay {args.replay}: a number of sequences per new one, >= 0")
        return [learn(args)]

    return respond(work, args.json, summary)


if __name__ == "__main__":
    sys.exit(main())
