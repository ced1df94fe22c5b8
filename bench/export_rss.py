"""Peak RSS of `hmem.query --model` and `train.evaluate` on an export, against one with a 10x bigger bank.

One run directory (40 BBC articles embedded by the real encoder, k=8, depth=3, its document index and
documents/) and two exports of the demo anchor (d=192, 4 layers) in train/export.py's format, one bank
file per rank of a 2-rank job, random blocks:
  small  FFN-memory ranks (60, 8, 4):  3,040 units, 72 fetched per sequence
  big    ranks (4, 8, 60):            31,264 units (10.3x), the same 72 fetched
Each command runs in a fresh process, twice per export, small and big interleaved; the peak RSS is
the process's own VmHWM, written at its exit. `train.evaluate` scores --heldout (8) held-out articles and 10 probes
(half of them without doc_ids, so documents/ is scanned too). Prints the figures, then last:
`query rss growth X% evaluate rss growth Y%` (big over small, the larger of the two repeats).

    python -m bench.export_rss [--repeats 2] [--heldout 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K, DEPTH, SEQ_LEN = 8, 3, 128
BANKS = {"small": (60, 8, 4), "big": (4, 8, 60)}


def make_run(root: str) -> list[str]:
    """The run directory; returns the texts of its documents."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.fixtures import write_tokenizer
    from tests.test_router import bbc_texts, make_bbc_run

    make_bbc_run(root, n_docs=40, k=K, depth=DEPTH)
    texts = bbc_texts(40)
    os.makedirs(os.path.join(root, "documents"))
    pq.write_table(
        pa.table({"doc_id": [f"bbc{i:04d}" for i in range(len(texts))], "text": texts}),
        os.path.join(root, "documents", "part-00000.parquet"),
    )
    write_tokenizer(os.path.join(root, "tokenizer.json"), 300)
    return texts


def make_export(run: str, out: str, ranks: tuple[int, ...]) -> int:
    """An export directory with a random bank of ``ranks``, written one file per rank of 2; returns its bytes."""
    import torch
    from safetensors.torch import save_file

    from index.rundir import read_manifest
    from train.data import assign_subtrees
    from train.export import bank_files, export_blocks, write_meta
    from train.memory import MemoryConfig, TensorBlockStore, block_shapes
    from train.model import Anchor, load_model_config

    with open(os.path.join(run, "tokenizer.json")) as f:
        vocab = len(json.load(f)["model"]["vocab"])
    model_cfg = load_model_config("demo", vocab_size=vocab, max_seq_len=SEQ_LEN)
    mem = MemoryConfig(ranks=ranks, k=K, depth=DEPTH)
    os.makedirs(os.path.join(out, "bank"))
    torch.manual_seed(0)
    save_file(
        {n: t.contiguous() for n, t in Anchor(model_cfg).state_dict().items()}, os.path.join(out, "anchor.safetensors")
    )
    shutil.copy(os.path.join(run, "tokenizer.json"), out)
    ownership = assign_subtrees(read_manifest(run), 2)
    full = TensorBlockStore.create(mem, model_cfg)
    for r in range(2):
        ids = torch.from_numpy(export_blocks(ownership, r))
        mine = {l: ids[torch.isin(ids, full.ids[l])] for l in full.shapes}
        TensorBlockStore(full.shapes, mine, {l: full.read(l, x) for l, x in mine.items()}).save(
            os.path.join(out, "bank", f"rank{r}.safetensors")
        )
    levels = sorted(block_shapes(mem, model_cfg))
    meta = {
        "tree_version": read_manifest(run)["tree_version"],
        "k": K,
        "depth": DEPTH,
        "seq_len": SEQ_LEN,
        "eot_id": 0,
        "pad_id": 1,
        "model": dataclasses.asdict(model_cfg),
        "memory": mem.to_dict(),
        "train": {},
        "step": 0,
        "run_dir": run,
        "runs": [run],
        "bank_files": bank_files(ownership, levels),
    }
    write_meta(out, meta)
    return full.nbytes()


# Runs a module as __main__ and, at exit, writes its own peak RSS (VmHWM of this process's memory map; a
# child's ru_maxrss would include the parent's RSS at fork time, which Linux carries across exec).
WRAPPER = """import atexit, os, runpy, sys
def report():
    with open('/proc/self/status') as f, open(os.environ['PEAK_RSS_FILE'], 'w') as out:
        out.write(next(l.split()[1] for l in f if l.startswith('VmHWM')))
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
"""


def peak_rss_mb(module_args: list[str], tmp: str) -> float:
    out = os.path.join(tmp, "peak_rss")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PEAK_RSS_FILE": out}
    p = subprocess.run(
        [sys.executable, "-c", WRAPPER, *module_args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if p.returncode:
        raise SystemExit(f"{' '.join(module_args)} failed:\n{p.stderr[-3000:]}")
    with open(out) as f:
        return int(f.read()) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--heldout", type=int, default=8, help="held-out articles train.evaluate scores")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        texts = make_run(run)
        sizes = {name: make_export(run, os.path.join(tmp, name), ranks) for name, ranks in BANKS.items()}
        heldout, probes = os.path.join(tmp, "heldout.jsonl"), os.path.join(tmp, "probes.jsonl")
        with open(heldout, "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts[::5][: args.heldout])
        words = [max(t.split()[:30], key=len).strip(".,'\"") for t in texts[:10]]
        with open(probes, "w") as f:
            f.writelines(
                json.dumps(
                    {
                        "prompt": t[:60],
                        "answer": w,
                        "entity": w,
                        "frequency": i + 1,
                        **({"doc_ids": [f"bbc{i:04d}"]} if i % 2 else {}),
                    }
                )
                + "\n"
                for i, (t, w) in enumerate(zip(texts, words))
            )
        cmds = {
            "query": lambda e: ["hmem.query", "--run", run, "--model", e, "--json", *texts[:3]],
            "evaluate": lambda e: [
                "train.evaluate",
                "--model",
                e,
                "--run",
                run,
                "--heldout",
                heldout,
                "--probes",
                probes,
                "--out",
                os.path.join(tmp, "res.json"),
            ],
        }
        rss = {(c, name): [] for c in cmds for name in BANKS}
        for _ in range(args.repeats):
            for c, cmd in cmds.items():
                for name in BANKS:
                    rss[(c, name)].append(peak_rss_mb(cmd(os.path.join(tmp, name)), tmp))
                    print(f"{c} {name}: peak RSS {rss[(c, name)][-1]:.0f} MB", flush=True)
    for name, size in sizes.items():
        print(f"{name}: FFN ranks {BANKS[name]}, bank {size / 2**20:.0f} MiB in 2 files")
    growth = {}
    for c in cmds:
        s, b = max(rss[(c, "small")]), max(rss[(c, "big")])
        growth[c] = 100 * (b / s - 1)
        print(
            f"{c}: peak RSS small {[round(x) for x in rss[(c, 'small')]]} MB, big "
            f"{[round(x) for x in rss[(c, 'big')]]} MB"
        )
    print(f"load average {open('/proc/loadavg').read().split()[:3]}")
    print(
        f"query rss growth {growth['query']:+.1f}% evaluate rss growth {growth['evaluate']:+.1f}% "
        f"(bank {sizes['big'] / sizes['small']:.1f}x)"
    )


if __name__ == "__main__":
    main()
