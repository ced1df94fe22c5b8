"""Trainer throughput on 2 CPU ranks: anchor alone vs anchor + memory, and a ~12x larger bank.

Three trainers (train/main.py's Trainer) live in the same 2 rank processes, started by the
deepspeed launcher (gloo), on the same run directory with the same seed:
  anchor      recipe anchor_only (the dense baseline)
  memory      co-training with FFN-memory ranks (144, 16, 8): 168 units fetched per sequence,
              ~10% of the demo anchor's parameters, from a bank of 6,272 units (k=8, depth=3)
  memory_big  ranks (8, 16, 144): the same 168 units fetched, a bank of 74,816 units (11.9x)
Their steps are interleaved (anchor, memory, memory_big, anchor, ...), so that load from other
processes on a shared machine hits the three alike instead of whichever ran last. Each step is
timed two ways: wall clock between barriers, and the CPU time of the slowest rank (process time,
one thread per rank). The headline figures use the median CPU time per step: it does not count
the time a rank waits for a core that another program holds, so it is what a dedicated machine
with one core per rank gives; the wall-clock medians are printed beside them. Prints the figures, the
step-time change with the larger bank, and last `ratio X` (memory tokens/s / anchor tokens/s).

    python -m bench.train_throughput [--data runs/demo] [--steps 30] [--warmup 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from bench.ds_launch import add_worker_args, run_worker, timed_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {
    "anchor": ["recipe.name=anchor_only"],
    "memory": ["memory.ranks=[144,16,8]"],
    "memory_big": ["memory.ranks=[8,16,144]"],
}


def worker(args) -> None:
    """Runs in each rank: build the three trainers, interleave their steps, report medians on rank 0."""
    from train.config import load_config
    from index.rundir import read_manifest
    from train.distributed import init, teardown
    from train.main import Trainer

    info = init()
    manifest = read_manifest(args.data)
    trainers = {}
    for name, sets in RUNS.items():
        cfg = load_config(
            args.config, sets + ["schedule.save=false", f"schedule.max_steps={args.steps + args.warmup}"], manifest
        )
        trainers[name] = Trainer(cfg, args.data, os.path.join(args.out, name), info, manifest, resume=False)
    wall = {name: [] for name in trainers}
    cpu = {name: [] for name in trainers}
    for step in range(args.warmup + args.steps):
        for name, trainer in trainers.items():
            w, c = timed_step(trainer)
            if step >= args.warmup:
                wall[name].append(w)
                cpu[name].append(c)
    if info.rank == 0:
        med = {name: statistics.median(t) for name, t in cpu.items()}
        lines = []
        for name, trainer in trainers.items():
            tokens = trainer.cfg.data.batch_size * int(manifest["seq_len"]) * info.world_size
            lines.append(
                f"{name:11s} {tokens / med[name]:8.0f} tok/s  step {med[name] * 1000:7.1f} ms CPU "
                f"(wall: {tokens / statistics.median(wall[name]):6.0f} tok/s, median of {len(cpu[name])} steps)  "
                f"bank+state per rank {trainer.bank_bytes() / 2**20:7.1f} MiB"
            )
        lines.append(
            f"step time with the {RUNS['memory_big'][0]} bank vs {RUNS['memory'][0]}: "
            f"{(med['memory_big'] / med['memory'] - 1) * 100:+.1f}%"
        )
        lines.append(f"ratio {med['anchor'] / med['memory']:.2f}")
        with open(os.path.join(args.out, "result.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    for trainer in trainers.values():
        trainer.close()
    teardown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(ROOT, "runs", "demo"))
    ap.add_argument("--config", default="demo", help="train config the three runs start from")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration first")
    add_worker_args(ap)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        run_worker(
            "bench.train_throughput",
            [
                "--data",
                os.path.abspath(args.data),
                "--config",
                args.config,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
            ],
            tmp,
        )


if __name__ == "__main__":
    main()
