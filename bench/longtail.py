"""Long-tail knowledge benchmark: do the memories hold the rare facts? The whole chain, via the real CLIs.

Per seed: jobs/build_longtail.py (facts corpus + probes, configs/longtail/corpus.yaml) -> spark-submit
jobs/cluster_corpus.py (configs/longtail/job.yaml) -> train/main.py for three models on equal
training tokens (configs/longtail/{anchor,memory,dense2x}.yaml; max_steps from --epochs) ->
python -m train.evaluate for each. Then OUT/results.md + OUT/results.json (accuracy per frequency
bucket and model / memory setting, routing agreement, perplexity fetched / generic / none and the
per-level ablation, mean over seeds) and OUT/longtail.png.

    python bench/longtail.py [--out runs/longtail] [--seeds 0] [--epochs 1] [--cores 2]

A stage whose output exists is skipped, so an interrupted run resumes (delete a model's
directory to retrain it). The last line printed is the headline: the rarest bucket's accuracy.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
CONFIGS = os.path.join(ROOT, "configs", "longtail")
MODELS = ("anchor", "memory", "dense2x")
# table rows: (label, model, memory setting of train.evaluate)
BLOCKED = "anchor + memory, facts' blocks blocked"
ROWS = [("dense anchor", "anchor", "none"), ("anchor + memory, routed", "memory", "fetched"),
        ("anchor + memory, oracle leaf", "memory", "oracle"), ("anchor + memory, generic", "memory", "generic"),
        ("anchor + memory, no memory", "memory", "none"), (BLOCKED, "memory", "blocked"),
        ("dense 2x", "dense2x", "none")]


def env(cores: int) -> dict:
    e = dict(os.environ)
    e.update(PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1",
             HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(cores),
             TORCH_EXTENSIONS_DIR=os.path.join(ROOT, ".cache", "torch_extensions"), PYTHONPATH=ROOT)
    return e


def step(name: str, cmd: list[str], done: str, log: str, cores: int, timings: dict) -> None:
    """Run ``cmd`` (output to ``log``) unless ``done`` exists; record its seconds."""
    if os.path.exists(done):
        print(f"[{name}] done already ({done})", flush=True)
        return
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    t = time.time()
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=ROOT, env=env(cores), stdout=f, stderr=subprocess.STDOUT)
    timings[name] = round(time.time() - t, 1)
    if p.returncode != 0 or not os.path.exists(done):
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"[{name}] failed (exit {p.returncode}); last output of {log}:\n{tail}")
    print(f"[{name}] {timings[name]:.0f}s", flush=True)


def run_seed(out: str, seed: int, epochs: float, cores: int) -> dict:
    """The chain for one seed; returns {model: evaluation JSON} plus timings and training figures."""
    d = os.path.join(out, f"seed{seed}")
    data, run, logs = os.path.join(d, "data"), os.path.join(d, "run"), os.path.join(d, "logs")
    os.makedirs(logs, exist_ok=True)
    timings: dict[str, float] = {}
    step("corpus", [sys.executable, "jobs/build_longtail.py", "--out", data, "--config", f"{CONFIGS}/corpus.yaml",
                    "--seed", str(seed)], os.path.join(data, "summary.json"), f"{logs}/corpus.log", cores, timings)
    step("cluster", [f"{BIN}/spark-submit", "--master", f"local[{cores}]", "--conf", "spark.driver.memory=2g",
                     "jobs/cluster_corpus.py", "--config", f"{CONFIGS}/job.yaml", "--input", f"{data}/train.jsonl",
                     "--id-column", "id", "--seed", str(seed), "--output", run],
         os.path.join(run, "manifest.json"), f"{logs}/cluster.log", cores, timings)
    with open(os.path.join(run, "manifest.json")) as f:
        manifest = json.load(f)
    batch = 16  # every configs/longtail/*.yaml trains on batches of 16 sequences: equal tokens per step
    steps = math.ceil(epochs * manifest["sequences"] / batch)
    with open(os.path.join(data, "summary.json")) as f:
        corpus = json.load(f)
    results = {"seed": seed, "steps": steps, "tokens": steps * batch * manifest["seq_len"],
               "corpus_tokens": manifest["tokens"], "sequences": manifest["sequences"],
               "fact_passes": corpus["config"]["fact_passes"], "bbc_train": corpus["config"]["bbc_train"],
               "timings": timings, "train": {}}
    for m in MODELS:
        mdir = os.path.join(d, "models", m)
        step(f"train {m}", [sys.executable, "train/main.py", "--config", f"{CONFIGS}/{m}.yaml", "--data", run,
                            "--out", mdir, "--no-resume", "--set", f"schedule.max_steps={steps}",
                            "--set", f"data.seed={seed}", "--set", f"memory.seed={seed}"],
             os.path.join(mdir, "export", "meta.json"), f"{logs}/train_{m}.log", cores, timings)
        with open(os.path.join(mdir, "metrics.jsonl")) as f:
            metrics = [json.loads(line) for line in f]
        results["train"][m] = {"final_loss": metrics[-1]["loss"],
                               "tokens_per_s": float(np.median([x["tokens_per_s"] for x in metrics]))}
        ev = os.path.join(d, "eval", f"{m}.json")
        os.makedirs(os.path.dirname(ev), exist_ok=True)
        step(f"evaluate {m}", [sys.executable, "-m", "train.evaluate", "--model", f"{mdir}/export", "--run", run,
                               "--heldout", f"{data}/heldout.jsonl", "--probes", f"{data}/probes.jsonl", "--out", ev],
             ev, f"{logs}/evaluate_{m}.log", cores, timings)
        with open(ev) as f:
            results[m] = json.load(f)
    return results


def mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def aggregate(per_seed: list[dict]) -> dict:
    """Mean over seeds of the accuracy per (row, bucket), routing agreement and perplexities."""
    n_buckets = len(per_seed[0]["memory"]["probes"]["buckets"])
    table = {}
    for label, model, setting in ROWS:
        table[label] = {"buckets": [mean(s[model]["probes"]["buckets"][b]["accuracy"].get(setting) for s in per_seed)
                                    for b in range(n_buckets)],
                        "all": mean(s[model]["probes"]["accuracy"].get(setting) for s in per_seed)}
    buckets = [{"frequency_range": [min(s["memory"]["probes"]["buckets"][b]["frequency_range"][0] for s in per_seed),
                                    max(s["memory"]["probes"]["buckets"][b]["frequency_range"][1] for s in per_seed)],
                "probes": int(sum(s["memory"]["probes"]["buckets"][b]["probes"] for s in per_seed) / len(per_seed)),
                "entities": int(sum(s["memory"]["probes"]["buckets"][b]["entities"] for s in per_seed) / len(per_seed)),
                "routing_agreement": mean(s["memory"]["probes"]["buckets"][b]["routing_agreement"] for s in per_seed)}
               for b in range(n_buckets)]
    ppl = {}
    for model in MODELS:
        for setting in per_seed[0][model]["perplexity"]:
            ppl[f"{model}: {setting}"] = {k: mean(s[model]["perplexity"][setting][k] for s in per_seed)
                                         for k in per_seed[0][model]["perplexity"][setting]}
    models = {m: per_seed[0][m]["model"] for m in MODELS}
    train = {m: {k: mean(s["train"][m][k] for s in per_seed) for k in ("final_loss", "tokens_per_s")} for m in MODELS}
    return {"seeds": [s["seed"] for s in per_seed], "steps": per_seed[0]["steps"], "tokens": per_seed[0]["tokens"],
            "fact_passes": per_seed[0]["fact_passes"], "bbc_train": per_seed[0]["bbc_train"],
            "corpus_tokens": mean(s["corpus_tokens"] for s in per_seed), "buckets": buckets, "accuracy": table,
            "perplexity": ppl, "models": models, "train": train,
            "blocked_bank_share": mean(s["memory"]["probes"]["blocked_bank_share"] for s in per_seed),
            "timings": [s["timings"] for s in per_seed]}


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def markdown(r: dict) -> str:
    b = r["buckets"]
    head = [f"f {x['frequency_range'][0]}-{x['frequency_range'][1]} ({x['entities']} ent., {x['probes']} pr.)" for x in b]
    lines = [f"Long-tail benchmark: seeds {r['seeds']}, {r['steps']} steps = {r['tokens']:,} training tokens per model "
             f"({r['tokens'] / r['corpus_tokens']:.1f} epochs of {r['corpus_tokens']:.0f} tokens: {r['bbc_train']} BBC "
             f"articles once, the facts part {r['fact_passes']}x).", "",
             "Models: " + "; ".join(f"{m} {v['anchor_params'] / 1e6:.2f}M" + (
                 f" + {v['fetched_params'] / 1e6:.3f}M fetched of a {v['bank_params'] / 1e6:.2f}M bank" if "bank_params" in v else "")
                 for m, v in r["models"].items()), "",
             f"Exact-match accuracy (%) per entity-frequency bucket (rarest first; f = distinct documents about "
             f"the entity, each read {r['fact_passes']}x):", "",
             "| model / memory | " + " | ".join(head) + " | all |", "|---" * (len(head) + 2) + "|"]
    for label, row in r["accuracy"].items():
        lines.append(f"| {label} | " + " | ".join(pct(x) for x in row["buckets"]) + f" | {pct(row['all'])} |")
    lines.append("| routing agreement (share of the entity's documents in the probe's leaf) | "
                 + " | ".join(pct(x["routing_agreement"]) for x in b) + " | |")
    lines += ["", f"Blocking disables on average {100 * r['blocked_bank_share']:.1f}% of the tree's blocks per probe.", "",
              "Held-out perplexity (documents routed by the router; generic@l / off@l: level l swapped for the "
              "generic block / disabled):", ""]
    cols = sorted({k for v in r["perplexity"].values() for k in v}, key=lambda k: (k != "all", k))
    lines += ["| model: memory | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in r["perplexity"].items():
        lines.append(f"| {name} | " + " | ".join("-" if row.get(c) is None else f"{row[c]:.2f}" for c in cols) + " |")
    lines += ["", "Training: " + "; ".join(f"{m} final loss {v['final_loss']:.3f}, {v['tokens_per_s']:.0f} tokens/s"
                                           for m, v in r["train"].items())]
    lines.append("Stage seconds: " + json.dumps(r["timings"]))
    return "\n".join(lines)


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    labels = [f"{x['frequency_range'][0]}-{x['frequency_range'][1]}" for x in r["buckets"]]
    shown = ["dense anchor", "anchor + memory, routed", "anchor + memory, oracle leaf",
             BLOCKED, "dense 2x"]
    w = 0.8 / len(shown)
    for i, label in enumerate(shown):
        ys = [100 * (y or 0) for y in r["accuracy"][label]["buckets"]]
        ax.bar(np.arange(len(labels)) + (i - len(shown) / 2 + 0.5) * w, ys, w, label=label)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("entity frequency in the corpus (documents)")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title("Long-tail facts")
    ax.legend(fontsize=8)
    names = ["anchor: none", "memory: fetched", "memory: generic", "memory: none", "dense2x: none"]
    bx.bar(range(len(names)), [r["perplexity"][n]["all"] for n in names],
           color=["C0", "C1", "C2", "C3", "C4"])
    bx.set_xticks(range(len(names)), [n.replace(": ", "\n") for n in names], fontsize=8)
    bx.set_ylabel("held-out perplexity")
    bx.set_title("Perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/longtail")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epochs", type=float, default=1.0,
                    help="passes over the run's sequences (equal for all models); the corpus already repeats the "
                         "facts (configs/longtail/corpus.yaml fact_passes)")
    ap.add_argument("--cores", type=int, default=2)
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out)
    t = time.time()
    per_seed = [run_seed(out, s, args.epochs, args.cores) for s in args.seeds]
    r = aggregate(per_seed)
    r["wall_seconds"] = round(time.time() - t, 1)
    r["load_average"] = os.getloadavg()
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(r, f, indent=1)
    md = markdown(r)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md + "\n")
    plot(r, os.path.join(out, "longtail.png"))
    print(md)
    acc = {label: r["accuracy"][label]["buckets"][0] for label, _, _ in ROWS}
    ppl = {s: r["perplexity"][f"memory: {s}"]["all"] for s in ("fetched", "generic", "none")}
    print(f"rarest bucket accuracy: dense anchor {pct(acc['dense anchor'])}%, memory routed "
          f"{pct(acc['anchor + memory, routed'])}% (oracle {pct(acc['anchor + memory, oracle leaf'])}%, blocked "
          f"{pct(acc[BLOCKED])}%), dense 2x {pct(acc['dense 2x'])}%; "
          f"ppl fetched/generic/none {ppl['fetched']:.2f}/{ppl['generic']:.2f}/{ppl['none']:.2f} "
          f"(dense anchor {r['perplexity']['anchor: none']['all']:.2f}); {r['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
