"""Post-hoc memory on a real pretrained model: does FFN memory on the FROZEN base learn facts it lacks, without
forgetting what it knows? Against a LoRA of the fetched memory's size and a full fine-tune, at equal tokens.

    python -m bench.posthoc [--base models/smollm2-135m] [--out runs/posthoc] [--seed 0]
        [--sizes 100 | --corpus countries] [--epochs 12]
        [--sweep METHOD=LR,LR ... (default: SWEEP below)]
        [--memory-ranks 2 3] [--methods memory lora] [--bf16] [--cores 2] [--force]

Per seed, via the real CLIs (``make smollm2`` makes the base):
1. new facts: synthetic people (configs/posthoc/people.yaml, jobs/build_longtail.py), ``--sizes`` of them per
   capacity point; their probes split by entity into a validation fifth (learning rates) and a test rest.
   ``--corpus countries`` (configs/posthoc/countries.yaml, results in OUT/countries) trains on a real
   long-tail domain instead: the countries' ISO codes, about the same countries as the known facts below;
2. the Spark job packs them with the base's tokenizer (configs/posthoc/job.yaml), ``hmem-index`` indexes them;
3. known facts: element symbols, and countries' capitals (both ways), continents, languages and currencies that
   the base answers right, found by running the base (``retention.jsonl``), a fourth of them to validate on;
4. per method and learning rate (the sweep at the first size only; later sizes use the learning rate with
   the best validation accuracy): FFN memory (train/main.py, recipe memory_only, configs/posthoc/memory.yaml),
   LoRA on q, v, gate, up, down with the rank that matches the fetched memory's parameters, and a full
   fine-tune (``finetune`` below: the run's packed sequences, same batch, steps and schedule);
5. the memory's far threshold (``routing.far``: a prompt whose nearest training document scores below it
   fetches no memory), chosen on the validation probes, new facts and known ones alike (``choose_far``);
6. ``hmem-evaluate`` on every model: test probes per frequency bucket (memory: routed with and without the
   far threshold, oracle leaf, blocked, generic, none = the base), the known facts, and held-out BBC perplexity.
``--memory-ranks`` shrinks the memory (and with it the LoRA's rank) below configs/posthoc/memory.yaml's: the same
facts on a tenth of the parameters load each parameter as ten times the facts would, a capacity point that costs
no more CPU than the first; ``--methods`` leaves out methods the change does not touch (the full fine-tune).
``--bf16`` runs every method's training forward under bf16 autocast with fp32 weights (the trainer's
``deepspeed.bf16`` on a frozen base); it pays on a CPU with native bf16 (AVX512-BF16, AMX) and is many times
slower without. Evaluation stays fp32. Give it its own ``--out``: seeds pool only with seeds of one precision.
Also ``speed``: the frozen base's forward+backward tokens/s, measured in this invocation, against the memory
training's logged tokens/s; with ``--bf16`` it times fp32 and bf16 autocast alternately and reports the logits'
difference between the two on the same batch.

Writes OUT/results_seedS.{md,json} and OUT/results.md (the seeds pooled); stages resume as in bench/longtail.py.
The last line is the headline: rarest-bucket accuracy at the largest size and the share of known facts kept, per method.

Sub-commands the stages call: ``finetune`` (LoRA / full fine-tune of a transformers model on a run's
sequences, saved as a transformers checkpoint plus an hmem export without memory), ``dense-export`` and
``speed``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections import Counter

import numpy as np

from bench import machine, machine_line
from bench.longtail import BIN, ROOT, Stages, pct
from index.rundir import read_manifest
from pipeline.stages import fmt_duration

CONFIGS = os.path.join(ROOT, "configs", "posthoc")
METHODS = ("memory", "lora", "full")
CORPORA = ("people", "countries")  # configs/posthoc/NAME.yaml: new facts, and a real domain near the known facts
SWEEP = {"memory": [3e-3, 1e-2, 3e-2], "lora": [1e-3, 3e-3, 1e-2], "full": [1e-3, 3e-3, 1e-2]}
BATCH = 8  # configs/posthoc/memory.yaml data.batch_size: every method reads the same sequences per step
LORA_TARGETS = ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
ROWS = [  # (label, method, setting of train.evaluate; fetched applies the far threshold, fetched[always] does not)
    ("base (frozen, no memory)", "memory", "none"),
    ("base + memory, routed", "memory", "fetched[always]"),
    ("base + memory, routed, far prompts without memory", "memory", "fetched"),
    ("base + memory, oracle leaf", "memory", "oracle"),
    ("base + memory, blocked", "memory", "blocked"),
    ("base + memory, generic", "memory", "generic"),
    ("LoRA (fetched-size)", "lora", "none"),
    ("full fine-tune", "full", "none"),
]


# ---------------------------------------------------------------- sub-commands


def dense_export(hf_dir: str, run: str, out: str) -> None:
    """An hmem export of a transformers model without memory (train.export.load_model and hmem-evaluate read it)."""
    from train.export import write_meta
    from train.hf import model_config

    m = read_manifest(run)
    os.makedirs(out, exist_ok=True)
    shutil.copy(os.path.join(run, "tokenizer.json"), os.path.join(out, "tokenizer.json"))
    cfg = model_config(hf_dir)
    meta = {k: m[k] for k in ("tree_version", "k", "depth", "seq_len", "eot_id", "pad_id")}
    from dataclasses import asdict

    write_meta(out, dict(meta, model=asdict(cfg), memory=None, routing=None, train=None, step=0, runs=[run]))


def run_sequences(run: str) -> tuple[np.ndarray, np.ndarray]:
    """The run's packed sequences in seq_id order: tokens [N, T+1] and n_valid [N]."""
    import pyarrow.dataset as ds

    t = ds.dataset(os.path.join(run, "shards"), format="parquet", partitioning="hive").to_table(
        columns=["seq_id", "tokens", "n_valid"]
    )
    t = t.sort_by("seq_id")
    return np.array(t["tokens"].to_pylist(), dtype=np.int64), t["n_valid"].to_numpy()


def lora_rank(model, fetched_params: int) -> int:
    """The LoRA rank on LORA_TARGETS whose trainable parameters come closest to ``fetched_params``."""
    per_rank = sum(
        m.in_features + m.out_features
        for name, m in model.named_modules()
        if name.split(".")[-1] in LORA_TARGETS and hasattr(m, "in_features")
    )
    return max(1, round(fetched_params / per_rank))


def finetune(args) -> None:
    """LoRA or full fine-tune on the run's sequences: seeded order per epoch, ``BATCH`` per step, AdamW with
    the trainer's warmup + cosine schedule and clipping, the trainer's masked token loss."""
    import torch
    from transformers import AutoModelForCausalLM

    from train.model import token_nll
    from train.optim import lr_at

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.base, torch_dtype=torch.float32)
    if args.method == "lora":
        from peft import LoraConfig, get_peft_model

        r = lora_rank(model, args.fetched_params)
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=LORA_TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    tokens, n_valid = run_sequences(args.run)
    n, log = len(tokens), []
    order = functools.cache(lambda epoch: np.random.default_rng((args.seed, epoch)).permutation(n))
    t0 = time.time()
    for step in range(1, args.steps + 1):
        first = (step - 1) * BATCH
        rows = [order(i // n)[i % n] for i in range(first, first + BATCH)]
        x = torch.from_numpy(tokens[rows])
        mask = torch.arange(1, x.shape[1])[None, :] < torch.from_numpy(n_valid[rows])[:, None]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):  # fp32 weights either way
            logits = model(input_ids=x[:, :-1]).logits
        loss = (token_nll(logits, x[:, 1:]) * mask).sum() / mask.sum().clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr, args.steps, warmup_steps=10)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 5 == 0 or step == args.steps:
            elapsed = time.time() - t0
            rate = step * BATCH * (x.shape[1] - 1) / elapsed
            log.append({"step": step, "loss": float(loss), "tokens_per_s": rate})
            eta = fmt_duration(elapsed / step * (args.steps - step))
            print(f"step {step}/{args.steps} loss {float(loss):.4f} {rate:.0f} tokens/s, ETA {eta}", flush=True)
    if args.method == "lora":
        model = model.merge_and_unload()
    hf = os.path.join(args.out, "hf")
    model.save_pretrained(hf, safe_serialization=True)
    for f in os.listdir(args.base):
        if f.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(os.path.join(args.base, f), os.path.join(hf, f))
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"trainable_params": sum(p.numel() for p in params), "log": log}, f)
    dense_export(hf, args.run, os.path.join(args.out, "export"))


def speed(args) -> None:
    """Frozen base forward+backward tokens/s (gradient to the hidden states only, as memory training needs),
    on the run's sequences, ``BATCH`` x T, after a warm-up step. With ``--bf16`` the steps alternate between fp32
    and bf16 autocast (the rate reported is bf16's, the precision the trainings ran in), and the logits of the
    two on that batch are compared: largest difference, the fp32 logits' std, and the share of positions whose
    top token agrees."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.base, torch_dtype=torch.float32).requires_grad_(False)
    tokens, _ = run_sequences(args.run)
    x = torch.from_numpy(tokens[:BATCH])
    precisions = ("fp32", "bf16") if args.bf16 else ("fp32",)
    times: dict[str, list[float]] = {p: [] for p in precisions}
    for i in range(args.steps + 1):
        for p in precisions:
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=p == "bf16"):
                h = model.get_input_embeddings()(x[:, :-1]).requires_grad_(True)
                model(inputs_embeds=h).logits.float().logsumexp(-1).mean().backward()
            times[p].append(time.perf_counter() - t)
    rate = {p: BATCH * (x.shape[1] - 1) / float(np.median(t[1:])) for p, t in times.items()}
    out = {"frozen_fwd_bwd_tokens_per_s": rate[precisions[-1]], "step_seconds": times[precisions[-1]][1:]}
    if args.bf16:
        with torch.no_grad():
            exact = model(input_ids=x[:, :-1]).logits
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fast = model(input_ids=x[:, :-1]).logits.float()
        out["fp32_tokens_per_s"] = rate["fp32"]
        out["logits_bf16_vs_fp32"] = {
            "max_abs_diff": float((fast - exact).abs().max()),
            "fp32_std": float(exact.std()),
            "top1_agreement": float((fast.argmax(-1) == exact.argmax(-1)).float().mean()),
        }
    with open(args.out, "w") as f:
        json.dump(out, f)


# ---------------------------------------------------------------- the chain


def split_probes(path: str, every: int) -> tuple[str, str]:
    """NAME.jsonl -> (NAME_val.jsonl, NAME_test.jsonl): one entity in ``every`` (by a hash of its name) validates."""
    with open(path) as f:
        probes = [json.loads(line) for line in f]
    val = lambda p: int(hashlib.sha256(p["entity"].encode()).hexdigest(), 16) % every == 0  # noqa: E731
    out = []
    for name, keep in (("val", True), ("test", False)):
        out.append(path.removesuffix(".jsonl") + f"_{name}.jsonl")
        with open(out[-1], "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in probes if val(p) == keep)
    return out[0], out[1]


def choose_far(*validation: list[dict]) -> dict:
    """routing.far from validation records (hmem-evaluate's, without far): the threshold on a prompt's nearest-
    document score that maximises the mean, over the given probe sets, of their accuracy when a prompt below it
    answers with no memory and the rest with their fetched blocks. The mean changes only at observed scores, so
    the best thresholds form runs between them: the widest run wins and the threshold is its middle (the largest
    margin to the scores on either side). None (never far) when a run reaches below every score."""
    near = lambda r: -math.inf if r["nearest"] is None else r["nearest"]  # noqa: E731
    edges = [-math.inf] + sorted({near(r) for records in validation for r in records} - {-math.inf}) + [math.inf]

    def accuracy(records: list[dict], t: float) -> float:
        return float(np.mean([r["none"] if near(r) < t else r["fetched"] for r in records]))

    def mean(t: float) -> float:  # any t in (edges[i], edges[i + 1]] gives the same value
        return float(np.mean([accuracy(rs, t) for rs in validation]))

    values = [mean(edges[i + 1]) for i in range(len(edges) - 1)]  # per interval (edges[i], edges[i + 1]]
    best = max(values)
    runs, start = [], None
    for i, v in enumerate(values + [-1.0]):
        if v == best and start is None:
            start = i
        elif v != best and start is not None:
            runs.append((edges[start], edges[i]))
            start = None
    lo, hi = max(runs, key=lambda r: r[1] - r[0])
    t = None if lo == -math.inf else (hi if hi == math.inf else (lo + hi) / 2)
    at = -math.inf if t is None else t
    return {
        "far": t,
        "objective": best,
        "never": values[0],
        "accuracy": [accuracy(rs, at) for rs in validation],
        "accuracy_never": [accuracy(rs, -math.inf) for rs in validation],
    }


def known_candidates(path: str) -> None:
    """Retention candidates (hmem-evaluate then says which the base knows): element symbols (mendeleev), and per
    country (countryinfo, names via pycountry) its capital both ways, continent, first official language and
    currency. Probes the base answers in another form ("Pashto" for "Pushto", symbols in quotes) drop out."""
    import pycountry
    from countryinfo import all_countries

    from corpora.longtail import element_entities

    rows = [
        (f"The chemical symbol of {e.name} is", e.probes["symbol"][1], e.name, "symbol") for e in element_entities()
    ]
    for c in all_countries():
        name = c.name()
        if isinstance(c.capital(), str) and c.capital():  # a list names several capitals: no one answer
            rows.append((f"The capital of {name} is", c.capital(), name, "capital"))
            rows.append((f"{c.capital()} is the capital of", name, name, "country_of_capital"))
        if c.region() in ("Africa", "Asia", "Europe"):  # "Americas" / "Oceania" are not what one answers
            rows.append((f"{name} is located on the continent of", c.region(), name, "continent"))
        language = pycountry.languages.get(alpha_2=c.languages()[0]) if c.languages() else None
        if language is not None:
            rows.append((f"The official language of {name} is", language.name, name, "language"))
        currency = pycountry.currencies.get(alpha_3=c.currencies()[0]) if c.currencies() else None
        if currency is not None:
            rows.append((f"The currency of {name} is the", currency.name, name, "currency"))
    with open(path, "w") as f:
        for q, a, entity, fact in rows:
            f.write(json.dumps({"prompt": q, "answer": a, "entity": entity, "frequency": 1, "fact": fact}) + "\n")


def keep_known(evaluation: str, out: str) -> dict[str, int]:
    """Writes the candidates the base answered right to ``out``; returns how many of each kind of fact."""
    with open(evaluation) as f:
        records = json.load(f)["probes"]["records"]
    keep = [r for r in records if r["none"]]
    with open(out, "w") as f:
        for r in keep:
            f.write(json.dumps({k: r[k] for k in ("prompt", "answer", "entity", "frequency", "fact")}) + "\n")
    return dict(sorted(Counter(r["fact"] for r in keep).items()))


class Chain:
    """One seed's stages (bench/longtail.py Stages: fingerprinted, resumable)."""

    def __init__(self, args, seed: int):
        self.args, self.seed = args, seed
        self.d = os.path.join(args.out, f"seed{seed}")
        self.logs = os.path.join(self.d, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.st = Stages(self.d, args.cores, args.force)
        self.base = os.path.abspath(args.base)

    def stage(self, name: str, cmd: list[str], done: str, after=(), files=(), clear=None) -> None:
        log = os.path.join(self.logs, name.replace(" ", "_").replace("=", "") + ".log")
        self.st.run(name, cmd, done, log, files=list(files), after=list(after), clear=clear)

    def data(self, n: int | str) -> tuple[str, str]:
        """The corpus of ``n`` people (or the ``--corpus`` named ``n``), packed and indexed: (data dir, run dir)."""
        data, run = os.path.join(self.d, f"data{n}"), os.path.join(self.d, f"run{n}")
        os.makedirs(data, exist_ok=True)
        import yaml

        with open(os.path.join(CONFIGS, f"{self.args.corpus}.yaml")) as f:
            cfg = dict(yaml.safe_load(f), seed=self.seed)
        if self.args.corpus == "people":
            cfg["people"] = n
        conf = os.path.join(data, "corpus.yaml")
        with open(conf, "w") as f:
            yaml.safe_dump(cfg, f)
        self.stage(
            f"corpus {n}",
            [sys.executable, "jobs/build_longtail.py", "--out", data, "--config", conf],
            os.path.join(data, "summary.json"),
            files=[conf],
        )
        split_probes(os.path.join(data, "probes.jsonl"), 5)
        cmd = [
            f"{BIN}/spark-submit",
            "--master",
            f"local[{self.args.cores}]",
            "--conf",
            "spark.driver.memory=2g",
            "jobs/cluster_corpus.py",
            "--config",
            f"{CONFIGS}/job.yaml",
            "--input",
            f"{data}/train.jsonl",
            "--id-column",
            "id",
            "--seed",
            str(self.seed),
            "--tokenizer",
            self.base,
            "--output",
            run,
        ]
        self.stage(
            f"cluster {n}", cmd, os.path.join(run, "manifest.json"), [f"corpus {n}"], [f"{CONFIGS}/job.yaml"], clear=run
        )
        self.stage(
            f"index {n}",
            [sys.executable, "jobs/build_index.py", "--run", run],
            os.path.join(run, "index", "index.json"),
            [f"cluster {n}"],
            clear=os.path.join(run, "index"),
        )
        return data, run

    def evaluate(
        self, name: str, model: str, run: str, after: list[str], probes: str, heldout: str | None, far=None
    ) -> dict:
        out = os.path.join(self.d, "eval", f"{name}.json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        cmd = [sys.executable, "-m", "train.evaluate", "--model", model, "--run", run, "--probes", probes, "--out", out]
        cmd += ["--heldout", heldout, "--max-docs", "10"] if heldout else []  # 10 articles: ~50 windows
        cmd += ["--far", repr(far)] if far is not None else []
        self.stage(f"evaluate {name}", cmd, out, after, [probes])
        with open(out) as f:
            return json.load(f)

    def train(self, method: str, lr: float, n: int | str, run: str, steps: int, fetched: int) -> tuple[str, str]:
        """(export dir, stage name) of ``method`` at ``lr`` on the run of size ``n``."""
        name = f"{method} {n} lr={lr:g}"
        mdir = os.path.join(self.d, "models", name.replace(" ", "_"))
        if method == "memory":
            cmd = [
                sys.executable,
                "train/main.py",
                "--config",
                f"{CONFIGS}/memory.yaml",
                "--data",
                run,
                "--out",
                mdir,
                "--no-resume",
            ]
            for s in (
                f"model.hf={self.base}",
                *([f"memory.ranks={list(self.args.memory_ranks)}"] if self.args.memory_ranks else []),
                f"optim.memory.lr={lr}",
                f"schedule.max_steps={steps}",
                f"data.seed={self.seed}",
                f"memory.seed={self.seed}",
                *(["deepspeed.bf16=true"] if self.args.bf16 else []),
            ):
                cmd += ["--set", s]
            files = [f"{CONFIGS}/memory.yaml"]
        else:
            cmd = [
                sys.executable,
                "-m",
                "bench.posthoc",
                "finetune",
                "--base",
                self.base,
                "--run",
                run,
                "--out",
                mdir,
                "--method",
                method,
                "--lr",
                str(lr),
                "--steps",
                str(steps),
                "--seed",
                str(self.seed),
                "--fetched-params",
                str(fetched),
                *(["--bf16"] if self.args.bf16 else []),
            ]
            files = []
        self.stage(f"train {name}", cmd, os.path.join(mdir, "export", "meta.json"), [f"index {n}"], files, clear=mdir)
        return os.path.join(mdir, "export"), f"train {name}"


def by_fact(records: list[dict]) -> dict[str, dict[str, float]]:
    """Per evaluation setting, the share of probes answered right per kind of fact."""
    settings = {setting for _, _, setting in ROWS} & set(records[0]) if records else set()
    facts = sorted({r["fact"] for r in records})
    return {s: {f: float(np.mean([r[s] for r in records if r["fact"] == f])) for f in facts} for s in sorted(settings)}


def config_ranks() -> list[int]:
    """configs/posthoc/memory.yaml's memory units per tree level (``--memory-ranks`` overrides them)."""
    import yaml

    with open(os.path.join(CONFIGS, "memory.yaml")) as f:
        return list(yaml.safe_load(f)["memory"]["ranks"])


def fetched_params(base: str, ranks: list[int]) -> int:
    """Parameters a sequence fetches with ``ranks`` on ``base`` (3 x d per FFN unit, one unit per rank per layer)."""
    with open(os.path.join(base, "config.json")) as f:
        hf = json.load(f)
    return sum(ranks) * 3 * hf["hidden_size"] * hf["num_hidden_layers"]


def train_rate(export: str) -> float | None:
    """Median logged tokens/s of the training that wrote ``export`` (the first log line left out: warm-up)."""
    mdir = os.path.dirname(export)
    if os.path.exists(os.path.join(mdir, "metrics.jsonl")):
        with open(os.path.join(mdir, "metrics.jsonl")) as f:
            rates = [json.loads(line)["tokens_per_s"] for line in f]
    else:
        with open(os.path.join(mdir, "metrics.json")) as f:
            rates = [r["tokens_per_s"] for r in json.load(f)["log"]]
    return float(np.median(rates[1:] or rates)) if rates else None


def retention_set(c: Chain, run: str, after: str) -> tuple[str, str, dict, int]:
    """(validation, test probe files, known facts per kind, candidates): the candidates the base answers right, a fourth
    of their entities to choose the memory's ``far`` threshold, the rest to report retention on."""
    base_export = os.path.join(c.d, "models", "base", "export")
    cmd = [sys.executable, "-m", "bench.posthoc", "dense-export", "--hf", c.base, "--run", run, "--out", base_export]
    c.stage("base export", cmd, os.path.join(base_export, "meta.json"), [after], clear=base_export)
    cand = os.path.join(c.d, "known_candidates.jsonl")
    known_candidates(cand)
    ev = c.evaluate("base on known candidates", base_export, run, ["base export"], cand, None)
    retention = os.path.join(c.d, "retention.jsonl")
    known = keep_known(os.path.join(c.d, "eval", "base on known candidates.json"), retention)
    return (*split_probes(retention, 4), known, len(ev["probes"]["records"]))


def run_seed(args, seed: int) -> dict:
    c = Chain(args, seed)
    ranks = args.memory_ranks or config_ranks()
    fetched = fetched_params(c.base, ranks)
    data0, run0 = c.data(args.sizes[0])
    known_val, known_test, n_known, n_cand = retention_set(c, run0, f"index {args.sizes[0]}")
    speed_out = os.path.join(c.d, "speed.json")
    c.stage(
        "speed",
        [sys.executable, "-m", "bench.posthoc", "speed", "--base", c.base, "--run", run0, "--out", speed_out]
        + (["--bf16"] if args.bf16 else []),
        speed_out,
        [f"index {args.sizes[0]}"],
    )
    with open(known_test) as f:
        test_kinds = Counter(json.loads(line)["fact"] for line in f)
    result = {
        "seed": seed,
        "known_by_fact": n_known,
        "known_test_by_fact": dict(sorted(test_kinds.items())),
        "known_candidates": n_cand,
        "fetched_params": fetched,
        "memory_ranks": ranks,
        "methods": list(args.methods),
        "bf16": args.bf16,
        "sizes": {},
    }
    chosen: dict[str, float] = {}
    for n in args.sizes:
        data, run = (data0, run0) if n == args.sizes[0] else c.data(n)
        steps = math.ceil(args.epochs * read_manifest(run)["sequences"] / BATCH)
        size = {"steps": steps, "tokens": steps * BATCH * read_manifest(run)["seq_len"], "methods": {}}
        for method in args.methods:
            setting = "fetched" if method == "memory" else "none"
            sweep = {}
            for lr in args.sweep[method] if n == args.sizes[0] else [chosen[method]]:
                export, trained = c.train(method, lr, n, run, steps, fetched)
                val = c.evaluate(
                    f"{method} {n} lr={lr:g} val", export, run, [trained], f"{data}/probes_val.jsonl", None
                )
                sweep[lr] = {"val": val["probes"], "export": export, "stage": trained}
            lr = chosen.setdefault(method, max(sweep, key=lambda x: sweep[x]["val"]["accuracy"][setting]))
            export, trained = sweep[lr]["export"], sweep[lr]["stage"]
            far, threshold = None, None
            if method == "memory":  # its far threshold, from the validation probes: new facts and known ones
                known_v = c.evaluate(f"memory {n} known val", export, run, [trained], known_val, None)
                far = choose_far(sweep[lr]["val"]["records"], known_v["probes"]["records"])
                threshold = far["far"]
            test = c.evaluate(
                f"{method} {n} test",
                export,
                run,
                [trained],
                f"{data}/probes_test.jsonl",
                f"{data}/heldout.jsonl",
                threshold,
            )
            known = c.evaluate(f"{method} {n} known", export, run, [trained], known_test, None, threshold)
            size["methods"][method] = {
                "far": far,
                "far_share": {"test": test["probes"].get("far_share"), "known": known["probes"].get("far_share")},
                "lr": lr,
                "sweep": {str(k): v["val"]["accuracy"][setting] for k, v in sweep.items()},
                "test": test["probes"],
                "perplexity": test["perplexity"],
                "known": known["probes"]["accuracy"],
                "known_by_fact": by_fact(known["probes"]["records"]),
                "model": test["model"],
                "train_tokens_per_s": train_rate(export),
            }
        result["sizes"][str(n)] = size
    with open(speed_out) as f:
        result["speed"] = json.load(f)
    result["timings"] = c.st.timings
    result["machine"] = machine()
    return result


def markdown(r: dict) -> str:
    lines = [
        f"Post-hoc memory on {r['base']}: seed {r['seed']}, {r['epochs']:g} epochs, batch {BATCH}, "
        f"{'bf16 autocast' if r.get('bf16') else 'fp32'} training. "
        f"Memory ranks {r.get('memory_ranks')}: {r['fetched_params'] / 1e6:.2f}M parameters fetched. Known facts: "
        f"{sum(r['known_by_fact'].values())} of {r['known_candidates']} candidates the base answers right ("
        + ", ".join(f"{k} {v}" for k, v in r["known_by_fact"].items())
        + f"); {sum(r['known_test_by_fact'].values())} of them report retention, the rest choose the far threshold."
    ]
    for n, size in r["sizes"].items():
        mem = size["methods"]["memory"]
        buckets = mem["test"]["buckets"]
        head = [
            f"f {b['frequency_range'][0]}-{b['frequency_range'][1]} ({b['probes']})" for b in buckets if b["probes"]
        ]
        lines += [
            "",
            f"### {corpus_label(n)}: {size['steps']} steps, {size['tokens']:,} tokens per method",
            "",
            "| method | lr | " + " | ".join(head) + " | all | known facts kept | BBC ppl |",
            "|---|---|" + "---|" * (len(head) + 3),
        ]
        for label, method, setting in rows(size):
            m = size["methods"][method]
            acc = [pct(got(b["accuracy"], setting)) for b in m["test"]["buckets"] if b["probes"]]
            known = known_kept(m, setting)
            ppl = got(m["perplexity"], setting) or {}  # oracle / blocked: no held-out perplexity
            ppl = "" if ppl.get("all") is None else f"{ppl['all']:.2f}"
            lr = "" if setting == "none" and method == "memory" else f"{m['lr']:g}"
            all_ = pct(got(m["test"]["accuracy"], setting))
            lines.append(f"| {label} | {lr} | " + " | ".join(acc) + f" | {all_} | {pct(known)} | {ppl} |")
        far = mem["far"]
        lines += [
            "",
            f"Far threshold (nearest-document score below which a prompt fetches no memory), chosen on validation: "
            f"{'none' if far['far'] is None else format(far['far'], '.3f')}; validation accuracy new facts "
            f"{pct(far['accuracy_never'][0])} -> {pct(far['accuracy'][0])}, known facts "
            f"{pct(far['accuracy_never'][1])} -> {pct(far['accuracy'][1])}. Far on test: "
            f"{pct(mem['far_share']['test'])} of the new-fact probes, {pct(mem['far_share']['known'])} of the known.",
        ]
        kinds = r["known_test_by_fact"]
        lines += [
            "",
            "Known facts kept per kind, %:",
            "",
            "| method | " + " | ".join(f"{k} ({n})" for k, n in kinds.items()) + " |",
            "|---|" + "---|" * len(kinds),
        ]
        for label, method, setting in rows(size):
            row = known_kept(size["methods"][method], setting, "known_by_fact") or {}
            lines.append(f"| {label} | " + " | ".join(pct(row.get(k)) for k in kinds) + " |")
        lines.append("")
        lines.append(
            "Sweeps (validation accuracy): "
            + "; ".join(
                f"{m}: "
                + ", ".join(f"{lr} {pct(a)}" for lr, a in v["sweep"].items())
                + (sweep_edge(v) if n == str(r["sizes_list"][0]) else " (the first size's rate)")
                for m, v in size["methods"].items()
            )
        )
    mem_rate = r["sizes"][str(r["sizes_list"][0])]["methods"]["memory"]["train_tokens_per_s"]
    base_rate = r["speed"]["frozen_fwd_bwd_tokens_per_s"]
    lines += [
        "",
        f"Throughput: memory training {mem_rate:.0f} tokens/s vs the frozen base's forward+backward "
        f"{base_rate:.0f} tokens/s: {mem_rate / base_rate:.2f}x. " + machine_line(r.get("machine")),
    ]
    if err := r["speed"].get("logits_bf16_vs_fp32"):
        lines.append(
            f"bf16 autocast: the frozen base's forward+backward {base_rate / r['speed']['fp32_tokens_per_s']:.2f}x "
            f"fp32's in the same invocation; its logits differ from fp32's by at most {err['max_abs_diff']:.3f} "
            f"(fp32 logits' std {err['fp32_std']:.2f}); the top token is the same at {pct(err['top1_agreement'])}% "
            "of positions."
        )
    return "\n".join(lines)


def sweep_edge(method: dict) -> str:
    """A warning when the chosen rate is the sweep's lowest or highest: the best rate may lie outside it."""
    swept = sorted(float(lr) for lr in method["sweep"])
    if len(swept) < 2:
        return " (one rate, not swept)"
    if method["lr"] in (swept[0], swept[-1]):
        return f" (best at the sweep's {'top' if method['lr'] == swept[-1] else 'bottom'}: widen it)"
    return ""


def corpus_label(n: str) -> str:
    return f"{n} people" if str(n).isdigit() else f"the {n} corpus"


def rows(size: dict) -> list[tuple[str, str, str]]:
    """ROWS of the methods a size ran (``--methods``)."""
    return [row for row in ROWS if row[1] in size["methods"]]


def got(by_setting: dict, setting: str):
    """An evaluation's entry for ``setting``; ``fetched[always]`` is ``fetched`` when no far threshold was set."""
    return by_setting.get(setting, by_setting.get("fetched") if setting == "fetched[always]" else None)


def known_kept(method: dict, setting: str, field: str = "known"):
    """A method's known facts kept under ``setting``: overall (``known``) or per kind (``known_by_fact``)."""
    return got(method.get(field, {}), setting)


def headline(r: dict) -> str:
    n = str(r["sizes_list"][-1])
    ms = r["sizes"][n]["methods"]

    def rare(method, setting):  # "-" for a method left out
        return pct(got(ms[method]["test"]["buckets"][0]["accuracy"], setting) if method in ms else None)

    return (
        f"{corpus_label(n)}, rarest bucket: base {rare('memory', 'none')}, memory routed {rare('memory', 'fetched')} "
        f"(always fetched {rare('memory', 'fetched[always]')}, oracle {rare('memory', 'oracle')}), LoRA "
        f"{rare('lora', 'none')}, full fine-tune {rare('full', 'none')}; known facts kept: memory "
        f"{pct(known_kept(ms['memory'], 'fetched'))} (always fetched "
        f"{pct(known_kept(ms['memory'], 'fetched[always]'))}), LoRA "
        f"{pct(known_kept(ms.get('lora', {}), 'none'))}, full {pct(known_kept(ms.get('full', {}), 'none'))}"
    )


def pooled(results: list[dict]) -> str:
    """The seeds' table at their largest size: per method and setting, rarest bucket / all / known facts kept per
    seed and their mean, then the issue's acceptance ratios on the means."""
    n = str(results[0]["sizes_list"][-1])
    seeds = [r["seed"] for r in results]
    lines = [
        f"Post-hoc memory, {corpus_label(n)}, {results[0]['epochs']:g} epochs, seeds {', '.join(map(str, seeds))}: "
        "rarest bucket / all / known facts kept, %",
        "",
        "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
        "|---|" + "---|" * (len(seeds) + 1),
    ]
    means = {}
    for label, method, setting in rows(results[0]["sizes"][n]):
        cells = []
        for r in results:
            m = r["sizes"][n]["methods"][method]
            rare = got(m["test"]["buckets"][0]["accuracy"], setting)
            known = known_kept(m, setting)
            cells.append((rare, got(m["test"]["accuracy"], setting), known))
        mean = tuple(None if None in col else float(np.mean(col)) for col in zip(*cells))
        means[method, setting] = mean
        fmt = lambda c: " / ".join(pct(x) for x in c)  # noqa: E731
        lines.append(f"| {label} | " + " | ".join(fmt(c) for c in cells) + f" | {fmt(mean)} |")
    keys = (("memory", "fetched"), ("lora", "none"), ("full", "none"))
    memory, lora, full = (means.get(key, (None,))[0] for key in keys)  # "-" for a method left out
    ratio = "-" if not lora else f"{memory / lora:.2f}x"
    lines += [
        "",
        f"Acceptance on the means (memory routed, far prompts without memory): rarest bucket {pct(memory)} vs LoRA "
        f"{pct(lora)} ({ratio}, target >= 1.5x) and the full fine-tune {pct(full)} (target: >=); known facts kept "
        f"{pct(means['memory', 'fetched'][2])} (target >= 98).",
    ]
    return "\n".join(lines) + "\n"


def parse_sweep(items: list[str]) -> dict[str, list[float]]:
    out = dict(SWEEP)
    for item in items or []:
        method, _, lrs = item.partition("=")
        if method not in METHODS:
            raise SystemExit(f"--sweep {item}: method must be one of {METHODS}")
        out[method] = [float(x) for x in lrs.split(",")]
    return out


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    sub = argv[0] if argv and argv[0] in ("finetune", "dense-export", "speed") else None
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default=os.path.join(ROOT, "models", "smollm2-135m"))
    p.add_argument("--run")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "posthoc"))
    if sub:
        p.add_argument("--hf")
        p.add_argument("--method", choices=("lora", "full"))
        p.add_argument("--lr", type=float)
        p.add_argument("--steps", type=int, default=3)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--fetched-params", type=int, default=0)
        p.add_argument("--bf16", action="store_true")
        args = p.parse_args(argv[1:])
        {"finetune": finetune, "speed": speed, "dense-export": lambda a: dense_export(a.hf, a.run, a.out)}[sub](args)
        return 0
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", default="people", choices=CORPORA)
    p.add_argument("--sizes", type=int, nargs="+")
    p.add_argument("--epochs", type=float, default=12)  # memory's validation accuracy: 6.7% at 6 epochs, 24.4% at 12
    p.add_argument("--sweep", nargs="*", metavar="METHOD=LR,LR")
    p.add_argument("--memory-ranks", type=int, nargs="+", metavar="R", help="units per tree level (memory.yaml's)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--bf16", action="store_true", help="training forwards under bf16 autocast (native-bf16 CPUs)")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    args.sweep = parse_sweep(args.sweep)
    if "memory" not in args.methods:
        raise SystemExit(f"--methods {' '.join(args.methods)}: memory is what the others are compared with; add it")
    if args.corpus != "people":  # a real domain has its own entities: its one size is its name
        if args.sizes:
            raise SystemExit(f"--sizes counts synthetic people; --corpus {args.corpus} has none")
        args.sizes = [args.corpus]
        args.out = os.path.join(args.out, args.corpus)  # its own seeds, results and pooled table
    args.sizes = args.sizes or [100]
    if not os.path.exists(os.path.join(args.base, "config.json")):
        raise SystemExit(f"{args.base}: no transformers checkpoint; `make smollm2` converts SmolLM2-135M into it")
    r = run_seed(args, args.seed)
    r.update(base=args.base, epochs=args.epochs, sizes_list=args.sizes)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"results_seed{args.seed}.json"), "w") as f:
        json.dump(r, f, indent=1)
    with open(os.path.join(args.out, f"results_seed{args.seed}.md"), "w") as f:
        f.write(markdown(r) + "\n")
    print(markdown(r))
    print(headline(r))
    write_pooled(args.out, r)
    return 0


def write_pooled(out: str, like: dict) -> None:
    """OUT/results.md: every seed in OUT run with ``like``'s epochs, sizes, memory ranks and methods, pooled
    (``pooled``)."""
    older = {"memory_ranks": config_ranks(), "methods": list(METHODS), "bf16": False}  # results before these fields
    results = []
    for name in sorted(os.listdir(out)):
        if name.startswith("results_seed") and name.endswith(".json"):
            with open(os.path.join(out, name)) as f:
                r = json.load(f)
            if all(
                r.get(k, older.get(k)) == like[k] for k in ("epochs", "sizes_list", "memory_ranks", "methods", "bf16")
            ):
                results.append(r)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(pooled(results))


if __name__ == "__main__":
    sys.exit(main())
