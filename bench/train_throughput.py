"""Trainer throughput on 2 CPU ranks: anchor alone vs anchor + memory, and a ~12x larger bank.

Three runs of train/main.py under the deepspeed launcher (gloo), same run directory, same seed,
hence the same batches:
  anchor   recipe anchor_only (the dense baseline)
  memory   co-training with FFN-memory ranks (144, 16, 8): 168 units fetched per sequence,
           ~10% of the demo anchor's parameters, from a bank of 6,272 units (k=8, depth=3)
  memory_big  ranks (8, 16, 144): the same 168 units fetched, a bank of 74,816 units (11.9x)
tokens/s is read from the trainer's metrics.jsonl, windows after warm-up only. The three runs are
repeated in interleaved rounds and each keeps its best round, so that load from other processes
on a shared machine (which only ever slows a run down) drifts less into the comparison.
Prints per-run figures, the step-time change with the larger bank, and last `ratio X`
(memory tokens/s / anchor tokens/s).

    python bench/train_throughput.py [--data runs/demo] [--steps 20] [--warmup 5] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {
    "anchor": ["recipe.name=anchor_only"],
    "memory": ["memory.ranks=[144,16,8]"],
    "memory_big": ["memory.ranks=[8,16,144]"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(name: str, data: str, out: str, steps: int, warmup: int, log_every: int) -> dict:
    sets = RUNS[name] + [f"schedule.max_steps={steps}", f"schedule.log_every={log_every}",
                         "schedule.checkpoint_every=0", "schedule.save=false"]
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "train", "main.py"), "--data", data, "--out", out, "--no-resume"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.path.join(ROOT, ".cache", "torch_extensions")}
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{name} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        windows = [m for m in map(json.loads, f) if m["step"] > warmup]
    # windows of equal token counts: the overall rate is the harmonic mean of the window rates
    rate = len(windows) / sum(1.0 / m["tokens_per_s"] for m in windows)
    return {"tokens_per_s": rate, "blocks_per_step": windows[-1]["blocks_touched_per_step"],
            "bank_bytes": windows[-1]["bank_bytes_resident"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(ROOT, "runs", "demo"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5, help="steps excluded from the measurement")
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if (args.steps - args.warmup) % args.log_every or args.warmup % args.log_every:
        sys.exit("--steps and --warmup must be multiples of --log-every")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name in RUNS:
                r = measure(name, args.data, os.path.join(tmp, f"{name}{round_}"), args.steps, args.warmup, args.log_every)
                print(f"round {round_} {name:11s} {r['tokens_per_s']:8.0f} tok/s  blocks/step {r['blocks_per_step']:5.1f}  "
                      f"bank+state {r['bank_bytes'] / 2**20:8.1f} MiB", flush=True)
                if name not in results or r["tokens_per_s"] > results[name]["tokens_per_s"]:
                    results[name] = r
    slower = results["memory"]["tokens_per_s"] / results["memory_big"]["tokens_per_s"] - 1
    print(f"step time with the {RUNS['memory_big'][0]} bank vs {RUNS['memory'][0]}: {slower * 100:+.1f}%")
    print(f"ratio {results['memory']['tokens_per_s'] / results['anchor']['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
