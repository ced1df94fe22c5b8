"""Forget and learn on the long-tail corpus: deletion requests as they arrive, and new facts, via the real CLIs.

Per seed (OUT/seedN; stages resume as in bench/longtail.py):
  corpus   jobs/build_longtail.py (configs/longtail/corpus.yaml)
  split    ``--never`` rare entities (1-3 documents) leave the corpus altogether: their probes measure the
           accuracy on facts the model never read. The anchor's corpus is the news plus the facts of entities
           with >= 4 documents, so no rare entity is in the anchor: only the memory reads one, and deleting
           it can be exact. ``--requests`` other rare entities are the deletion requests.
  cluster  the memory corpus -> run; the anchor corpus routed into run's tree (--tree: one tokenizer) -> arun
  train    the anchor (configs/longtail/anchor.yaml, one epoch of arun, anchor_only); the memory
           (configs/forget/memory.yaml: memory_only on the frozen anchor, data.isolated, ``--epochs``
           passes over the median level-1 subtree's sequences: each subtree trains as many steps, and the
           news, long articles, fills one subtree with several times the sequences of a facts subtree):
  index    jobs/build_index.py on run; evaluate the original model (train.evaluate)
  control  the memory trained again with another data order (data.seed + 1000; the same init): the full
           training each request is measured against, timed in this invocation just before the requests,
           and the noise of retraining, since an exact forget's retrained subtree sees its sequences in
           another order too
  rebuild  the rest of the full exact rebuild a forget replaces, timed: the job re-packs every subtree (frozen tree,
           stored embeddings, as a forget re-packs its own) and the document index is rebuilt. A request's time
           is reported twice: its retraining against the full training (the control), and the whole forget against
           the whole rebuild (re-pack + training + index)
  requests each on its own, as requests arrive, on the original model: python -m hmem.forget (exact), evaluate
  batch    all requests in one hmem.forget, exact and (for comparison) reset; evaluate
  learn    the batch's model learns the requests' documents back (python -m hmem.learn, ``--epochs`` passes
           over them as the memory had over the median subtree); evaluate

    python -m bench.forget [--out runs/forget] [--seeds 0 1 2] [--requests 20] [--never 40] [--epochs 3]

Then OUT/results.md and OUT/results.json: per seed and pooled, forgotten entities' accuracy before / after
against never-seen entities', the other entities' accuracy by subtree (same / other) and the probes whose
answer changed, held-out perplexity, tokens and seconds against the full memory training; the learn table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds

from bench.longtail import (
    CONFIGS,
    Stages,
    cluster_cmd,
    cluster_stage,
    corpus_stage,
    index_stage,
    mean,
    pct,
    train_stage,
)
from corpora.bbc import write_jsonl
from hmem.forget import remaining_input, repack_command
from index.router import leaf_paths
from index.rundir import read_manifest
from index.tree import path_block_ids
from train.evaluate import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEMORY = os.path.join(ROOT, "configs", "forget", "memory.yaml")
RARE = 3  # an entity with at most this many documents is rare: the anchor never reads it
BATCH = 16  # configs/longtail/anchor.yaml and configs/forget/memory.yaml


def split(data: str, out: str, seed: int, never: int, requests: int) -> dict:
    """memory.jsonl, anchor.jsonl, probes.jsonl (all entities, the never-seen ones included) and split.json."""
    rows = read_jsonl(f"{data}/train.jsonl", ("id", "text"))
    probes = read_jsonl(f"{data}/probes.jsonl", ("prompt", "answer", "entity", "frequency"))
    freq = {p["entity"]: p["frequency"] for p in probes}
    rare = sorted(e for e, f in freq.items() if f <= RARE)
    rng = random.Random(f"forget-{seed}")
    if never + requests > len(rare):
        raise SystemExit(f"--never {never} + --requests {requests} > the corpus's {len(rare)} rare entities")
    drawn = rng.sample(rare, never + requests)
    gone, asked = set(drawn[:never]), drawn[never:]
    memory = [{"id": r["id"], "text": r["text"]} for r in rows if r["entity"] not in gone]
    anchor = [{"id": r["id"], "text": r["text"]} for r in rows if r["entity"] is None or freq[r["entity"]] > RARE]
    write_jsonl(f"{out}/memory.jsonl", memory)
    write_jsonl(f"{out}/anchor.jsonl", anchor)
    write_jsonl(f"{out}/probes.jsonl", probes)
    docs = {e: [r["id"] for r in rows if r["entity"] == e] for e in asked}
    for i, e in enumerate(asked):
        with open(f"{out}/request{i:02d}.ids", "w") as f:
            f.write("\n".join(docs[e]) + "\n")
    with open(f"{out}/batch.ids", "w") as f:
        f.write("\n".join(d for e in asked for d in docs[e]) + "\n")
    text = {r["id"]: r["text"] for r in rows}
    write_jsonl(f"{out}/learn.jsonl", [{"id": d, "text": text[d]} for e in asked for d in docs[e]])
    info = {"never": sorted(gone), "requests": asked, "memory_documents": len(memory), "anchor_documents": len(anchor)}
    with open(f"{out}/split.json", "w") as f:
        json.dump(info, f, indent=1)
    return info


def entity_subtrees(run: str, probes: list[dict]) -> dict[str, set[int]]:
    """entity -> the level-1 subtrees its documents are routed to in ``run``."""
    t = ds.dataset(os.path.join(run, "routed"), format="parquet", partitioning="hive").to_table(
        columns=["doc_id", "l1"]
    )
    l1 = dict(zip(t["doc_id"].to_pylist(), t["l1"].to_pylist()))
    return {p["entity"]: {l1[d] for d in p["doc_ids"] if d in l1} for p in probes}


def evaluate(st: Stages, name: str, export: str, run: str, d: str, after: list[str]) -> dict:
    ev = os.path.join(d, "eval", f"{name}.json")
    os.makedirs(os.path.dirname(ev), exist_ok=True)
    cmd = [sys.executable, "-m", "train.evaluate", "--model", export, "--run", run]
    cmd += ["--probes", f"{d}/probes.jsonl", "--heldout", f"{d}/data/heldout.jsonl", "--out", ev]
    st.run(f"evaluate {name}", cmd, ev, f"{d}/logs/evaluate_{name}.log", after=after)
    with open(ev) as f:
        return json.load(f)


def correct(ev: dict) -> dict[tuple[str, str], bool]:
    """(entity, fact) -> whether the routed model answered right."""
    return {(r["entity"], r["fact"]): r["fetched"] for r in ev["probes"]["records"]}


def accuracy(c: dict, entities) -> tuple[float | None, int]:
    xs = [v for (e, _), v in c.items() if e in entities]
    return (float(np.mean(xs)) if xs else None), len(xs)


def compare(before: dict, after: dict, forgotten: set[str], subtrees: set[int], where: dict, never: set[str]) -> dict:
    """What a forget changed: the forgotten entities, the rest split by whether they share a subtree."""
    b, a = correct(before), correct(after)
    rest = [e for e in where if e not in forgotten and e not in never]
    same = {e for e in rest if where[e] & subtrees}
    other = set(rest) - same
    out = {"forgotten_before": accuracy(b, forgotten)[0]}
    out["forgotten_after"], out["forgotten_probes"] = accuracy(a, forgotten)
    for key, group in (("same", same), ("other", other)):
        out[f"{key}_before"], out[f"{key}_probes"] = accuracy(b, group)
        out[f"{key}_after"] = accuracy(a, group)[0]
        out[f"{key}_changed"] = sum(b[k] != a[k] for k in b if k[0] in group)
    out["ppl_before"] = before["perplexity"]["fetched"]["all"]
    out["ppl_after"] = after["perplexity"]["fetched"]["all"]
    return out


def run_seed(out: str, seed: int, args) -> dict:
    d = os.path.join(out, f"seed{seed}")
    data, run, arun, logs = (os.path.join(d, x) for x in ("data", "run", "arun", "logs"))
    os.makedirs(logs, exist_ok=True)
    st = Stages(d, args.cores, args.force)
    timings_path = os.path.join(d, "timings.json")
    timings = {}
    if os.path.exists(timings_path):
        with open(timings_path) as f:
            timings = json.load(f)
    corpus_stage(st, data, seed, f"{CONFIGS}/corpus.yaml", logs)
    info = split(data, d, seed, args.never, args.requests)
    cluster_stage(st, "cluster", [f"{d}/memory.jsonl"], run, seed, logs)
    st.run(
        "cluster anchor",
        cluster_cmd([f"{d}/anchor.jsonl"], arun, seed, args.cores, "--tree", run),
        os.path.join(arun, "manifest.json"),
        f"{logs}/cluster_anchor.log",
        files=[f"{d}/anchor.jsonl"],
        after=["cluster"],
        clear=arun,
    )
    anchor = os.path.join(d, "models", "anchor")
    steps = -(-read_manifest(arun)["sequences"] // BATCH)
    train_stage(st, "anchor", f"{CONFIGS}/anchor.yaml", arun, anchor, steps, seed, logs, ["cluster anchor"])
    m = read_manifest(run)
    subtrees = [s for s, n in enumerate(m["levels"][0]["node_documents"]) if n]
    mem_steps = int(np.ceil(args.epochs * np.median(subtree_sequences(run)) / BATCH))
    mdir = os.path.join(d, "models", "memory")
    init = f"recipe.init_anchor={anchor}/export"
    train_stage(st, "memory", MEMORY, run, mdir, mem_steps, seed, logs, ["train anchor"], init)
    index_stage(st, "index", run, f"{logs}/index.log", ["cluster"])
    export = os.path.join(mdir, "export")
    original = evaluate(st, "original", export, run, d, ["train memory", "index"])
    cdir = os.path.join(d, "models", "control")
    train_stage(
        st, "control", MEMORY, run, cdir, mem_steps, seed, logs, ["train memory"], init, f"data.seed={seed + 1000}"
    )
    control = evaluate(st, "control", os.path.join(cdir, "export"), run, d, ["train control", "index"])
    timings["rebuild input"] = rebuild_stage(st, run, subtrees, d, logs, args.cores)
    timings.update({k: v for k, v in st.timings.items() if k.startswith(("train", "rebuild"))})
    with open(timings_path, "w") as f:
        json.dump(timings, f, indent=1)
    probes = read_jsonl(f"{d}/probes.jsonl", ("entity", "doc_ids"))
    where = entity_subtrees(run, probes)
    never = set(info["never"])
    result = {
        "seed": seed,
        "split": {k: v for k, v in info.items() if k != "never"},
        "never_seen": accuracy(correct(original), never),
        "original": {k: original["probes"]["accuracy"][k] for k in ("fetched", "blocked", "none")},
        "memory_steps": mem_steps,
        "control": {
            s: compare(original, control, set(), {s}, where, never) for s in sorted(set().union(*where.values()))
        },
        "active_subtrees": len(subtrees),
        "requests": [],
    }

    def forget(name: str, ids: str, extra: tuple[str, ...] = ()) -> tuple[dict, dict]:
        o = os.path.join(d, name)
        cmd = [sys.executable, "-m", "hmem.forget", "--run", run, "--model", export, "--out", o]
        cmd += ["--master", f"local[{args.cores}]", "--ids-file", ids, "--json", *extra]
        st.run(
            f"forget {name}",
            cmd,
            os.path.join(o, "forget.json"),
            f"{logs}/forget_{name}.log",
            files=[ids],
            after=["train memory", "index"],
            clear=o,
        )
        with open(os.path.join(o, "forget.json")) as f:
            rec = json.load(f)
        return rec, evaluate(st, name, os.path.join(o, "export"), os.path.join(o, "run"), d, [f"forget {name}"])

    full_seconds = timings["train control"]  # the full memory training, just before the requests
    rebuild = full_seconds + sum(timings[f"rebuild {x}"] for x in ("input", "pack", "index"))
    for i, entity in enumerate(info["requests"]):
        rec, ev = forget(f"request{i:02d}", f"{d}/request{i:02d}.ids")
        row = {"entity": entity, "documents": len(rec["doc_ids"]), "subtrees": rec["subtrees"]}
        row.update(compare(original, ev, {entity}, set(rec["subtrees"]), where, never))
        noise = compare(original, control, {entity}, set(rec["subtrees"]), where, never)
        row["same_control"] = None if noise["same_before"] is None else noise["same_after"] - noise["same_before"]
        row.update(token_share=rec["share_of_full"], seconds=rec["seconds"], retrain_seconds=rec["retrain_seconds"])
        row["retrain_share"] = rec["retrain_seconds"] / full_seconds
        row["time_share"] = rec["seconds"] / rebuild
        result["requests"].append(row)
    asked, evals = set(info["requests"]), {}
    for name, extra in (("batch", ()), ("batch_reset", ("--mode", "reset"))):
        rec, evals[name] = forget(name, f"{d}/batch.ids", extra)
        result[name] = compare(original, evals[name], asked, set(rec["subtrees"]), where, never)
        result[name].update(subtrees=rec["subtrees"], token_share=rec["share_of_full"], seconds=rec["seconds"])
        result[name]["retrain_share"] = rec.get("retrain_seconds", 0.0) / full_seconds
        result[name]["time_share"] = rec["seconds"] / rebuild
    o = os.path.join(d, "learn")
    cmd = [sys.executable, "-m", "hmem.learn", "--run", f"{d}/batch/run", "--model", f"{d}/batch/export"]
    cmd += ["--out", o, "--master", f"local[{args.cores}]", "--epochs", str(args.epochs), "--json", f"{d}/learn.jsonl"]
    st.run("learn", cmd, os.path.join(o, "learn.json"), f"{logs}/learn.log", after=["forget batch"], clear=o)
    with open(os.path.join(o, "learn.json")) as f:
        lrec = json.load(f)
    lev = evaluate(st, "learn", os.path.join(o, "export"), os.path.join(o, "run"), d, ["learn"])
    touched = trained_leaves(lrec["blocks"], m["k"], m["depth"])
    result["learn"] = learned(original, evals["batch"], lev, asked, never, touched)
    result["learn"].update(token_share=lrec["share_of_full"], seconds=lrec["seconds"], epochs=lrec["epochs"])
    result["learn"].update(retrain_share=lrec["train_seconds"] / full_seconds, time_share=lrec["seconds"] / rebuild)
    result["full_memory_seconds"], result["full_rebuild_seconds"] = full_seconds, rebuild
    result["original_memory_seconds"] = timings.get("train memory")
    return result


def rebuild_stage(st: Stages, run: str, subtrees: list[int], d: str, logs: str, cores: int) -> float:
    """The full rebuild's re-pack of ``subtrees`` (all that hold documents) and its document index (stages
    "rebuild pack", "rebuild index"); returns the seconds that writing the job's input took, which a forget spends
    too."""
    o = os.path.join(d, "rebuild")
    os.makedirs(o, exist_ok=True)
    t = time.time()
    src = remaining_input(run, subtrees, set(), os.path.join(o, "input"))
    seconds = round(time.time() - t, 1)
    new = os.path.join(o, "run")
    cmd = repack_command(run, list(src.values()), new, f"local[{cores}]", stored=True, passes=list(src))
    done = os.path.join(new, "manifest.json")
    st.run(
        "rebuild pack", cmd, done, f"{logs}/rebuild_pack.log", files=list(src.values()), after=["cluster"], clear=new
    )
    index_stage(st, "rebuild index", new, f"{logs}/rebuild_index.log", ["rebuild pack"])
    return seconds


def subtree_sequences(run: str) -> list[int]:
    """Sequences per non-empty level-1 subtree of ``run``'s shards."""
    t = ds.dataset(os.path.join(run, "shards"), format="parquet", partitioning="hive").to_table(columns=["l1"])
    return [int(n) for n in pc.value_counts(t["l1"]).field("counts").to_pylist()]


def trained_leaves(blocks: list[int], k: int, depth: int) -> set[int]:
    """The leaves (local indices) whose path holds a block of ``blocks``: the prompts a learn can change."""
    leaves = np.arange(k**depth)
    on_path = np.isin(path_block_ids(leaf_paths(leaves, k, depth), k), blocks).any(axis=1)
    return set(leaves[on_path].tolist())


def learned(original: dict, forgot: dict, after: dict, asked: set[str], never: set[str], touched: set[int]) -> dict:
    """The requests' entities learnt back (accuracy against the original model, which read them in its corpus),
    and every other probe before and after: in all, and split by whether its routed leaf's path holds a learned
    block (``touched`` leaves: it can change) or not (its logits are the batch model's, bit for bit)."""
    o, f, a = correct(original), correct(forgot), correct(after)
    leaf = {(r["entity"], r["fact"]): r["leaf"] for r in after["probes"]["records"]}
    rest = [k for k in a if k[0] not in asked and k[0] not in never]
    out = {
        "asked_original": accuracy(o, asked)[0],
        "asked_forgotten": accuracy(f, asked)[0],
        "asked_learned": accuracy(a, asked)[0],
        "asked_probes": accuracy(a, asked)[1],
    }
    groups = {
        "rest": rest,
        "touched": [k for k in rest if leaf[k] in touched],
        "untouched": [k for k in rest if leaf[k] not in touched],
    }
    for name, group in groups.items():
        out[f"{name}_before"] = mean(float(f[k]) for k in group)
        out[f"{name}_after"] = mean(float(a[k]) for k in group)
        out[f"{name}_changed"], out[f"{name}_probes"] = sum(f[k] != a[k] for k in group), len(group)
    out["ratio"] = out["asked_learned"] / out["asked_original"] if out["asked_original"] else None
    return out


def summary(r: dict) -> dict:
    """One seed's requests in figures: pooled accuracies, the same-subtree change, costs (medians)."""
    reqs = r["requests"]
    n = np.array([q["forgotten_probes"] for q in reqs])

    def pooled(key: str) -> float:
        return float(np.sum(n * np.array([q[key] for q in reqs])) / n.sum())

    same = [q["same_after"] - q["same_before"] for q in reqs if q["same_probes"]]
    control = [q["same_control"] for q in reqs if q["same_control"] is not None]
    return {
        "never_seen": r["never_seen"][0],
        "control_change_mean": mean(control),
        "control_change_worst": min(control) if control else None,
        "forgotten_before": pooled("forgotten_before"),
        "forgotten_after": pooled("forgotten_after"),
        "same_change_mean": mean(same),
        "same_change_worst": min(same) if same else None,
        "other_changed": sum(q["other_changed"] for q in reqs),
        "other_probes": sum(q["other_probes"] for q in reqs),
        "ppl_before": reqs[0]["ppl_before"],
        "ppl_after_mean": mean(q["ppl_after"] for q in reqs),
        "token_share_median": float(np.median([q["token_share"] for q in reqs])),
        "time_share_median": float(np.median([q["time_share"] for q in reqs])),
        "retrain_share_median": float(np.median([q["retrain_share"] for q in reqs])),
        "seconds_median": float(np.median([q["seconds"] for q in reqs])),
        "retrain_seconds_median": float(np.median([q["retrain_seconds"] for q in reqs])),
    }


def points(x) -> str:
    return "-" if x is None else f"{100 * x:+.1f}"


def markdown(per_seed: list[dict]) -> str:
    lines = ["# Forget and learn on the long-tail corpus (bench/forget.py)", ""]
    sums = [summary(r) for r in per_seed]
    lines += [
        "## Deletion requests, each on its own (accuracy %, routed; medians of the cost)",
        "",
        "| seed | never-seen | forgotten before | forgotten after | same subtree change (mean / worst) "
        "| same subtree, control (mean / worst) "
        "| other subtrees: probes changed | ppl before / after | tokens retrained | time: retrain / training "
        "| time: forget / rebuild | forget s (retrain s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, s in zip(per_seed, sums):
        lines.append(
            f"| {r['seed']} | {pct(s['never_seen'])} | {pct(s['forgotten_before'])} | {pct(s['forgotten_after'])} "
            f"| {points(s['same_change_mean'])} / {points(s['same_change_worst'])} "
            f"| {points(s['control_change_mean'])} / {points(s['control_change_worst'])} "
            f"| {s['other_changed']} of {s['other_probes']} | {s['ppl_before']:.2f} / {s['ppl_after_mean']:.2f} "
            f"| {s['token_share_median']:.1%} | {s['retrain_share_median']:.1%} of {r['full_memory_seconds']:.0f} s "
            f"| {s['time_share_median']:.1%} of {r['full_rebuild_seconds']:.0f} s "
            f"| {s['seconds_median']:.0f} ({s['retrain_seconds_median']:.0f}) |"
        )
    if len(sums) > 1:
        m = {k: mean(s[k] for s in sums) for k in ("never_seen", "forgotten_before", "forgotten_after")}
        lines.append(
            f"| mean | {pct(m['never_seen'])} | {pct(m['forgotten_before'])} | {pct(m['forgotten_after'])} "
            f"| {points(mean(s['same_change_mean'] for s in sums))} "
            f"| {points(mean(s['control_change_mean'] for s in sums))} | {sum(s['other_changed'] for s in sums)} "
            f"| | {mean(s['token_share_median'] for s in sums):.1%} "
            f"| {mean(s['retrain_share_median'] for s in sums):.1%} "
            f"| {mean(s['time_share_median'] for s in sums):.1%} | |"
        )
    lines += [
        "",
        "## All requests at once",
        "",
        "| seed | mode | subtrees | forgotten before | after | same subtree change | other subtrees: probes changed "
        "| ppl after | tokens retrained | time: retrain / training | time: forget / rebuild |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, mode in ((r, m) for r in per_seed for m in ("batch", "batch_reset") if m in r):
        b = r[mode]
        lines.append(
            f"| {r['seed']} | {'exact' if mode == 'batch' else 'reset (leaf blocks)'} | {len(b['subtrees'])} "
            f"| {pct(b['forgotten_before'])} | {pct(b['forgotten_after'])} "
            f"| {points(None if b['same_before'] is None else b['same_after'] - b['same_before'])} "
            f"| {b['other_changed']} of {b['other_probes']} | {b['ppl_after']:.2f} | {b['token_share']:.1%} "
            f"| {b['retrain_share']:.1%} | {b['time_share']:.1%} |"
        )
    lines += [
        "",
        "## learn: the batch's model learns the requests' documents back",
        "",
        "| seed | original (in the corpus) | forgotten | learned | learned / original "
        "| other probes in learned leaves: before / after (changed) | other probes elsewhere: changed | tokens "
        "| time: training / training "
        "| time: learn / rebuild |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in per_seed:
        x = r["learn"]
        ratio = "-" if x["ratio"] is None else f"{x['ratio']:.2f}"
        lines.append(
            f"| {r['seed']} | {pct(x['asked_original'])} | {pct(x['asked_forgotten'])} | {pct(x['asked_learned'])} "
            f"| {ratio} | {pct(x['touched_before'])} / {pct(x['touched_after'])} ({x['touched_changed']} of "
            f"{x['touched_probes']}) | {x['untouched_changed']} of {x['untouched_probes']} | {x['token_share']:.1%} "
            f"| {x['retrain_share']:.1%} | {x['time_share']:.1%} |"
        )
    lines += ["", "## Requests", ""]
    lines += [
        "| seed | entity | docs | subtree | before | after | same subtree change | control | other changed | tokens "
        "| time: retrain / training | time: forget / rebuild |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in per_seed:
        for q in r["requests"]:
            same = None if q["same_before"] is None else q["same_after"] - q["same_before"]
            lines.append(
                f"| {r['seed']} | {q['entity']} | {q['documents']} | {q['subtrees']} | {pct(q['forgotten_before'])} "
                f"| {pct(q['forgotten_after'])} | {points(same)} | {points(q['same_control'])} | {q['other_changed']} "
                f"| {q['token_share']:.1%} | {q['retrain_share']:.1%} | {q['time_share']:.1%} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/forget")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--requests", type=int, default=20, help="deletion requests (rare entities) per seed")
    ap.add_argument("--never", type=int, default=40, help="rare entities kept out of the corpus")
    ap.add_argument("--epochs", type=float, default=3.0, help="memory passes over the median subtree")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="rerun every stage")
    args = ap.parse_args(argv)
    per_seed = []
    for seed in args.seeds:
        per_seed.append(run_seed(args.out, seed, args))
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"args": vars(args), "seeds": per_seed, "summary": [summary(r) for r in per_seed]}, f, indent=1)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(markdown(per_seed))
        s = summary(per_seed[-1])
        print(
            f"seed {seed}: forgotten {pct(s['forgotten_before'])} -> {pct(s['forgotten_after'])}% "
            f"(never seen {pct(s['never_seen'])}%), same subtree {points(s['same_change_mean'])}, other subtrees "
            f"{s['other_changed']} probes changed, median cost {s['token_share_median']:.1%} of the tokens and "
            f"{s['retrain_share_median']:.1%} of the training time ({s['time_share_median']:.1%} end to end against a "
            "full rebuild)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
