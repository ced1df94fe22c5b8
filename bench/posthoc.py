"""Post-hoc memory: does FFN memory added to a frozen pretrained model learn rare facts without forgetting?

Per seed, via the real CLIs (bench/longtail.py's corpus and configs):
1. the long-tail corpus (jobs/build_longtail.py); its BBC articles alone -> the Spark job -> a dense
   anchor pretrained on them (configs/longtail/anchor.yaml, --pretrain-epochs), so the facts are new to it;
   exported as a transformers Llama checkpoint (hmem-hf export);
2. the whole long-tail corpus -> the Spark job packed with that checkpoint's tokenizer (--tokenizer DIR);
3. FFN memory on the frozen checkpoint (model.hf, recipe memory_only: configs/longtail/posthoc.yaml) and
   4. the fair dense baseline, a full fine-tune of the same base (anchor_only from the BBC anchor), both
   for --epochs over the long-tail run: the same tokens in the same order;
5. python -m train.evaluate on each. The base row is the memory model with no memory: the frozen
   checkpoint itself (its BBC perplexity is also measured on the BBC run, as the project anchor, to
   show the export is exact).

    python -m bench.posthoc [--out runs/posthoc] [--seeds 0] [--epochs 1] [--pretrain-epochs 3] [--cores 2]

Writes OUT/results.md and OUT/results.json. Stages are fingerprinted as in bench/longtail.py: an interrupted
run resumes, a changed config or corpus reruns what depends on it. The last line is
the headline: rarest-bucket accuracy (base, base + memory, dense fine-tune) and held-out BBC perplexity.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from bench.longtail import CONFIGS, Stages, cluster_cmd, mean, pct, train_cmd
from index.rundir import read_manifest

# table rows: (label, model, memory setting of train.evaluate)
ROWS = [
    ("base (frozen, no memory)", "memory", "none"),
    ("base + memory, routed", "memory", "fetched"),
    ("base + memory, routed by descent", "memory", "fetched[descent]"),
    ("base + memory, oracle leaf", "memory", "oracle"),
    ("base + memory, blocked", "memory", "blocked"),
    ("base + memory, generic", "memory", "generic"),
    ("dense fine-tune", "finetune", "none"),
]
PPL_ROWS = [
    ("base (frozen)", "memory", "none"),
    ("base + memory, routed", "memory", "fetched"),
    ("base + memory, generic", "memory", "generic"),
    ("dense fine-tune", "finetune", "none"),
]


def run_seed(out: str, seed: int, epochs: float, pretrain_epochs: float, cores: int, force: bool) -> dict:
    d = os.path.join(out, f"seed{seed}")
    data, logs, models, ev = (os.path.join(d, x) for x in ("data", "logs", "models", "eval"))
    for x in (logs, ev):
        os.makedirs(x, exist_ok=True)
    st = Stages(d, cores, force)
    st.run(
        "corpus",
        [
            sys.executable,
            "jobs/build_longtail.py",
            "--out",
            data,
            "--config",
            f"{CONFIGS}/corpus.yaml",
            "--seed",
            str(seed),
        ],
        os.path.join(data, "summary.json"),
        f"{logs}/corpus.log",
        files=[f"{CONFIGS}/corpus.yaml"],
    )
    bbc = os.path.join(data, "bbc_train.jsonl")  # the base's pretraining corpus: the BBC articles alone
    with open(os.path.join(data, "train.jsonl")) as f, open(bbc + ".tmp", "w") as g:
        g.writelines(line for line in f if json.loads(line)["source"] == "bbc")
    os.replace(bbc + ".tmp", bbc)

    def cluster(name: str, src: str, run: str, files: list[str], *extra: str) -> dict:
        st.run(
            name,
            cluster_cmd(src, run, seed, cores, *extra),
            os.path.join(run, "manifest.json"),
            f"{logs}/{name.replace(' ', '_')}.log",
            files=[src, f"{CONFIGS}/job.yaml", *files],
            clear=run,
        )
        return read_manifest(run)

    def train(name: str, config: str, run: str, mdir: str, steps: int, after: list[str], *sets: str) -> dict:
        st.run(
            name,
            train_cmd(config, run, mdir, steps, seed, *sets),
            os.path.join(mdir, "export", "meta.json"),
            f"{logs}/{name.replace(' ', '_')}.log",
            files=[config],
            after=after,
            clear=mdir,
        )
        with open(os.path.join(mdir, "metrics.jsonl")) as f:
            last = [json.loads(line) for line in f][-1]
        return {"final_loss": last["loss"], "steps": steps}

    def evaluate(name: str, model: str, run: str, after: list[str], *extra: str) -> dict:
        out = f"{ev}/{name}.json"
        st.run(
            f"evaluate {name}",
            [
                sys.executable,
                "-m",
                "train.evaluate",
                "--model",
                model,
                "--run",
                run,
                "--heldout",
                f"{data}/heldout.jsonl",
                "--out",
                out,
                *extra,
            ],
            out,
            f"{logs}/evaluate_{name}.log",
            files=[f"{data}/heldout.jsonl", f"{data}/probes.jsonl"],
            after=after,
        )
        with open(out) as f:
            return json.load(f)

    batch = 16  # configs/longtail/*.yaml: 16 sequences per step
    bbc_run = os.path.join(d, "run_bbc")
    m_bbc = cluster("cluster bbc", bbc, bbc_run, [])
    pre_steps = math.ceil(pretrain_epochs * m_bbc["sequences"] / batch)
    base = os.path.join(models, "base")
    result = {
        "seed": seed,
        "train": {"base": train("pretrain base", f"{CONFIGS}/anchor.yaml", bbc_run, base, pre_steps, ["cluster bbc"])},
    }
    hf_dir = os.path.join(models, "base_hf")
    st.run(
        "export base",
        [sys.executable, "-m", "train.hf_cli", "export", "--model", f"{base}/export", "--out", hf_dir],
        os.path.join(hf_dir, "model.safetensors"),
        f"{logs}/export_base.log",
        after=["pretrain base"],
        clear=hf_dir,
    )

    lt_run = os.path.join(d, "run")
    m = cluster(
        "cluster longtail",
        f"{data}/train.jsonl",
        lt_run,
        [os.path.join(hf_dir, "tokenizer.json")],
        "--tokenizer",
        hf_dir,
    )
    # the document index the memory model's neighbour vote searches (its recorded routing)
    st.run(
        "index",
        [sys.executable, "jobs/build_index.py", "--run", lt_run],
        os.path.join(lt_run, "index", "index.json"),
        f"{logs}/index.log",
        after=["cluster longtail"],
        clear=os.path.join(lt_run, "index"),
    )
    steps = math.ceil(epochs * m["sequences"] / batch)
    result["train"]["memory"] = train(
        "train memory",
        f"{CONFIGS}/posthoc.yaml",
        lt_run,
        f"{models}/memory",
        steps,
        ["cluster longtail", "export base"],
        f"model.hf={hf_dir}",
    )
    result["train"]["finetune"] = train(
        "train finetune",
        f"{CONFIGS}/anchor.yaml",
        lt_run,
        f"{models}/finetune",
        steps,
        ["cluster longtail", "pretrain base"],
        f"recipe.init_anchor={base}/export",
    )
    probes = ["--probes", f"{data}/probes.jsonl"]
    result["memory"] = evaluate(
        "memory",
        f"{models}/memory/export",
        lt_run,
        ["train memory", "index"],
        *probes,
        "--routing",
        "neighbours",
        "descent",
    )
    result["finetune"] = evaluate("finetune", f"{models}/finetune/export", lt_run, ["train finetune"], *probes)
    result["base_on_bbc_run"] = evaluate("base", f"{base}/export", bbc_run, ["pretrain base"])
    result.update(
        timings=st.timings,
        pretrain_tokens=pre_steps * batch * m_bbc["seq_len"],
        tokens=steps * batch * m["seq_len"],
        corpus_tokens=m["tokens"],
        bbc_tokens=m_bbc["tokens"],
    )
    return result


def aggregate(per_seed: list[dict]) -> dict:
    n = len(per_seed[0]["memory"]["probes"]["buckets"])
    acc = {
        label: {
            "buckets": [
                mean(s[model]["probes"]["buckets"][b]["accuracy"].get(setting) for s in per_seed) for b in range(n)
            ],
            "all": mean(s[model]["probes"]["accuracy"].get(setting) for s in per_seed),
        }
        for label, model, setting in ROWS
    }
    buckets = [
        {
            "frequency_range": per_seed[0]["memory"]["probes"]["buckets"][b]["frequency_range"],
            "probes": per_seed[0]["memory"]["probes"]["buckets"][b]["probes"],
        }
        for b in range(n)
    ]
    ppl = {
        label: {
            k: mean(s[model]["perplexity"][setting].get(k) for s in per_seed)
            for k in per_seed[0][model]["perplexity"][setting]
        }
        for label, model, setting in PPL_ROWS
    }
    ppl["base as the project anchor (BBC run)"] = {
        k: mean(s["base_on_bbc_run"]["perplexity"]["none"].get(k) for s in per_seed)
        for k in per_seed[0]["base_on_bbc_run"]["perplexity"]["none"]
    }
    return {
        "seeds": [s["seed"] for s in per_seed],
        "buckets": buckets,
        "accuracy": acc,
        "perplexity": ppl,
        "train": {
            m: {k: mean(s["train"][m][k] for s in per_seed) for k in ("final_loss", "steps")}
            for m in per_seed[0]["train"]
        },
        "models": {m: per_seed[0][m]["model"] for m in ("memory", "finetune")},
        "tokens": per_seed[0]["tokens"],
        "pretrain_tokens": per_seed[0]["pretrain_tokens"],
        "timings": [s["timings"] for s in per_seed],
    }


def markdown(r: dict) -> str:
    b = r["buckets"]
    head = [f"f {x['frequency_range'][0]}-{x['frequency_range'][1]} ({x['probes']} pr.)" for x in b]
    mem = r["models"]["memory"]
    lines = [
        f"Post-hoc memory: seeds {r['seeds']}. Base: the dense anchor pretrained on BBC only "
        f"({r['pretrain_tokens']:,} tokens), exported as a transformers Llama checkpoint and frozen; memory "
        f"({mem['fetched_params'] / 1e6:.3f}M fetched of a {mem['bank_params'] / 1e6:.2f}M bank on a "
        f"{mem['anchor_params'] / 1e6:.2f}M base) and the dense fine-tune each trained on the same "
        f"{r['tokens']:,} long-tail tokens.",
        "",
        "Exact-match accuracy (%) per entity-frequency bucket (rarest first):",
        "",
        "| model / memory | " + " | ".join(head) + " | all |",
        "|---" * (len(head) + 2) + "|",
    ]
    for label, row in r["accuracy"].items():
        lines.append(f"| {label} | " + " | ".join(pct(x) for x in row["buckets"]) + f" | {pct(row['all'])} |")
    cols = ["bbc", "all"]
    lines += [
        "",
        "Held-out perplexity (bbc: the 40 held-out BBC articles, forgetting; all: with the held-out facts documents):",
        "",
        "| model | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for name, row in r["perplexity"].items():
        lines.append(f"| {name} | " + " | ".join("-" if row.get(c) is None else f"{row[c]:.3f}" for c in cols) + " |")
    lines += [
        "",
        "Training: "
        + "; ".join(f"{m} {v['steps']:.0f} steps, final loss {v['final_loss']:.3f}" for m, v in r["train"].items()),
        "Stage seconds: " + json.dumps(r["timings"]),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/posthoc")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epochs", type=float, default=1.0, help="passes over the long-tail run (memory and fine-tune)")
    ap.add_argument("--pretrain-epochs", type=float, default=3.0, help="passes over the BBC run (the base)")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="rerun every stage (code is not fingerprinted)")
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out)
    t = time.time()
    r = aggregate([run_seed(out, s, args.epochs, args.pretrain_epochs, args.cores, args.force) for s in args.seeds])
    r.update(wall_seconds=round(time.time() - t, 1), load_average=os.getloadavg())
    md = markdown(r)
    for name, text in (("results.json", json.dumps(r, indent=1)), ("results.md", md + "\n")):
        with open(os.path.join(out, name), "w") as f:
            f.write(text)
    print(md)
    rare = {label: r["accuracy"][label]["buckets"][0] for label, _, _ in ROWS}
    ft, mem = rare["dense fine-tune"], rare["base + memory, routed"]
    ppl = r["perplexity"]
    print(
        f"rarest bucket accuracy: base {pct(rare['base (frozen, no memory)'])}%, base + memory routed {pct(mem)}% "
        f"(oracle {pct(rare['base + memory, oracle leaf'])}%, blocked {pct(rare['base + memory, blocked'])}%), "
        f"dense fine-tune {pct(ft)}% (ratio {'inf' if not ft else f'{mem / ft:.2f}'}x); held-out BBC ppl base "
        f"{ppl['base (frozen)']['bbc']:.3f}, +memory routed {ppl['base + memory, routed']['bbc']:.3f} / generic "
        f"{ppl['base + memory, generic']['bbc']:.3f}, fine-tune {ppl['dense fine-tune']['bbc']:.3f}; "
        f"{r['wall_seconds'] / 60:.1f} min"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
