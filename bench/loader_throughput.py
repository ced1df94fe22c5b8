"""The streaming shard loader: peak RSS against the amount of shard data, and sequences/s against training.

Writes two synthetic run directories in the demo's shape (k=8, depth=3, seq_len=512, vocab 8192;
leaf-sorted shards, 2 files per level-1 node, row groups of --row-group sequences): BASE with
--sequences sequences and BIG with 8x as many. Then, in this one invocation:
  1. for BASE and BIG, a fresh process builds rank 0's loader of a 2-rank job (same shuffle buffer)
     and reads two full epochs in batches of 8; it reports its peak RSS (VmHWM), its RSS after the
     imports, and sequences/s;
  2. the demo training (configs/train/demo.yaml, 2 ranks under the deepspeed launcher, gloo) runs
     --train-steps steps on BASE; its sequences/s consumed = tokens/s (metrics.jsonl, windows after
     the first) / seq_len, summed over both ranks.
Prints the figures, then last: `rss growth X% loader/training Yx`.

    python -m bench.loader_throughput [--sequences 16384] [--buffer 4096] [--train-steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from index.rundir import SHARD_SCHEMA, read_manifest, write_manifest

K, DEPTH, SEQ_LEN, VOCAB = 8, 3, 512, 8192


def write_run(root: str, n_seq: int, row_group: int, seed: int = 0) -> None:
    """A run directory with random tokens; every leaf gets about n_seq / k^p sequences, leaf-sorted files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.fixtures import write_tokenizer

    rng = np.random.default_rng(seed)
    n_leaves = K**DEPTH
    per_leaf = np.bincount(rng.integers(0, n_leaves, n_seq), minlength=n_leaves)
    leaf_of = np.repeat(np.arange(n_leaves), per_leaf)  # sorted by leaf
    os.makedirs(root, exist_ok=True)
    write_tokenizer(os.path.join(root, "tokenizer.json"), 300)
    leaf_per_l1 = n_leaves // K
    for i1 in range(K):
        sel = np.flatnonzero(leaf_of // leaf_per_l1 == i1)
        d = os.path.join(root, "shards", f"l1={i1}")
        os.makedirs(d, exist_ok=True)
        for part, rows in enumerate(np.array_split(sel, 2)):
            with pq.ParquetWriter(os.path.join(d, f"part-{part:05d}.parquet"), SHARD_SCHEMA) as w:
                for lo in range(0, len(rows), row_group):
                    r = rows[lo : lo + row_group]
                    leaf = leaf_of[r]
                    paths = np.stack([(leaf // K ** (DEPTH - 1 - l)) % K for l in range(DEPTH)], 1).astype(np.int32)
                    toks = rng.integers(2, VOCAB, (len(r), SEQ_LEN + 1), dtype=np.int32)
                    n = len(r)
                    w.write_table(
                        pa.table(
                            {
                                "seq_id": pa.array(r.astype(np.int64)),
                                "path": pa.ListArray.from_arrays(
                                    np.arange(0, (n + 1) * DEPTH, DEPTH, dtype=np.int32), paths.ravel()
                                ),
                                "leaf": pa.array(leaf.astype(np.int64)),
                                "tokens": pa.ListArray.from_arrays(
                                    np.arange(0, (n + 1) * (SEQ_LEN + 1), SEQ_LEN + 1, dtype=np.int32), toks.ravel()
                                ),
                                "n_valid": pa.array(np.full(n, SEQ_LEN + 1, dtype=np.int32)),
                                "doc_ids": pa.array([[] for _ in range(n)], type=pa.list_(pa.string())),
                            },
                            schema=SHARD_SCHEMA,
                        ),
                        row_group_size=row_group,
                    )
    levels = []
    for l in range(1, DEPTH + 1):
        local = leaf_of // K ** (DEPTH - l)
        levels.append(
            {
                "level": l,
                "nodes": K**l,
                "max_child_fraction": 0.0,
                "node_documents": np.bincount(local, minlength=K**l).tolist(),
                "node_tokens": (np.bincount(local, minlength=K**l) * SEQ_LEN).tolist(),
            }
        )
    manifest = {
        "documents_in": n_seq,
        "documents_routed": n_seq,
        "documents_quarantined": 0,
        "tree_version": f"bench-{seed}",
        "k": K,
        "depth": DEPTH,
        "seq_len": SEQ_LEN,
        "vocab_size": VOCAB,
        "eot_id": 0,
        "pad_id": 1,
        "sequences": n_seq,
        "tokens": n_seq * SEQ_LEN,
        "levels": levels,
        "seed": seed,
        "config": {},
    }
    write_manifest(root, manifest)


def rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def child(run: str, buffer: int, epochs: int) -> None:
    """One loader (rank 0 of 2) reading ``epochs`` epochs; prints a JSON line."""
    from train.data import ShardLoader, assign_subtrees  # imports torch, as the trainer does

    base = rss_mb("VmRSS")
    ownership = assign_subtrees(read_manifest(run), 2)
    t0 = time.perf_counter()
    loader = ShardLoader(run, ownership, 0, batch_size=8, seed=0, p_generic=1 / 17, shuffle_buffer=buffer)
    n = 0
    while n < epochs * len(loader):
        n += len(loader.next_batch().seq_ids)
    dt = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "sequences": n,
                "seconds": dt,
                "seq_per_s": n / dt,
                "rss_after_imports_mb": base,
                "peak_rss_mb": rss_mb("VmHWM"),
                "rank_sequences": len(loader),
            }
        )
    )


def training_consumption(run: str, out: str, steps: int) -> float:
    """Sequences/s the demo training consumes over both ranks (deepspeed launcher, 2 CPU ranks)."""
    from bench import ds_launch  # not at the top: the --child process measures its RSS with the loader's imports only
    from tests.fixtures import trainer_args

    ds_launch.run(
        ds_launch.deepspeed_cmd()
        + trainer_args(
            run, out, f"schedule.max_steps={steps}", "schedule.save=false", "schedule.log_every=5", config="demo"
        )
    )
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rates = [m["tokens_per_s"] for m in map(json.loads, f)][1:]  # the first window holds start-up
    return float(np.mean(rates)) / SEQ_LEN


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=16384, help="sequences of BASE (BIG has 8x)")
    ap.add_argument("--buffer", type=int, default=4096, help="data.shuffle_buffer for both")
    ap.add_argument("--row-group", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.train_steps < 10:
        ap.error(
            "--train-steps must be >= 10: the training logs every 5 steps and the first window (start-up) is dropped"
        )
    if args.child:
        return child(args.child, args.buffer, args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for name, n in (("base", args.sequences), ("big", 8 * args.sequences)):
            run = os.path.join(tmp, name)
            write_run(run, n, args.row_group)
            p = subprocess.run(
                [sys.executable, __file__, "--child", run, "--buffer", str(args.buffer), "--epochs", str(args.epochs)],
                capture_output=True,
                text=True,
                check=True,
            )
            results[name] = json.loads(p.stdout.strip().splitlines()[-1])
            r = results[name]
            print(
                f"{name}: {n} sequences ({r['rank_sequences']} for rank 0 of 2), buffer {args.buffer}: "
                f"peak RSS {r['peak_rss_mb']:.0f} MB (after imports {r['rss_after_imports_mb']:.0f} MB), "
                f"{r['seq_per_s']:.0f} sequences/s over {args.epochs} epochs",
                flush=True,
            )
        consumed = training_consumption(os.path.join(tmp, "base"), os.path.join(tmp, "train"), args.train_steps)
    print(f"demo training (2 ranks, batch 8 each, seq_len {SEQ_LEN}) consumes {consumed:.1f} sequences/s")
    b, g = results["base"], results["big"]
    growth = 100 * (g["peak_rss_mb"] / b["peak_rss_mb"] - 1)
    above = (b["peak_rss_mb"] - b["rss_after_imports_mb"], g["peak_rss_mb"] - g["rss_after_imports_mb"])
    print(f"peak RSS above the imports: {above[0]:.0f} MB -> {above[1]:.0f} MB with 8x the data")
    print(f"load average {open('/proc/loadavg').read().split()[:3]}")
    print(f"rss growth {growth:+.1f}% loader/training {min(b['seq_per_s'], g['seq_per_s']) / consumed:.0f}x")


if __name__ == "__main__":
    main()
