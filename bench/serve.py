"""`hmem.serve` figures: memory fetch latency through the tiered store, end-to-end latency, RSS, a load test.

    python -m bench.serve --run runs/demo --model runs/demo/model/export [--prompts 128] [--cache-mb 16]
        [--requests 400] [--clients 8] [--layers N_LAYERS,D_MODEL]

Fetch. The first words of ``--prompts`` of the run's documents, routed by the model's routing, make two
streams: topic-coherent (sorted by path: consecutive prompts in one level-1 subtree) and random. Each
prompt's blocks are fetched (MemoryBank.fetch) through a CachedBlockStore of ``--cache-mb`` over the
export's bank, levels <= ``--resident-levels`` resident, and over a flat bank of the same fetched size (one
block per leaf holding a whole path's units: no shared ancestors) through a cache of the same RAM (``--cache-mb``
plus the resident levels' bytes), cold (the cache empty and the
bank files dropped from the OS page cache) and warm (the same stream again). Per case: p50 / p95 ms, the
cache hit rate and the MiB read from the bank files per prompt (the figure a loaded machine does not blur).
``--layers``: the same streams over banks whose blocks are shaped for a larger anchor (the model's tree and
ranks, values unset, written in parts beside the model and removed after): at the demo's block sizes Python
bookkeeping, not bytes, sets the fetch time. The server figures stay the model's.

Server. ``python -m hmem.serve`` on a free loopback port: end-to-end p50 / p95 of single requests with
the real openai client (warm), its RSS against the bank's size, and a load test of ``--requests``
requests from ``--clients`` concurrent clients (errors counted, p50 / p95, requests per second).
Last line: the headline figures.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def drop_page_cache(paths: list[str]) -> None:
    """Ask the kernel to forget the files' cached pages, so a cold read reads the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fetch_times(bank, ids: torch.Tensor) -> np.ndarray:
    """ms to fetch each row's blocks, one prompt at a time, in stream order."""
    out = []
    for row in ids:
        t = time.perf_counter()
        bank.fetch(row[None], requires_grad=False)
        out.append(1e3 * (time.perf_counter() - t))
    return np.array(out)


def write_bank(cfg, model_cfg, ids: np.ndarray, stem: str, part_bytes: int = 512 * 2**20) -> list[str]:
    """Blocks ``ids`` of memory ``cfg`` (values unset: a fetch's cost is its bytes and bookkeeping) as bank files
    ``stem``N.safetensors of about ``part_bytes`` each, so no process holds the bank."""
    from index.tree import block_level
    from train.memory import TensorBlockStore, block_shapes

    shapes = block_shapes(cfg, model_cfg)
    nbytes = {lv: sum(int(np.prod(s)) * 4 for s in named.values()) for lv, named in shapes.items()}  # fp32
    size = np.array([nbytes[block_level(int(i), cfg.k, cfg.depth)] for i in ids])
    part = np.cumsum(size) // part_bytes
    files = []
    for i in np.unique(part):
        files.append(f"{stem}{i}.safetensors")
        TensorBlockStore.create(cfg, model_cfg, owned_ids=ids[part == i], init=False).save(files[-1])
    return files


def flat_bank(cfg, model_cfg, leaves: np.ndarray, tmp: str):
    """A flat bank of the same fetched size: one block per leaf of sum(ranks) units, holding the leaves the
    prompts reach (the others would only take disk)."""
    from train.memory import MemoryConfig

    flat = MemoryConfig(kind=cfg.kind, ranks=(sum(cfg.ranks),), k=cfg.k**cfg.depth)
    return write_bank(flat, model_cfg, np.unique(leaves), os.path.join(tmp, "flat")), flat


def fetch_bench(
    asker, model: str, prompts: list[str], cache_mb: float, resident: int, layers: tuple[int, int] | None = None
) -> tuple[list[str], dict]:
    """``layers`` (n_layers, d_model): both banks' blocks shaped for that anchor instead of the model's, with
    the model's tree and ranks, written to a temporary directory (the routes stay the model's)."""
    from dataclasses import replace

    from index.router import leading_path
    from index.tree import n_tree_blocks, path_block_ids
    from train.lazy_store import CachedBlockStore, LazyBlockStore
    from train.memory import MemoryBank

    ev = asker.ev
    torch.set_num_threads(1)  # a fetch is reads and copies: on a busy machine intra-op threads only add waits
    paths = leading_path(asker.router.route_embeddings(asker.router.embed(prompts), texts=prompts))
    leaves = asker.router.leaves(paths)
    coherent = np.lexsort(paths.T[::-1])
    streams = {"coherent": coherent, "random": np.random.default_rng(0).permutation(len(prompts))}
    cfg, model_cfg = ev.bank.config, ev.anchor.cfg
    budget = int(cache_mb * 2**20)
    lines, p50 = [], {}
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(model))) as tmp:  # on the bank's disk
        if layers:
            model_cfg = replace(model_cfg, n_layers=layers[0], d_model=layers[1])
            hier_files = write_bank(cfg, model_cfg, np.arange(n_tree_blocks(cfg.k, cfg.depth)), f"{tmp}/bank")
        else:
            hier_files = [os.path.join(model, f) for f in sorted(ev.meta["bank_files"])]
        flat_files, flat_cfg = flat_bank(cfg, model_cfg, leaves, tmp)
        mib = sum(os.path.getsize(f) for f in hier_files) / 2**20
        lines.append(
            f"  blocks of {model_cfg.n_layers} layers x d {model_cfg.d_model}, ranks {list(cfg.ranks)}: bank "
            f"{mib:.0f} MiB on disk, {mib / cache_mb:.1f}x the cache"
        )
        for name, order in streams.items():
            for kind in ("hierarchical", "flat"):
                files = hier_files if kind == "hierarchical" else flat_files
                if kind == "hierarchical":
                    store = CachedBlockStore(LazyBlockStore(files), budget, resident)
                    same_ram = budget + store.resident.nbytes()  # the flat bank's cache gets the resident bytes too
                else:
                    store = CachedBlockStore(LazyBlockStore(files), same_ram, 0)
                bank_cfg = cfg if kind == "hierarchical" else flat_cfg
                bank = MemoryBank(bank_cfg, model_cfg.n_layers, model_cfg.d_model, store)
                ids = torch.from_numpy(
                    path_block_ids(paths[order], cfg.k)
                    if kind == "hierarchical"
                    else leaves[order][:, None].astype(np.int64)
                )
                drop_page_cache(files)
                for phase in ("cold", "warm"):
                    before = store.stats()
                    ms = fetch_times(bank, ids)
                    s = store.stats()
                    hits, misses = s["hits"] - before["hits"], s["misses"] - before["misses"]
                    read = (s["bytes_read"] - before["bytes_read"]) / len(ms) / 2**20
                    p50[(name, kind, phase)] = float(np.median(ms)), read
                    lines.append(
                        f"  {name:<8} {kind:<12} {phase}: p50 {np.median(ms):6.2f} ms  p95 "
                        f"{np.percentile(ms, 95):6.2f} ms  cache hits {hits / max(hits + misses, 1):5.1%}  "
                        f"read {read:.2f} MiB/prompt"
                    )
    return lines, p50


def rss_mib(pid: int) -> tuple[float, float]:
    """(anonymous, file-backed) resident MiB: the mapped document index counts in the second, reclaimable."""
    with open(f"/proc/{pid}/status") as f:
        kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("RssAnon", "RssFile")}
    return kb["RssAnon"] / 1024, kb["RssFile"] / 1024


@contextmanager
def serving(run: str, model: str, *flags: str, env: dict | None = None, timeout: float = 180):
    """``python -m hmem.serve`` on a free loopback port, ready (its /health answers): yields (port, process);
    terminated on exit. Shared with tests/test_serve.py."""
    import httpx

    from train.distributed import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "hmem.serve", "--run", run, "--model", model, "--port", str(port), *flags]
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: an unread pipe fills up and stalls the server
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"hmem.serve exited {proc.returncode}: {log.read()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"hmem.serve did not come up in {timeout:.0f} s")
            time.sleep(0.2)
        yield port, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)
        log.close()


def server_bench(run: str, model: str, prompts: list[str], args) -> tuple[list[str], dict]:
    import openai

    flags = ("--cache-mb", str(args.cache_mb), "--resident-levels", str(args.resident_levels))
    with serving(run, model, *flags) as (port, proc):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)
        client.completions.create(model="hmem", prompt="warm up", max_tokens=2)
        base = rss_mib(proc.pid)

        def one(q: str) -> tuple[float, bool]:
            t = time.perf_counter()
            try:
                client.completions.create(model="hmem", prompt=q, max_tokens=args.max_tokens)
                return 1e3 * (time.perf_counter() - t), True
            except openai.OpenAIError:
                return 1e3 * (time.perf_counter() - t), False

        single = np.array([one(q)[0] for q in prompts])
        after = rss_mib(proc.pid)
        stream = [prompts[i % len(prompts)] for i in range(args.requests)]
        t = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(one, stream))
        wall = time.perf_counter() - t
        peak = rss_mib(proc.pid)
    ms = np.array([m for m, _ in results])
    errors = sum(not ok for _, ok in results)
    bank = sum(os.path.getsize(os.path.join(model, "bank", f)) for f in os.listdir(os.path.join(model, "bank")))
    out = {
        "e2e_p50": np.median(single),
        "e2e_p95": np.percentile(single, 95),
        "errors": errors,
        "load_p95": np.percentile(ms, 95),
        "rps": len(results) / wall,
        "rss": sum(peak),
        "anon": peak[0],
        "bank": bank / 2**20,
    }
    lines = [
        f"end to end, one client ({len(prompts)} requests, {args.max_tokens} tokens): p50 {out['e2e_p50']:.0f} ms, "
        f"p95 {out['e2e_p95']:.0f} ms",
        "RSS (anonymous + file-backed MiB): "
        + ", ".join(
            f"{a:.0f} + {f:.0f} after {what}"
            for (a, f), what in ((base, "one request"), (after, f"{len(prompts)}"), (peak, "the load test"))
        )
        + f"; bank {out['bank']:.0f} MiB, cache {args.cache_mb:g} MiB",
        f"load: {len(results)} requests from {args.clients} clients in {wall:.1f} s ({out['rps']:.1f}/s), "
        f"{errors} errors, p50 {np.median(ms):.0f} ms, p95 {out['load_p95']:.0f} ms",
    ]
    return lines, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--cache-mb", type=float, default=16.0)
    ap.add_argument("--resident-levels", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument(
        "--layers",
        type=lambda v: tuple(int(x) for x in v.split(",")),
        help="N_LAYERS,D_MODEL: the fetch figures with blocks shaped for that anchor (30,576: SmolLM2-135M), the "
        "model's tree, ranks and routes; a bank of zeros written beside the model",
    )
    args = ap.parse_args()
    from hmem.ask import Asker

    asker = Asker(args.run, args.model)
    texts = asker.router.documents.table.column("preview").to_pylist()
    prompts = [" ".join(t.split()[:12]) for t in texts[:: max(1, len(texts) // args.prompts)][: args.prompts]]
    lines, p50 = fetch_bench(asker, args.model, prompts, args.cache_mb, args.resident_levels, args.layers)
    print(
        f"memory fetch per prompt ({len(prompts)} prompts, cache {args.cache_mb:g} MiB, level <= "
        f"{args.resident_levels} resident; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs):",
        *lines,
        sep="\n",
    )
    del asker
    lines, s = server_bench(args.run, args.model, prompts, args)
    print(*lines, sep="\n")
    h = {c: "{:.1f} ms {:.2f} MiB".format(*p50[c]) for c in p50}
    print(
        f"fetch p50 + read per prompt, warm: coherent {h[('coherent', 'hierarchical', 'warm')]} hierarchical vs "
        f"{h[('coherent', 'flat', 'warm')]} flat, random {h[('random', 'hierarchical', 'warm')]} vs "
        f"{h[('random', 'flat', 'warm')]}; e2e p50 {s['e2e_p50']:.0f} ms p95 {s['e2e_p95']:.0f} ms; "
        f"load {args.requests} req x{args.clients}: {s['errors']} errors, p95 {s['load_p95']:.0f} ms, "
        f"{s['rps']:.1f} req/s; RSS {s['rss']:.0f} MiB ({s['anon']:.0f} anonymous) for a {s['bank']:.0f} MiB bank"
    )


if __name__ == "__main__":
    main()
