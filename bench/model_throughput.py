"""Forward+backward throughput on CPU: the anchor alone vs the anchor plus FFN-memory.

The memory's fetched size is ``--fraction`` (default 10%) of the anchor's parameters (paper
accounting, 3*R*L*d), split over three levels in the ratio 4:2:1; every sequence of the batch has a
different leaf (so a different path), drawn afresh each step, and each memory step includes the
fetch from the in-memory bank. Steps alternate between the two models and the median step time of
each is reported. Last line: ``ratio X.XX`` = memory tokens/s / anchor tokens/s (wall clock).

One torch thread by default: on a shared 2-core box, OpenMP threads fighting other processes make
wall-clock numbers meaningless (seen: 5-6x slower and ratios swinging 0.7-0.9 run to run), while a
single thread measures the memory path's compute overhead. ``--threads 0`` uses torch's default.
The process CPU-time ratio is printed too, as a load-independent cross-check.

    python -m bench.model_throughput [--config tiny] [--batch 16] [--seq 256] [--steps 12]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from train.memory import MemoryBank, MemoryConfig, param_counts
from train.model import Anchor, load_model_config


def split_ranks(total: int, weights=(4, 2, 1)) -> tuple[int, ...]:
    ranks = [total * w // sum(weights) for w in weights]
    ranks[0] += total - sum(ranks)
    return tuple(ranks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=0.10, help="fetched memory / anchor parameters")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    cfg = load_model_config(args.config, max_seq_len=max(args.seq, 1))
    model = Anchor(cfg)
    unit = 3 * cfg.n_layers * cfg.d_model
    ranks = split_ranks(round(args.fraction * cfg.num_params() / unit))
    mcfg = MemoryConfig(kind="ffn", ranks=ranks, k=args.k)
    if args.batch > args.k**mcfg.depth:
        raise SystemExit(
            f"{args.batch} sequences need {args.batch} distinct leaves; k={args.k} has {args.k**mcfg.depth}"
        )
    bank = MemoryBank.create(mcfg, cfg)
    with torch.no_grad():  # a trained-looking bank, so the memory path is not multiplying zeros
        for l, named in bank.store.tensors.items():
            named["w_down"].normal_(0.0, 0.02)
    pc = param_counts(cfg, mcfg)
    g = torch.Generator().manual_seed(args.seed)
    n_leaves = args.k**mcfg.depth

    def batch():
        return torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)

    def step_anchor():
        model.zero_grad(set_to_none=True)
        model.loss(batch()).backward()

    def step_memory():
        model.zero_grad(set_to_none=True)
        leaves = torch.randperm(n_leaves, generator=g)[: args.batch]  # a different leaf per sequence
        paths = torch.stack([leaves // args.k ** (mcfg.depth - 1 - i) % args.k for i in range(mcfg.depth)], 1)
        fetched = bank.fetch(bank.block_ids(paths))
        model.loss(batch(), memory=fetched).backward()
        assert all(t.grad is not None for t in fetched.leaves())

    for _ in range(args.warmup):
        step_anchor()
        step_memory()
    times = {"anchor": [], "memory": []}
    cpu = {"anchor": [], "memory": []}
    for _ in range(args.steps):
        for name, fn in (("anchor", step_anchor), ("memory", step_memory)):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    tokens = args.batch * args.seq
    tps = {n: tokens / statistics.median(t) for n, t in times.items()}
    cpu_ratio = statistics.median(cpu["anchor"]) / statistics.median(cpu["memory"])
    print(
        f"config {args.config}: anchor {pc['anchor']:,} params; memory ranks {ranks} (k={args.k}), "
        f"fetched {pc['fetched']:,} = {pc['fetched'] / pc['anchor']:.1%} of the anchor; "
        f"batch {args.batch} x {args.seq}, threads {torch.get_num_threads()}"
    )
    print(f"anchor alone    {tps['anchor']:10.0f} tokens/s (fwd+bwd, median of {args.steps})")
    print(f"anchor + memory {tps['memory']:10.0f} tokens/s (fetch+fwd+bwd, a different path per sequence)")
    print(f"cpu-time ratio {cpu_ratio:.2f} (process CPU seconds per step, anchor / memory)")
    print(f"ratio {tps['memory'] / tps['anchor']:.2f}")


if __name__ == "__main__":
    main()
