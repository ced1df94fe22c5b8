"""Long-tail knowledge benchmark: do the memories hold the rare facts? The whole chain, via the real CLIs.

Per seed: jobs/build_longtail.py (facts corpus + probes, configs/longtail/corpus.yaml) -> spark-submit
jobs/cluster_corpus.py (configs/longtail/job.yaml) -> train/main.py for three models on equal
training tokens (configs/longtail/{anchor,memory,dense2x}.yaml; max_steps from --epochs) ->
python -m train.evaluate for each. Then OUT/results.md + OUT/results.json (accuracy per frequency
bucket and model / memory setting, routing agreement, perplexity fetched / generic / none and the
per-level ablation, mean over seeds) and OUT/longtail.png.

    python -m bench.longtail [--out runs/longtail] [--seeds 0] [--epochs 1] [--cores 2]

A stage is skipped when its output exists AND its fingerprint matches: the hash of its command, of the
config and data files it reads and of the fingerprints of the stages it depends on (OUT/seedN/stages.json).
Change a config or the corpus and exactly the stages downstream of it run again; an interrupted run
resumes. (Code is not fingerprinted: after changing the trainer, pass --force.) The last line printed is
the headline: the rarest bucket's accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from bench import machine, machine_line
from corpora.longtail import job_input
from index.routing import RoutingConfig
from index.rundir import read_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
CONFIGS = os.path.join(ROOT, "configs", "longtail")
MODELS = ("anchor", "memory", "dense2x")
# routing modes train.evaluate compares on the memory model (index/router.py); the first is the headline
ROUTING = ("neighbours", "descent", "hybrid", "levels", "two_paths")
# table rows: (label, model, memory setting of train.evaluate); the memory model's routing modes follow
BLOCKED = "anchor + memory, facts' blocks blocked"
ROUTED = f"anchor + memory, routed ({ROUTING[0]})"
LINEAR = f"anchor + memory, routed ({ROUTING[0]}, linear vote)"  # the vote before rerank, same models


def rows(bare: bool = True) -> list[tuple[str, str, str]]:
    return (
        [("dense anchor", "anchor", "none"), (ROUTED, "memory", "fetched")]
        + ([(LINEAR, "memory_linear", "fetched")] if bare else [])
        + [(f"anchor + memory, routed ({m})", "memory", f"fetched[{m}]") for m in ROUTING[1:]]
        + [
            ("anchor + memory, oracle leaf", "memory", "oracle"),
            ("anchor + memory, generic", "memory", "generic"),
            ("anchor + memory, no memory", "memory", "none"),
            (BLOCKED, "memory", "blocked"),
            ("dense 2x", "dense2x", "none"),
        ]
    )


def cluster_cmd(src: list[str], run: str, seed: int, cores: int, *extra: str) -> list[str]:
    """The clustering job on long-tail corpus files (configs/longtail/job.yaml), as every long-tail bench runs it."""
    return [
        f"{BIN}/spark-submit",
        "--master",
        f"local[{cores}]",
        "--conf",
        "spark.driver.memory=2g",
        "jobs/cluster_corpus.py",
        "--config",
        f"{CONFIGS}/job.yaml",
        "--input",
        *src,
        "--id-column",
        "id",
        "--seed",
        str(seed),
        "--output",
        run,
        *extra,
    ]


def train_cmd(config: str, run: str, mdir: str, steps: int, seed: int, *sets: str) -> list[str]:
    """train/main.py for ``steps`` steps, data order and memory init seeded by ``seed``; ``sets``: more --set."""
    cmd = [
        sys.executable,
        "train/main.py",
        "--config",
        config,
        "--data",
        run,
        "--out",
        mdir,
        "--no-resume",
        "--set",
        f"schedule.max_steps={steps}",
        "--set",
        f"data.seed={seed}",
        "--set",
        f"memory.seed={seed}",
    ]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def env(cores: int) -> dict:
    e = dict(os.environ)
    e.update(
        PYSPARK_PYTHON=sys.executable,
        PYSPARK_DRIVER_PYTHON=sys.executable,
        SPARK_LOCAL_IP="127.0.0.1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(cores),
        TORCH_EXTENSIONS_DIR=os.path.join(ROOT, ".cache", "torch_extensions"),
    )
    return e


def index_stage(st: "Stages", name: str, run: str, log: str, after: list[str]) -> None:
    """jobs/build_index.py on ``run``; its code is part of the stage's fingerprint."""
    st.run(
        name,
        [sys.executable, "jobs/build_index.py", "--run", run],
        os.path.join(run, "index", "index.json"),
        log,
        files=[os.path.join(ROOT, f) for f in ("jobs/build_index.py", "index/docindex.py", "index/terms.py")],
        after=after,
        clear=os.path.join(run, "index"),
    )


class Stages:
    """The stages of one seed directory and their fingerprints (``stages.json``)."""

    def __init__(self, root: str, cores: int, force: bool):
        self.path, self.cores, self.force = os.path.join(root, "stages.json"), cores, force
        self.timings: dict[str, float] = {}
        self.fingerprints = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.fingerprints = json.load(f)

    def fingerprint(self, cmd: list[str], files: list[str], after: list[str]) -> str:
        h = hashlib.sha256(json.dumps(cmd).encode())
        for path in files:
            with open(path, "rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
        for name in after:
            h.update(self.fingerprints[name].encode())
        return h.hexdigest()[:16]

    def run(
        self,
        name: str,
        cmd: list[str],
        done: str,
        log: str,
        files: list[str] = (),
        after: list[str] = (),
        clear: str | None = None,
    ):
        """Run ``cmd`` (output to ``log``) unless ``done`` exists with the same fingerprint; record its seconds.
        ``clear``: the stage's output directory, removed before a rerun (its tools refuse a changed config)."""
        fp = self.fingerprint(cmd, list(files), list(after))
        if not self.force and os.path.exists(done) and self.fingerprints.get(name) == fp:
            print(f"[{name}] up to date ({done})", flush=True)
            return
        if clear and os.path.isdir(clear):
            shutil.rmtree(clear)
        step(name, cmd, done, log, self.cores, self.timings)
        self.fingerprints[name] = fp
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.fingerprints, f, indent=1)
        os.replace(self.path + ".tmp", self.path)


def step(name: str, cmd: list[str], done: str, log: str, cores: int, timings: dict) -> None:
    """Run ``cmd`` (output to ``log``); fail with the log's tail unless it exits 0 and writes ``done``."""
    if os.path.exists(done):
        os.remove(done)  # a stale output must not pass for this run's
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


def corpus_stage(st: Stages, data: str, seed: int, corpus_cfg: str, logs: str) -> None:
    """jobs/build_longtail.py into ``data`` (stage ``corpus``)."""
    st.run(
        "corpus",
        [sys.executable, "jobs/build_longtail.py", "--out", data, "--config", corpus_cfg, "--seed", str(seed)],
        os.path.join(data, "summary.json"),
        f"{logs}/corpus.log",
        files=[corpus_cfg],
    )


def cluster_stage(st: Stages, name: str, src: list[str], run: str, seed: int, logs: str, *extra: str, after=()) -> None:
    """The clustering job on the corpus files ``src`` into ``run``; its fingerprint covers the files and the job
    config (the corpus's content, not its stage: new probes alone do not re-cluster)."""
    st.run(
        name,
        cluster_cmd(src, run, seed, st.cores, *extra),
        os.path.join(run, "manifest.json"),
        f"{logs}/{name.replace(' ', '_')}.log",
        files=[*src, f"{CONFIGS}/job.yaml"],
        after=list(after),
        clear=run,
    )


def train_stage(
    st: Stages, model: str, config: str, run: str, mdir: str, steps: int, seed: int, logs: str, after, *sets
):
    """train/main.py (``train_cmd``) as stage ``train MODEL``, into ``mdir``."""
    st.run(
        f"train {model}",
        train_cmd(config, run, mdir, steps, seed, *sets),
        os.path.join(mdir, "export", "meta.json"),
        f"{logs}/train_{model}.log",
        files=[config],
        after=list(after),
        clear=mdir,
    )


def run_seed(
    out: str,
    seed: int,
    epochs: float,
    cores: int,
    force: bool = False,
    until: str = "evaluate",
    corpus_cfg: str = f"{CONFIGS}/corpus.yaml",
    models: tuple[str, ...] = MODELS,
    context: bool = True,
) -> dict:
    """The chain for one seed; returns {model: evaluation JSON} plus timings and training figures."""
    d = os.path.join(out, f"seed{seed}")
    data, run, logs = os.path.join(d, "data"), os.path.join(d, "run"), os.path.join(d, "logs")
    os.makedirs(logs, exist_ok=True)
    st = Stages(d, cores, force)
    corpus_stage(st, data, seed, corpus_cfg, logs)
    with open(os.path.join(data, "summary.json")) as f:
        corpus = json.load(f)
    files, mix = job_input(data, corpus)  # a mix corpus: the news once, the facts --passes times
    cluster_stage(st, "cluster", files, run, seed, logs, *mix)
    manifest = read_manifest(run)
    batch = 16  # every configs/longtail/*.yaml trains on batches of 16 sequences: equal tokens per step
    steps = math.ceil(epochs * manifest["sequences"] / batch)
    results = {
        "seed": seed,
        "steps": steps,
        "tokens": steps * batch * manifest["seq_len"],
        "corpus_tokens": manifest["valid_tokens"],  # as packed: with a mix's passes
        "sequences": manifest["sequences"],
        "fact_passes": corpus["config"]["fact_passes"],
        "bbc_train": corpus["config"]["bbc_train"],
        "fresh_passes": corpus["config"].get("fresh_passes", False),
        "mix": corpus["config"].get("mix", False),
        "timings": st.timings,
        "train": {},
    }
    for m in models:
        mdir = os.path.join(d, "models", m)
        train_stage(st, m, f"{CONFIGS}/{m}.yaml", run, mdir, steps, seed, logs, ["cluster"])
        with open(os.path.join(mdir, "metrics.jsonl")) as f:
            metrics = [json.loads(line) for line in f]
        results["train"][m] = {
            "final_loss": metrics[-1]["loss"],
            "tokens_per_s": float(np.median([x["tokens_per_s"] for x in metrics])),
        }
    if until == "train":
        return results
    index_stage(st, "index", run, f"{logs}/index.log", ["cluster"])  # the document index the neighbour vote searches
    # every model is evaluated with this code's routing (index.router.RoutingConfig), whatever its export
    # recorded; the memory model's bare questions also with the linear vote, the rule before rerank
    vote = RoutingConfig()
    rule = ["--vote", vote.vote, "--words", str(vote.words), "--temperature", str(vote.temperature)]
    runs = [(m, "probes", "", ["--heldout", f"{data}/heldout.jsonl"]) for m in models]
    runs += [(m, "probes_context", "_context", []) for m in models if context]
    runs.append(("memory", "probes", "_linear", []))
    for m, probes, suffix, extra in runs:
        mdir = os.path.join(d, "models", m)
        ev = os.path.join(d, "eval", f"{m}{suffix}.json")
        os.makedirs(os.path.dirname(ev), exist_ok=True)
        routing = (["--routing", *ROUTING] if m == "memory" else []) + rule
        if suffix == "_linear":
            routing = ["--routing", "neighbours", "--vote", "linear"]
        st.run(
            f"evaluate {m}{suffix}",
            [
                sys.executable,
                "-m",
                "train.evaluate",
                "--model",
                f"{mdir}/export",
                "--run",
                run,
                "--probes",
                f"{data}/{probes}.jsonl",
                *extra,
                *routing,
                "--out",
                ev,
            ],
            ev,
            f"{logs}/evaluate_{m}{suffix}.log",
            files=[
                f"{data}/{probes}.jsonl",
                f"{data}/heldout.jsonl",
                *(os.path.join(ROOT, f) for f in ("train/evaluate.py", "index/router.py", "index/terms.py")),
            ],
            after=[f"train {m}", "index"],
        )
        with open(ev) as f:
            results[m + suffix] = json.load(f)
    return results


def mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def probe_table(per_seed: list[dict], suffix: str) -> dict:
    """Mean over seeds of accuracy per (row, bucket), plus the per-seed values; routing figures per mode."""
    mem = [s["memory" + suffix]["probes"] for s in per_seed]
    trained = set(per_seed[0]["train"]) | {"memory_linear"}
    n_buckets = len(mem[0]["buckets"])
    acc = {}
    for label, model, setting in (r for r in rows(bare=not suffix) if r[1] in trained):
        per = [
            [s[model + suffix]["probes"]["buckets"][b]["accuracy"].get(setting) for b in range(n_buckets)]
            for s in per_seed
        ]
        acc[label] = {
            "buckets": [mean(p[b] for p in per) for b in range(n_buckets)],
            "per_seed": per,
            "all": mean(s[model + suffix]["probes"]["accuracy"].get(setting) for s in per_seed),
        }
    buckets = [
        {
            "frequency_range": [
                min(m["buckets"][b]["frequency_range"][0] for m in mem),
                max(m["buckets"][b]["frequency_range"][1] for m in mem),
            ],
            "probes": int(sum(m["buckets"][b]["probes"] for m in mem) / len(mem)),
            "entities": int(sum(m["buckets"][b]["entities"] for m in mem) / len(mem)),
        }
        for b in range(n_buckets)
    ]
    routing = {
        mode: {
            key: {
                "buckets": [mean(m["buckets"][b][key + "_by_mode"][mode] for m in mem) for b in range(n_buckets)],
                "per_seed": [[m["buckets"][b][key + "_by_mode"][mode] for b in range(n_buckets)] for m in mem],
            }
            for key in ("routing_agreement", "oracle_leaf")
        }
        for mode in ROUTING
    }
    if not suffix:  # the linear vote's routes, from its own evaluation of the same model
        lin = [s["memory_linear"]["probes"] for s in per_seed]
        routing["neighbours, linear vote"] = {
            key: {
                "buckets": [
                    mean(m["buckets"][b][key + "_by_mode"]["neighbours"] for m in lin) for b in range(n_buckets)
                ],
                "per_seed": [[m["buckets"][b][key + "_by_mode"]["neighbours"] for b in range(n_buckets)] for m in lin],
            }
            for key in ("routing_agreement", "oracle_leaf")
        }
    cost = {mode: mean(m["fetch_cost"][mode] for m in mem) for mode in ROUTING}  # the rerank vote's
    return {
        "buckets": buckets,
        "accuracy": acc,
        "routing": routing,
        "fetch_cost": cost,
        "blocked_bank_share": mean(m["blocked_bank_share"] for m in mem),
    }


def aggregate(per_seed: list[dict]) -> dict:
    """Mean over seeds: bare-question and context-prefixed probe tables, perplexities, training figures."""
    ppl = {}
    trained = list(per_seed[0]["train"])
    for model in trained:
        for setting in per_seed[0][model]["perplexity"]:
            ppl[f"{model}: {setting}"] = {
                k: mean(s[model]["perplexity"][setting][k] for s in per_seed)
                for k in per_seed[0][model]["perplexity"][setting]
            }
            ppl[f"{model}: {setting}"]["per_seed"] = [s[model]["perplexity"][setting]["all"] for s in per_seed]
    models = {m: per_seed[0][m]["model"] for m in trained}
    train = {m: {k: mean(s["train"][m][k] for s in per_seed) for k in ("final_loss", "tokens_per_s")} for m in trained}
    return {
        "seeds": [s["seed"] for s in per_seed],
        "steps": per_seed[0]["steps"],
        "tokens": per_seed[0]["tokens"],
        "fact_passes": per_seed[0]["fact_passes"],
        "bbc_train": per_seed[0]["bbc_train"],
        "fresh_passes": per_seed[0]["fresh_passes"],
        "mix": per_seed[0].get("mix", False),
        "corpus_tokens": mean(s["corpus_tokens"] for s in per_seed),
        "routing_modes": list(ROUTING),
        "vote": dataclasses.asdict(RoutingConfig()),
        "bare": probe_table(per_seed, ""),
        "context": probe_table(per_seed, "_context") if "memory_context" in per_seed[0] else None,
        "perplexity": ppl,
        "models": models,
        "train": train,
        "timings": [s["timings"] for s in per_seed],
    }


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def accuracy_md(t: dict, seeds: list[int], title: str) -> list[str]:
    b = t["buckets"]
    head = [
        f"f {x['frequency_range'][0]}-{x['frequency_range'][1]} ({x['entities']} ent., {x['probes']} pr.)" for x in b
    ]
    lines = [title, "", "| model / memory | " + " | ".join(head) + " | all |", "|---" * (len(head) + 2) + "|"]
    for label, row in t["accuracy"].items():
        lines.append(f"| {label} | " + " | ".join(pct(x) for x in row["buckets"]) + f" | {pct(row['all'])} |")
    for key, what in (("routing_agreement", "routing agreement"), ("oracle_leaf", "route = oracle leaf")):
        for mode, r in t["routing"].items():
            lines.append(f"| {what} ({mode}) | " + " | ".join(pct(x) for x in r[key]["buckets"]) + " | |")
    lines += [
        "",
        f"Per seed, rarest bucket ({head[0]}):",
        "",
        "| seed | " + " | ".join(t["accuracy"]) + " | " + " | ".join(f"agreement ({m})" for m in t["routing"]) + " |",
        "|---" * (1 + len(t["accuracy"]) + len(t["routing"])) + "|",
    ]
    for i, seed in enumerate(seeds):
        lines.append(
            f"| {seed} | "
            + " | ".join(pct(row["per_seed"][i][0]) for row in t["accuracy"].values())
            + " | "
            + " | ".join(pct(r["routing_agreement"]["per_seed"][i][0]) for r in t["routing"].values())
            + " |"
        )
    lines += [
        "",
        "Fetched memory per probe relative to one path: "
        + ", ".join(f"{m} {c:.2f}x" for m, c in t["fetch_cost"].items())
        + f". Blocking disables on average {100 * t['blocked_bank_share']:.1f}% of the tree's blocks per probe.",
        "",
    ]
    return lines


def markdown(r: dict) -> str:
    lines = [
        f"Long-tail benchmark: seeds {r['seeds']}, {r['steps']} steps = {r['tokens']:,} training tokens per model "
        f"({r['tokens'] / r['corpus_tokens']:.1f} epochs of {r['corpus_tokens']:.0f} packed tokens: {r['bbc_train']} "
        f"BBC articles once, the facts part {r['fact_passes']}x, "
        + (
            "each pass a fresh rendering: no identical documents)."
            if r["fresh_passes"]
            else "through the job's data mix (--passes): every document once in the corpus, the tree and the index)."
            if r.get("mix")
            else "as identical copies)."
        ),
        "",
        "Models: "
        + "; ".join(
            f"{m} {v['anchor_params'] / 1e6:.2f}M"
            + (
                f" + {v['fetched_params'] / 1e6:.3f}M fetched of a {v['bank_params'] / 1e6:.2f}M bank"
                if "bank_params" in v
                else ""
            )
            for m, v in r["models"].items()
        ),
        "",
        f"Routing modes (index/router.py): {', '.join(r['routing_modes'])}; the first is the headline; every "
        f"mode with the {r['vote']['vote']} vote (words {r['vote']['words']}, temperature "
        f"{r['vote']['temperature']}) unless marked linear. Routing "
        "agreement = share of the entity's training documents in the probe's leaf; route = oracle leaf = share "
        "of probes routed to the leaf holding most of the entity's documents.",
        "",
    ]
    lines += accuracy_md(
        r["bare"],
        r["seeds"],
        '**Bare questions** (the primary table: "The atomic number of iron is"), '
        f"exact-match accuracy (%) per entity-frequency bucket, mean of seeds (f = distinct documents "
        f"about the entity, each read {r['fact_passes']}x):",
    )
    if r["context"]:
        lines += accuracy_md(
            r["context"],
            r["seeds"],
            "**Context-prefixed questions** (second table: each question "
            "after one of the entity's own document openings, \"Iron is a transition metal. The atomic "
            "number of iron is\", which hands the router the answer's neighbourhood):",
        )
    lines += [
        "Held-out perplexity (held-out documents routed by each mode; generic@l / off@l: level l swapped for "
        "the generic block / disabled):",
        "",
    ]
    cols = sorted({k for v in r["perplexity"].values() for k in v if k != "per_seed"}, key=lambda k: (k != "all", k))
    lines += ["| model: memory | " + " | ".join(cols) + " | all, per seed |", "|---" * (len(cols) + 2) + "|"]
    for name, row in r["perplexity"].items():
        lines.append(
            f"| {name} | "
            + " | ".join("-" if row.get(c) is None else f"{row[c]:.2f}" for c in cols)
            + " | "
            + " / ".join(f"{x:.2f}" for x in row["per_seed"])
            + " |"
        )
    lines += [
        "",
        "Training: "
        + "; ".join(
            f"{m} final loss {v['final_loss']:.3f}, {v['tokens_per_s']:.0f} tokens/s" for m, v in r["train"].items()
        ),
    ]
    lines.append("Stage seconds: " + json.dumps(r["timings"]))
    lines.append(machine_line(r.get("machine")))
    return "\n".join(lines)


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    t = r["bare"]
    labels = [f"{x['frequency_range'][0]}-{x['frequency_range'][1]}" for x in t["buckets"]]
    shown = [
        "dense anchor",
        ROUTED,
        "anchor + memory, routed (descent)",
        "anchor + memory, oracle leaf",
        BLOCKED,
        "dense 2x",
    ]
    shown = [label for label in shown if label in t["accuracy"]]
    w = 0.8 / len(shown)
    for i, label in enumerate(shown):
        ys = [100 * (y or 0) for y in t["accuracy"][label]["buckets"]]
        ax.bar(np.arange(len(labels)) + (i - len(shown) / 2 + 0.5) * w, ys, w, label=label)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("entity frequency in the corpus (documents)")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title("Long-tail facts, bare questions")
    ax.legend(fontsize=8)
    names = [
        "anchor: none",
        "memory: fetched",
        "memory: fetched[descent]",
        "memory: generic",
        "memory: none",
        "dense2x: none",
    ]
    names = [n for n in names if n in r["perplexity"]]
    bx.bar(range(len(names)), [r["perplexity"][n]["all"] for n in names], color=[f"C{i}" for i in range(len(names))])
    bx.set_xticks(range(len(names)), [n.replace(": ", "\n") for n in names], fontsize=7)
    bx.set_ylabel("held-out perplexity")
    bx.set_title("Perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/longtail")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument(
        "--epochs",
        type=float,
        default=1.0,
        help="passes over the run's sequences (equal for all models); the corpus already repeats the "
        "facts (configs/longtail/corpus.yaml fact_passes)",
    )
    ap.add_argument(
        "--corpus",
        default=f"{CONFIGS}/corpus.yaml",
        help="corpus config (corpora/longtail.py LongtailConfig); configs/longtail/corpus_mix.yaml: each "
        "document once, the facts read 16x through the job's data mix; corpus_fresh.yaml: 16 renderings",
    )
    ap.add_argument(
        "--models",
        nargs="+",
        choices=MODELS,
        default=list(MODELS),
        help="models to train and evaluate (the memory model is needed)",
    )
    ap.add_argument("--no-context", action="store_true", help="skip the context-prefixed questions' table")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="rerun every stage, fingerprints or not")
    ap.add_argument(
        "--until",
        choices=("train", "evaluate"),
        default="evaluate",
        help="stop after training every seed's models (then rerun without it to evaluate)",
    )
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out)
    t = time.time()
    per_seed = [
        run_seed(
            out,
            s,
            args.epochs,
            args.cores,
            args.force,
            args.until,
            os.path.abspath(args.corpus),
            tuple(args.models),
            not args.no_context,
        )
        for s in args.seeds
    ]
    if args.until == "train":
        print(f"trained seeds {args.seeds} in {(time.time() - t) / 60:.1f} min")
        return 0
    r = aggregate(per_seed)
    r["wall_seconds"] = round(time.time() - t, 1)
    r["load_average"] = os.getloadavg()
    r["machine"] = machine()
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(r, f, indent=1)
    md = markdown(r)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md + "\n")
    plot(r, os.path.join(out, "longtail.png"))
    print(md)
    acc = {label: row["buckets"][0] for label, row in r["bare"]["accuracy"].items()}
    agree = r["bare"]["routing"][ROUTING[0]]["routing_agreement"]["buckets"][0]
    ppl = {s: r["perplexity"][f"memory: {s}"]["all"] for s in ("fetched", "fetched[descent]", "generic", "none")}
    print(
        f"bare questions, rarest bucket: dense anchor {pct(acc.get('dense anchor'))}%, memory routed ({ROUTING[0]}) "
        f"{pct(acc[ROUTED])}% (descent {pct(acc['anchor + memory, routed (descent)'])}%, oracle "
        f"{pct(acc['anchor + memory, oracle leaf'])}%, blocked {pct(acc[BLOCKED])}%, linear vote "
        f"{pct(acc[LINEAR])}%), dense 2x {pct(acc.get('dense 2x'))}%; agreement {pct(agree)}%; ppl "
        "fetched/descent/generic/none "
        f"{ppl['fetched']:.2f}/{ppl['fetched[descent]']:.2f}/{ppl['generic']:.2f}/{ppl['none']:.2f} "
        f"(dense anchor {r['perplexity'].get('anchor: none', {}).get('all', float('nan')):.2f}); "
        f"{r['wall_seconds'] / 60:.1f} min"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
