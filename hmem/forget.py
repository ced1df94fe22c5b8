"""Forget documents: a run without them, and a model whose memory is as if it had never seen them.

    python -m hmem.forget --run RUN --model EXPORT --out OUT ID [ID ...]           # exact (the default)
    python -m hmem.forget --run RUN --model EXPORT --out OUT --query "TEXT" --top 2  # the nearest documents
    python -m hmem.forget --run RUN --model EXPORT --out OUT --mode reset [--from-level 2] ID ...

Writes OUT/run (RUN without the documents, the same frozen tree; its document index rebuilt without them),
OUT/export (the new model; meta.json ``forgotten`` records what went, how and at what cost) and
OUT/forget.json. Files the change does not touch are hard links into RUN and EXPORT.

``exact`` needs a model trained with ``data.isolated=true`` (recipe memory_only: the anchor never saw the
documents and each level-1 subtree's blocks are a function of that subtree's sequences alone). The
subtrees that held the documents are re-packed by the job with RUN's frozen tree and RUN's stored
embeddings (only their remaining documents go in; none is re-embedded, so none changes leaf), and their
blocks are retrained from their seeded init with the model's own training config; every other block is kept.
The result equals training from scratch, with the same tree, on the corpus without the documents
(tests/test_forget.py), at 1/(non-empty level-1 subtrees) of the memory training per subtree retrained.
What stays shaped by the documents is the tree: its centroids are means over a fit sample that may hold
their embeddings (forget.json says which were in the sample); and likewise the document index's PQ codebooks,
kept from RUN so that no other document's code, and no route that did not weigh the documents, changes.

``reset`` re-initialises the blocks on the documents' paths from ``--from-level`` down (default: the leaf)
and retrains nothing. It is approximate: those blocks also held the other documents of their nodes,
which forget.json counts; and with the cotrain recipe the anchor saw the documents too, in any mode.

Memory: the doc ids of the affected subtrees (one subtree is 1/k of the corpus) and one bank file at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch
import yaml

from hmem.cli import respond
from index.docindex import build_document_index
from index.rundir import read_manifest, write_manifest
from index.tree import Tree, level_offset
from train.export import read_meta, write_meta
from train.memory import MemoryConfig, TensorBlockStore, init_block

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
MODES = ("exact", "reset")


def link_tree(src: str, dst: str, ignore: tuple[str, ...] = ()) -> None:
    """``dst`` as a copy of ``src`` made of hard links (a copy where the filesystem has none), less the entries
    ``ignore`` names at its top."""
    skip = lambda d, names: [n for n in names if os.path.samefile(d, src) and n in ignore]  # noqa: E731
    shutil.copytree(src, dst, copy_function=_link, ignore=skip)


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def routed(run: str, filt=None, columns=("doc_id", "path", "leaf", "first_copy")) -> pa.Table:
    """Rows of RUN/routed/ (one per routed document), with the ``l1`` partition column. ``passes`` is 1 where a
    file predates the job's data mix (--passes)."""
    path = os.path.join(run, "routed")
    data = ds.dataset(path, format="parquet", partitioning="hive")
    if "passes" in columns and "passes" not in data.schema.names:
        data = ds.dataset(
            path, format="parquet", schema=data.schema.append(pa.field("passes", pa.int32())), partitioning="hive"
        )
    t = data.to_table(columns=[*columns, "l1"], filter=filt)
    if "passes" in columns:
        t = t.set_column(t.schema.get_field_index("passes"), "passes", pc.fill_null(t["passes"], 1))
    return t


def find_documents(run: str, ids: list[str]) -> pa.Table:
    """The routed rows of ``ids``; an id RUN never routed is a one-line error."""
    t = routed(run, pc.field("doc_id").isin(ids))
    missing = sorted(set(ids) - set(t["doc_id"].to_pylist()))
    if missing:
        raise ValueError(
            f"{run}/routed: {len(missing)} of the ids are not routed documents of this run, e.g. {missing[:3]} "
            "(ids as the job recorded them: hmem.query lists them as doc_id)"
        )
    return t


def query_documents(run: str, model: str, text: str, top: int) -> list[str]:
    """The ``top`` documents the query's neighbour vote weighs most (the documents its fact comes from)."""
    from train.evaluate import model_routing
    from index.router import Router

    router = Router.load(run, routing=model_routing(model, None))
    nbs = router.neighbours(router.embed([text]), top, texts=[text])[0]
    for nb in nbs:
        print(f"query picks {nb.doc_id} (leaf {nb.leaf}, similarity {nb.score:.3f}): {nb.preview!r}")
    return [nb.doc_id for nb in nbs]


def check_exact(meta: dict, run: str, manifest: dict) -> None:
    cfg = meta["train"]
    if cfg["recipe"]["name"] != "memory_only" or not cfg["data"].get("isolated"):
        raise ValueError(
            f"exact forgetting needs a model trained with data.isolated=true and recipe memory_only (this one: "
            f"recipe {cfg['recipe']['name']}, isolated {bool(cfg['data'].get('isolated'))}); use --mode reset"
        )
    if len(meta["runs"]) != 1 or os.path.abspath(meta["runs"][0]) != os.path.abspath(run):
        raise ValueError(f"the model was trained on {meta['runs']}: exact forgetting retrains on that one run only")


def remaining_input(run: str, subtrees: list[int], gone: set[str], stem: str) -> dict[int, str]:
    """The documents of ``subtrees`` less ``gone`` as the job's JSONL input (id, text): one file per number of
    passes they are packed (the run's data mix), ``stem``-p<n>.jsonl. Returns passes -> file."""
    rows = routed(run, pc.field("l1").isin(subtrees), ("doc_id", "passes"))
    passes = {d: n for d, n in zip(rows["doc_id"].to_pylist(), rows["passes"].to_pylist()) if d not in gone}
    files = {n: f"{stem}-p{n}.jsonl" for n in sorted(set(passes.values()))}
    outs = {n: open(f, "w") for n, f in files.items()}
    docs = ds.dataset(os.path.join(run, "documents"), format="parquet")
    written = 0
    try:
        for batch in docs.to_batches(columns=["doc_id", "text"], filter=pc.field("doc_id").isin(list(passes))):
            for d, t in zip(batch["doc_id"].to_pylist(), batch["text"].to_pylist()):
                outs[passes[d]].write(json.dumps({"id": d, "text": t}) + "\n")
                written += 1
    finally:
        for f in outs.values():
            f.close()
    if written != len(passes):
        raise ValueError(f"{run}/documents holds {written} of the {len(passes)} documents to re-pack")
    return files


def job_env(cores: int | None = None) -> dict:
    env = dict(os.environ)
    env.update(
        PYSPARK_PYTHON=sys.executable,
        PYSPARK_DRIVER_PYTHON=sys.executable,
        SPARK_LOCAL_IP=env.get("SPARK_LOCAL_IP", "127.0.0.1"),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p),
    )
    if cores:
        env["OMP_NUM_THREADS"] = str(cores)
    return env


def run_logged(cmd: list[str], log: str, what: str, env: dict) -> None:
    print(f"{what}: {' '.join(cmd)} (log {log})", file=sys.stderr, flush=True)
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode:
        with open(log) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"{what} failed (exit {p.returncode}); the end of {log}:\n{tail}")


def repack_command(
    run: str, src: list[str], out: str, master: str, id_column: str = "id", stored: bool = False, passes=()
) -> list[str]:
    """The job on ``src`` with RUN's frozen tree and RUN's job config: the same routes, packing and seq_ids.
    ``passes``: one per ``src`` (the data mix), else once each. ``stored``: RUN's documents keep RUN's embeddings
    (embeddings_from), so they keep RUN's routes exactly. Writes the job's config beside ``out``."""
    with open(os.path.join(run, "config.json")) as f:
        job = json.load(f)
    for key in ("input", "output", "tree", "tokenizer", "embeddings_from"):
        job.pop(key, None)
    job["id_column"], job["passes"] = id_column, list(passes)
    if stored:
        job["embeddings_from"] = os.path.abspath(run)
    conf = out + ".job.yaml"
    with open(conf, "w") as f:
        yaml.safe_dump(job, f)
    job_py = os.path.join(ROOT, "jobs", "cluster_corpus.py")
    cmd = [f"{BIN}/spark-submit", "--master", master, "--conf", "spark.driver.memory=2g", job_py, "--config", conf]
    return cmd + ["--tree", run, "--input", *src, "--output", out]


def repack(
    run: str, src: list[str], out: str, master: str, log: str, id_column: str = "id", stored: bool = False, passes=()
) -> dict:
    """``repack_command`` run (output to ``log``); returns the new run's manifest."""
    cmd = repack_command(run, src, out, master, id_column, stored, passes)
    run_logged(cmd, log, "re-pack", job_env())
    return read_manifest(out)


def check_routes(run: str, new: str, subtrees: list[int]) -> None:
    """Every re-packed document must land in the leaf RUN stored for it (the frozen tree, its stored embedding)."""
    old = routed(run, pc.field("l1").isin(subtrees), ("doc_id", "leaf"))
    fresh = routed(new, None, ("doc_id", "leaf"))
    stored = dict(zip(old["doc_id"].to_pylist(), old["leaf"].to_pylist()))
    moved = [d for d, lf in zip(fresh["doc_id"].to_pylist(), fresh["leaf"].to_pylist()) if stored.get(d) != lf]
    if moved:
        raise RuntimeError(
            f"{len(moved)} re-packed documents left their stored leaf (e.g. {moved[:3]}) although they kept RUN's "
            "embeddings: RUN's documents/ or routed/ changed since its job; forget with --mode reset"
        )


def train_yaml(meta: dict, path: str) -> None:
    """The model's own training config as a train/main.py --config file."""
    cfg = dict(meta["train"])
    model = cfg["model"]
    if model.get("hf"):
        cfg["model"] = {"hf": model["hf"]}
    else:
        skip = ("vocab_size", "hf", "hf_sha256")
        cfg["model"] = {"preset": cfg["model_preset"], **{k: v for k, v in model.items() if k not in skip}}
    cfg["memory"] = {k: v for k, v in cfg["memory"].items() if k not in ("k", "depth")}
    cfg.pop("model_preset", None)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)


def retrain(meta: dict, runs: list[str], out: str, log: str) -> float:
    """train/main.py with the model's config on ``runs`` (their other subtrees are empty); returns the seconds."""
    conf = out + ".train.yaml"
    train_yaml(meta, conf)
    cmd = [sys.executable, os.path.join(ROOT, "train", "main.py"), "--config", conf, "--data", *runs]
    cmd += ["--out", out, "--no-resume"]
    t0 = time.time()
    run_logged(cmd, log, "retrain", job_env(int(os.environ.get("OMP_NUM_THREADS", "0")) or None))
    return time.time() - t0


def subtree_blocks(k: int, depth: int, subtrees: list[int]) -> np.ndarray:
    """Global ids of the tree blocks under the level-1 nodes ``subtrees`` (generic blocks excluded)."""
    ids = []
    for level in range(1, depth + 1):
        width = k ** (level - 1)
        ids += [level_offset(level, k) + s * width + j for s in subtrees for j in range(width)]
    return np.array(sorted(ids), dtype=np.int64)


def path_blocks(k: int, paths: list[list[int]], from_level: int) -> np.ndarray:
    """Global ids of the blocks on ``paths`` at ``from_level`` and below."""
    ids = set()
    for p in paths:
        node = 0
        for level, i in enumerate(p, start=1):
            node = node * k + i
            if level >= from_level:
                ids.add(level_offset(level, k) + node)
    return np.array(sorted(ids), dtype=np.int64)


def write_bank(export: str, out: str, blocks: np.ndarray, source) -> None:
    """OUT/export: EXPORT with ``blocks`` replaced by ``source(level, ids)`` (one bank file at a time)."""
    os.makedirs(out)
    for name in os.listdir(export):
        if name not in ("bank", "meta.json") and os.path.isfile(os.path.join(export, name)):
            _link(os.path.join(export, name), os.path.join(out, name))
    os.makedirs(os.path.join(out, "bank"))
    for f in sorted(os.listdir(os.path.join(export, "bank"))):
        store = TensorBlockStore.load(os.path.join(export, "bank", f))
        for level, ids in store.ids.items():
            hit = ids[torch.isin(ids, torch.from_numpy(blocks))]
            if hit.numel():
                store.write(level, hit, source(level, hit))
        store.save(os.path.join(out, "bank", f))


def shard_totals(run: str, subtrees: list[int]) -> dict:
    """Sequences and valid tokens in RUN's shards of ``subtrees`` (one column read per file)."""
    seqs = valid = 0
    for s in subtrees:
        d = os.path.join(run, "shards", f"l1={s}")
        for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            if f.startswith(".") or not f.endswith(".parquet"):
                continue
            t = pq.read_table(os.path.join(d, f), columns=["n_valid"])
            seqs, valid = seqs + t.num_rows, valid + int(pc.sum(t["n_valid"]).as_py() or 0)
    return {"sequences": seqs, "valid_tokens": valid}


def merge_manifest(m: dict, new: dict, subtrees: list[int], old: dict, fresh: dict) -> dict:
    """RUN's manifest with the subtrees' counts replaced by the re-packed run's (``old`` / ``fresh``:
    subtree_counts before and after)."""
    out = json.loads(json.dumps(m))
    out.pop("checksums", None)  # they sum over the job's input, which this run no longer equals
    for key in ("documents_in", "documents_routed"):
        out[key] += fresh["documents"] - old["documents"]
    out["documents_distinct"] += fresh["distinct"] - old["distinct"]
    if "documents_packed" in out:  # runs from before the data mix have none
        out["documents_packed"] += fresh["packed"] - old["packed"]
    for key in ("sequences", "tokens", "valid_tokens"):
        out[key] += fresh[key] - old[key]
    for lv, lnew in zip(out["levels"], new["levels"]):
        width = len(lv["node_documents"]) // m["k"]
        for s in subtrees:
            for key in ("node_documents", "node_tokens"):
                lv[key][s * width : (s + 1) * width] = lnew[key][s * width : (s + 1) * width]
    return out


def subtree_counts(run: str, subtrees: list[int]) -> dict:
    """The subtrees' documents, distinct documents, packed documents (x passes), document tokens, sequences and
    valid tokens."""
    rows = routed(run, pc.field("l1").isin(subtrees), ("first_copy", "n_tokens", "passes"))
    distinct = int(pc.sum(rows["first_copy"].cast(pa.int64())).as_py() or 0)
    tokens = int(pc.sum(rows["n_tokens"]).as_py() or 0)
    packed = int(pc.sum(rows["passes"].cast(pa.int64())).as_py() or 0)
    counts = {"documents": rows.num_rows, "distinct": distinct, "packed": packed, "tokens": tokens}
    return {**counts, **shard_totals(run, subtrees)}


def build_run(run: str, new: str, out: str, subtrees: list[int], gone: set[str], record: dict) -> dict:
    """OUT/run: RUN's files for the untouched subtrees (hard links), the re-packed subtrees' shards and routes,
    RUN's documents less ``gone``, a manifest that counts it all, and a document index built without them (with
    RUN's PQ codebooks: the other documents keep their codes, so only a query that had them as neighbours can
    change route)."""
    os.makedirs(out)
    for name in ("config.json", "tokenizer.json"):
        if os.path.exists(os.path.join(run, name)):
            _link(os.path.join(run, name), os.path.join(out, name))
    link_tree(os.path.join(run, "tree"), os.path.join(out, "tree"))
    for part in ("shards", "routed"):
        os.makedirs(os.path.join(out, part))
        for d in sorted(os.listdir(os.path.join(run, part))):
            if not d.startswith("l1="):
                continue
            src = new if int(d[3:]) in subtrees else run
            if os.path.isdir(os.path.join(src, part, d)):
                link_tree(os.path.join(src, part, d), os.path.join(out, part, d))
    os.makedirs(os.path.join(out, "documents"))
    for f in sorted(os.listdir(os.path.join(run, "documents"))):
        src, dst = os.path.join(run, "documents", f), os.path.join(out, "documents", f)
        if f.startswith(".") or not f.endswith(".parquet"):
            continue
        t = pq.read_table(src, columns=["doc_id"])
        hit = pc.is_in(t["doc_id"], pa.array(sorted(gone)))
        if pc.any(hit).as_py():
            full = pq.read_table(src)
            pq.write_table(full.filter(pc.invert(hit)), dst)
        else:
            _link(src, dst)
    m = merge_manifest(
        read_manifest(run), read_manifest(new), subtrees, subtree_counts(run, subtrees), subtree_counts(new, subtrees)
    )
    m["forgotten"] = m.get("forgotten", []) + [record]
    m["derived_from"] = os.path.abspath(run)
    write_manifest(out, m)
    build_document_index(out, log=lambda s: print(s, file=sys.stderr), codebooks_from=run)
    return m


def fit_sample_report(run: str, paths: list[list[int]]) -> list[list[float]]:
    """Per document and level, the chance that its embedding was in the sample its parent's children were
    fitted on (pipeline/fit.py in_sample: 1.0 = it was): the tree is the one thing a forget keeps from them."""
    m, tree = read_manifest(run), Tree.load(os.path.join(run, "tree"))
    per_node = float(tree.config.get("sample_per_node", 0))
    out = []
    for p in paths:
        node, chances = 0, []
        for level in range(len(p)):
            size = m["documents_routed"] if level == 0 else m["levels"][level - 1]["node_documents"][node]
            chances.append(min(1.0, per_node / max(size, 1)))
            node = node * m["k"] + p[level]
        out.append(chances)
    return out


def others_in_blocks(m: dict, paths: list[list[int]], from_level: int) -> dict:
    """What else a reset removes: the other documents (and their tokens) of the reset nodes."""
    nodes: dict[tuple[int, int], int] = {}
    for p in paths:
        node = 0
        for level, i in enumerate(p, start=1):
            node = node * m["k"] + i
            if level >= from_level:
                nodes[(level, node)] = nodes.get((level, node), 0) + 1
    docs = sum(m["levels"][lv - 1]["node_documents"][n] - c for (lv, n), c in nodes.items())
    tokens = sum(m["levels"][lv - 1]["node_tokens"][n] for (lv, n) in nodes)
    return {"blocks": len(nodes), "other_documents": docs, "tokens_in_blocks": tokens}


def memory_source(meta: dict, args, trained: str | None, paths: list[list[int]], k: int, depth: int):
    """(blocks to replace, source(level, ids) of their new tensors): the retrained subtrees' blocks (exact),
    or the seeded init of the blocks on the paths (reset)."""
    if trained is not None:
        from train.lazy_store import LazyBlockStore

        bank = os.path.join(trained, "export", "bank")
        store = LazyBlockStore([os.path.join(bank, f) for f in sorted(os.listdir(bank))])
        return subtree_blocks(k, depth, sorted({p[0] for p in paths})), store.read
    mem = MemoryConfig(**meta["memory"])
    bank = os.path.join(args.model, "bank")
    shapes = TensorBlockStore.read_metadata(os.path.join(bank, sorted(os.listdir(bank))[0]))["shapes"]
    shapes = {int(lv): {n: tuple(x) for n, x in named.items()} for lv, named in json.loads(shapes).items()}

    def init(level: int, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        blocks = [init_block(mem, int(g), shapes[level]) for g in ids.tolist()]
        return {n: torch.stack([b[n] for b in blocks]) for n in shapes[level]}

    return path_blocks(k, paths, args.from_level), init


def forget(args) -> dict:
    meta, manifest = read_meta(args.model), read_manifest(args.run)
    if meta["tree_version"] != manifest["tree_version"]:
        raise ValueError(
            f"{args.model} was trained on tree {meta['tree_version']}, {args.run} has {manifest['tree_version']}"
        )
    if os.path.exists(args.out):
        raise ValueError(f"{args.out} exists; forget writes a new run and export there: give a new directory")
    ids = list(dict.fromkeys(args.ids or query_documents(args.run, args.model, args.query, args.top)))
    if not ids:
        raise ValueError("no documents to forget: give ids, or --query TEXT")
    if not manifest.get("ids"):
        raise ValueError(f"{args.run}: its document ids were derived from file rows, which a re-pack cannot reproduce")
    cfg = meta["train"]
    if args.mode == "exact":
        check_exact(meta, args.run, manifest)
    elif cfg["recipe"]["name"] != "memory_only":
        print(
            f"warning: recipe {cfg['recipe']['name']} trained the anchor on these documents too; a reset of their "
            "blocks leaves what the anchor learned from them",
            file=sys.stderr,
        )
    paths = find_documents(args.run, ids)["path"].to_pylist()
    subtrees = sorted({p[0] for p in paths})
    t0 = time.time()
    work = os.path.join(args.out, "work")
    os.makedirs(work)
    active = sum(1 for d in manifest["levels"][0]["node_documents"] if d)
    per_subtree = cfg["schedule"]["max_steps"] * cfg["data"]["batch_size"] * manifest["seq_len"]
    record = {
        "doc_ids": ids,
        "mode": args.mode,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "subtrees": subtrees,
        "paths": paths,
        "fit_sample": fit_sample_report(args.run, paths),
        "tokens_full_memory_training": per_subtree * active,
    }
    # the run loses the documents in either mode: the job re-packs their subtrees without them
    new = os.path.join(work, "repack")
    src = remaining_input(args.run, subtrees, set(ids), os.path.join(work, "input"))
    log = os.path.join(work, "repack.log")  # each document with its passes (the run's data mix; [1] packs as none)
    m = repack(args.run, list(src.values()), new, args.master, log, stored=True, passes=list(src))
    record["documents_repacked"] = m["documents_routed"]
    check_routes(args.run, new, subtrees)
    trained = None
    if args.mode == "exact":
        trained = os.path.join(work, "train")
        record["retrain_seconds"] = round(retrain(meta, [new], trained, os.path.join(work, "train.log")), 1)
        record["tokens_retrained"] = per_subtree * len(subtrees)
    else:
        record.update(
            from_level=args.from_level, tokens_retrained=0, reset=others_in_blocks(manifest, paths, args.from_level)
        )
    record["share_of_full"] = record["tokens_retrained"] / record["tokens_full_memory_training"]
    build_run(args.run, new, os.path.join(args.out, "run"), subtrees, set(ids), record)
    blocks, source = memory_source(meta, args, trained, paths, manifest["k"], manifest["depth"])
    return finish(args, meta, "forgotten", record, blocks, source, t0)


def finish(args, meta: dict, key: str, record: dict, blocks: np.ndarray, source, t0: float) -> dict:
    """OUT/export (EXPORT with ``blocks`` from ``source``, ``record`` appended to meta[``key``], the run OUT/run)
    and OUT/<command>.json."""
    write_bank(args.model, os.path.join(args.out, "export"), blocks, source)
    meta[key] = meta.get(key, []) + [record]
    meta["run_dir"] = os.path.abspath(os.path.join(args.out, "run"))
    meta["runs"] = [meta["run_dir"]]
    write_meta(os.path.join(args.out, "export"), meta)
    record["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(args.out, f"{args.command}.json"), "w") as f:
        json.dump(record, f, indent=2)
    return record


def resolve_from_level(args) -> None:
    """``--from-level``: 0 (the default) is the leaf level of RUN's tree; anything else must be one of its levels."""
    depth = read_manifest(args.run)["depth"]
    args.from_level = args.from_level or depth
    if not 1 <= args.from_level <= depth:
        raise ValueError(f"--from-level {args.from_level}: the tree has levels 1..{depth}")


def command_line(prog: str, doc: str, what: str) -> argparse.ArgumentParser:
    """The arguments hmem-forget and hmem-learn share."""
    p = argparse.ArgumentParser(prog=f"hmem-{prog}", description=doc.split("\n")[0])
    p.add_argument("--run", required=True, help="the run the model was trained on")
    p.add_argument("--model", required=True, help="the model's export directory")
    p.add_argument("--out", required=True, help=f"new directory: OUT/run, OUT/export, OUT/{prog}.json")
    p.add_argument("--master", default="local[*]", help=f"Spark master for the {what} (default local[*])")
    p.add_argument("--json", action="store_true", help="print the record as one JSON line")
    p.set_defaults(command=prog)
    return p


def main(argv: list[str] | None = None) -> int:
    p = command_line("forget", __doc__, "re-pack")
    p.add_argument("ids", nargs="*", help="doc ids to forget (as the job recorded them)")
    p.add_argument("--ids-file", help="one doc id per line")
    p.add_argument("--query", help="forget the documents this text's neighbour vote weighs most")
    p.add_argument("--top", type=int, default=1, help="with --query: how many documents (default 1)")
    p.add_argument("--mode", choices=MODES, default="exact")
    p.add_argument("--from-level", type=int, default=0, help="reset: first level to reset (default: the leaf)")
    args = p.parse_args(argv)
    if args.ids_file:
        with open(args.ids_file) as f:
            args.ids += [line.strip() for line in f if line.strip()]

    def work() -> list[dict]:
        resolve_from_level(args)
        return [forget(args)]

    def summary(r: dict) -> str:
        return (
            f"forgot {len(r['doc_ids'])} documents ({r['mode']}): subtrees {r['subtrees']}, "
            f"{r['tokens_retrained']:,} of {r['tokens_full_memory_training']:,} memory-training tokens "
            f"retrained ({r['share_of_full']:.1%}), {r['seconds']} s; new run {args.out}/run, "
            f"new model {args.out}/export"
        )

    return respond(work, args.json, summary)


if __name__ == "__main__":
    sys.exit(main())
