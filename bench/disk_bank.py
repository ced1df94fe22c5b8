"""A bank on disk (memory.store: disk) against the same bank in RAM: tokens/s, per-rank RSS, lazy start.

Two rank processes started by the deepspeed launcher (gloo, 2 CPU ranks), the demo anchor, FFN-memory
ranks (8, 16, 144) on a k=8, depth=3 tree by default (bench/train_throughput.py's big bank: 168 units
fetched per sequence from 74,816): 0.69 GB of blocks, 2.07 GB with the AdamW moments (~1 GB per rank),
against a RAM budget of 240 MiB per rank (each rank's shard is >= 4x its budget; the ratios are
printed). Sized so that the RAM run's bank, held in the same processes, fits a shared 24 GB machine.

  1. A dense anchor_only trainer runs a few steps, then the disk trainer (lazy: start time printed):
     each rank's max RssAnon and RssFile (/proc/self/status, sampled every 5 ms) over each run; the
     disk run's growth over the dense run is held against budget + anchor + overhead.
  2. The RAM trainer (same config, same data and seed, so the same blocks are fetched) is built in
     the same processes, and the two step in turn (ram, disk, ram, ...), timed by wall clock between
     barriers (the headline: it counts waits on the disk) and by the slowest rank's CPU time (all
     threads, so the prefetch thread's work counts). /proc/self/io shows how many bytes the disk
     store really read from and wrote to storage: on a machine whose page cache can hold the bank
     files, reads are served from it; ``--drop-cache`` evicts the bank files from the page cache
     before every disk step (posix_fadvise DONTNEED), as when the bank is bigger than the machine.
     Blocks never trained yet are materialised, not read; ``--materialise`` writes every record of the
     disk run to its file before its steps (as after a long run), so that all its reads go to the files.
  3. Rank 0 creates a lazy disk store for the paper's 160M configuration (ranks (256, 64, 16, 0),
     k=16, depth 4: 4.62B parameters, 55 GB with moments) and prints how long that takes.

Data: ``--data`` RUN_DIR, or a synthetic run directory (tests/fixtures.make_run_dir: random tokens,
8 sequences per leaf, seq_len 512, the manifest's vocab_size set to the demo's 8192).
Prints the figures; the last line is ``ratio X`` (disk tokens/s / RAM tokens/s, wall clock).

    python -m bench.disk_bank [--data RUN] [--ranks 8,16,144] [--budget-mb 240] [--steps 20] [--materialise]
        [--drop-cache]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
import time

from bench.ds_launch import add_worker_args, run_worker, timed_step
from index.rundir import read_manifest, write_manifest


def proc_kb(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    """Fields of /proc/self/status (kB) or /proc/self/io (bytes)."""
    out = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0])
    return out


def rss() -> dict[str, int]:
    return proc_kb("/proc/self/status", ("RssAnon", "RssFile"))


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from train.config import load_config
    from train.distributed import init, teardown
    from train.main import Trainer
    from train.memory import MemoryConfig, param_counts
    from train.model import load_model_config
    from train.optim import TouchedAdamW
    from train.store_disk import DiskBlockStore, row_chunks

    info = init()
    manifest = read_manifest(args.data)
    base = rss()
    common = [
        f"memory.ranks=[{args.ranks}]",
        "schedule.save=false",
        "schedule.max_steps=1000000",
        f"memory.ram_budget_mb={args.budget_mb}",
        f"memory.prefetch_batches={args.prefetch}",
    ]

    def build(name: str, store: str, sets: list[str] = ()):
        cfg = load_config(args.config, common + [f"memory.store={store}", *sets], manifest)
        dist.barrier()
        t0 = time.perf_counter()
        trainer = Trainer(cfg, args.data, os.path.join(args.out, name), info, manifest, resume=False)
        return trainer, time.perf_counter() - t0

    def sampled_steps(trainer) -> dict[str, int]:
        """Max RssAnon / RssFile over ``rss_steps`` steps, sampled every 5 ms by a thread (peaks inside a step
        count)."""
        peak, done = {"RssAnon": 0, "RssFile": 0}, threading.Event()

        def sample():
            while not done.wait(0.005):
                now = rss()
                peak.update({k: max(v, now[k]) for k, v in peak.items()})

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        for _ in range(args.rss_steps):
            trainer.train_step()
        done.set()
        thread.join()
        return peak

    dense, _ = build("anchor", "ram", ["recipe.name=anchor_only"])  # also takes DeepSpeed's first-build costs
    peak_dense = sampled_steps(dense)
    disk, t_disk = build("disk", "disk")
    store = disk.bank.store
    t0 = time.perf_counter()
    for part in (store, *(store.state_store(n) for n in TouchedAdamW.STATE)) if args.materialise else ():
        for level, named in part.shapes.items():  # every record into its file, as after a long run
            for a, b in row_chunks(named, len(part.ids[level])):
                part.write(level, part.ids[level][a:b], part.read(level, part.ids[level][a:b]))
    t_fill = time.perf_counter() - t0
    peak = sampled_steps(disk)
    t0 = time.perf_counter()
    lazy = DiskBlockStore.create(
        disk.cfg.memory,
        disk.cfg.model,
        store.owned_ids(),
        os.path.join(args.out, f"lazy{info.rank}"),
        args.budget_mb * 2**20,
        state=TouchedAdamW.STATE,
    )
    t_lazy = time.perf_counter() - t0
    lazy.bank.close()

    ram, t_ram = build("ram", "ram")
    wall = {"ram": [], "disk": []}
    cpu = {"ram": [], "disk": []}
    io_keys = ("rchar", "wchar", "read_bytes", "write_bytes")
    io = {k: 0 for k in io_keys}
    for step in range(args.warmup + args.steps):
        for name, trainer in (("ram", ram), ("disk", disk)):
            if name == "disk" and args.drop_cache:
                for fd in store.bank.fds.values():
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            io0 = proc_kb("/proc/self/io", io_keys)
            w, c = timed_step(trainer)
            if step >= args.warmup:
                wall[name].append(w)
                cpu[name].append(c)
                if name == "disk":
                    io1 = proc_kb("/proc/self/io", io_keys)
                    io = {k: io[k] + io1[k] - io0[k] for k in io_keys}

    mib = 2**20
    grow = (peak["RssAnon"] - peak_dense["RssAnon"]) * 1024
    anchor_params = disk.cfg.model.num_params()
    shard = store.nbytes() * len(store.bank.fields)  # blocks + moments on disk
    line = (
        f"rank {info.rank}: shard {shard / mib:,.0f} MiB on disk (blocks + moments) = "
        f"{shard / (args.budget_mb * mib):.1f}x "
        f"the {args.budget_mb} MiB budget; pinned levels {sorted({l for _, l in store.bank.pinned})} "
        f"{store.bank.pinned_bytes / mib:.0f} MiB + cache {store.bank.cached / mib:.0f} MiB resident\n"
        f"  RssAnon: {base['RssAnon'] / 1024:.0f} MiB before any trainer, max {peak_dense['RssAnon'] / 1024:.0f} MiB "
        "over "
        f"{args.rss_steps} steps of a dense anchor_only run, max {peak['RssAnon'] / 1024:.0f} MiB over "
        f"{args.rss_steps} steps "
        f"of the disk run after it (sampled every 5 ms); RssFile: {base['RssFile'] / 1024:.0f} / "
        f"{peak_dense['RssFile'] / 1024:.0f} / {peak['RssFile'] / 1024:.0f} MiB\n"
        f"  disk run - dense run: anon {grow / mib:+.0f} MiB = budget {args.budget_mb} + anchor (params, grads, AdamW: "
        f"16 B x {anchor_params / 1e6:.1f}M = {16 * anchor_params / mib:.0f} MiB) + overhead "
        f"{(grow - args.budget_mb * mib - 16 * anchor_params) / mib:+.0f} MiB (fetched copies and their grads, "
        "in-flight records); "
        f"file {(peak['RssFile'] - peak_dense['RssFile']) / 1024:+.0f} MiB\n"
        f"  disk store during the timed steps: {io['read_bytes'] / mib / args.steps:.1f} MiB/step read from storage, "
        f"{io['write_bytes'] / mib / args.steps:.1f} MiB/step written (syscalls: "
        f"{io['rchar'] / mib / args.steps:.1f} / "
        f"{io['wchar'] / mib / args.steps:.1f} MiB/step); cache {json.dumps(store.bank.stats)}\n"
        f"  start: disk trainer built in {t_disk:.1f} s, its store alone created in {t_lazy:.3f} s (lazy); "
        f"RAM trainer built in {t_ram:.1f} s (bank initialised eagerly)"
        + (f"; every record written to the files before the steps in {t_fill:.1f} s" if args.materialise else "")
    )
    lines = [None] * info.world_size
    dist.all_gather_object(lines, line)
    if info.rank == 0:
        tokens = disk.cfg.data.batch_size * int(manifest["seq_len"]) * info.world_size
        med_w = {n: statistics.median(t) for n, t in wall.items()}
        med_c = {n: statistics.median(t) for n, t in cpu.items()}
        paper = MemoryConfig(ranks=(256, 64, 16, 0), k=16, depth=4)
        model = load_model_config("paper160m")
        n_blocks = sum(16**l for l in range(1, 4)) + 4
        tmp = tempfile.mkdtemp(dir=args.out)
        t0 = time.perf_counter()
        big = DiskBlockStore.create(
            paper, model, torch.arange(n_blocks), tmp, args.budget_mb * mib, state=TouchedAdamW.STATE
        )
        t_big = time.perf_counter() - t0
        big_bytes = big.nbytes() * len(big.bank.fields)
        big.bank.close()
        shutil.rmtree(tmp)
        out = lines + [
            f"lazy start: the paper's 160M bank ({param_counts(model, paper)['bank'] / 1e9:.2f}B params, "
            f"{big_bytes / 1e9:.1f} GB with moments) created in {t_big:.2f} s",
            f"RAM bank   {tokens / med_w['ram']:8.0f} tok/s wall  {tokens / med_c['ram']:8.0f} tok/s CPU  (median of "
            f"{args.steps} steps)",
            f"disk bank  {tokens / med_w['disk']:8.0f} tok/s wall  {tokens / med_c['disk']:8.0f} tok/s CPU  "
            f"(ranks [{args.ranks}], budget {args.budget_mb} MiB/rank, prefetch {args.prefetch} batches"
            f"{', page cache dropped before each step' if args.drop_cache else ''})",
            f"CPU-time ratio {med_c['ram'] / med_c['disk']:.2f}",
            f"ratio {med_w['ram'] / med_w['disk']:.2f}",
        ]
        with open(os.path.join(args.out, "result.txt"), "w") as f:
            f.write("\n".join(out) + "\n")
    for trainer in (dense, ram, disk):
        trainer.close()
    teardown()


def synthetic_run(root: str) -> str:
    from tests.fixtures import make_run_dir

    run = make_run_dir(root, k=8, depth=3, seq_len=512, seqs_per_leaf=[8] * 512)
    # the demo anchor's embedding and output sizes (token ids stay < 300)
    write_manifest(run, {**read_manifest(run), "vocab_size": 8192})
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="run directory (default: a synthetic k=8, depth=3 one)")
    ap.add_argument("--config", default="demo")
    ap.add_argument("--ranks", default="8,16,144", help="memory.ranks of both runs")
    ap.add_argument("--budget-mb", type=int, default=240, help="memory.ram_budget_mb of the disk run (per rank)")
    ap.add_argument("--prefetch", type=int, default=2, help="memory.prefetch_batches")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rss-steps", type=int, default=10, help="steps of the disk run alone, for RSS")
    ap.add_argument(
        "--drop-cache", action="store_true", help="evict the bank files from the page cache before each disk step"
    )
    ap.add_argument("--materialise", action="store_true", help="write every disk record to its file before the steps")
    add_worker_args(ap)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        data = os.path.abspath(args.data) if args.data else synthetic_run(os.path.join(tmp, "run"))
        run_worker(
            "bench.disk_bank",
            [
                "--data",
                data,
                "--config",
                args.config,
                "--ranks",
                args.ranks,
                "--budget-mb",
                str(args.budget_mb),
                "--prefetch",
                str(args.prefetch),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--rss-steps",
                str(args.rss_steps),
            ]
            + ["--drop-cache"] * args.drop_cache
            + ["--materialise"] * args.materialise,
            tmp,
        )


if __name__ == "__main__":
    main()
