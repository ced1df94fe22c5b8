"""Two-rank DeepSpeed benchmarks: the launcher (2 CPU ranks on gloo, a free port, the result file printed) and a
timed step."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from train.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "TORCH_EXTENSIONS_DIR": os.path.join(ROOT, ".cache", "torch_extensions"), "OMP_NUM_THREADS": "1"}


def deepspeed_cmd(nproc: int = 2) -> list[str]:
    return [
        os.path.join(os.path.dirname(sys.executable), "deepspeed"),
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(free_port()),
    ]


def run(cmd: list[str]) -> None:
    """Run a launcher command from the repository root; a failure ends the benchmark with the ranks' output."""
    p = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"benchmark failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def add_worker_args(ap: argparse.ArgumentParser) -> None:
    """The hidden options by which a benchmark script runs as one of the ranks that run_worker starts."""
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # from the deepspeed launcher


def run_worker(module: str, args: list[str], out: str) -> None:
    """``python -m MODULE --worker ARGS --out OUT`` on 2 ranks; prints the OUT/result.txt that rank 0 wrote."""
    run(deepspeed_cmd() + ["--module", module, "--worker", *args, "--out", out])
    with open(os.path.join(out, "result.txt")) as f:
        print(f.read(), end="")


def timed_step(trainer) -> tuple[float, float]:
    """One training step on every rank: its wall seconds, and the slowest rank's CPU seconds."""
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train_step()
    slowest = torch.tensor([time.process_time() - c0], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # also ends the step when the slowest rank is done
    return time.perf_counter() - t0, float(slowest)
