"""Does a text reach the leaf of the documents it comes from? Routing checks on a run without answers to learn.

    python -m bench.routing_check --run RUN [--probes PROBES.jsonl] [--grid] [--docs 400]

1. full text: a training document's whole text routes to its stored leaf (``--docs`` / 2 documents);
2. sentence: the second sentence of six words or more of a training document (``--docs`` documents)
   routes to that document's leaf;
3. bare questions (``--probes``, bench/longtail.py's probes.jsonl: prompt, entity, frequency, doc_ids):
   agreement = the share of the entity's training documents in the chosen leaf, on all probes and
   the rarest frequency bucket (train/evaluate.py's buckets).
Documents are a seeded sample of routed/ (``--seed``), never chosen by how they route. Every routing
mode (index/router.py) with the default vote, and the ``linear`` vote for comparison; ``--grid`` adds
the rerank vote over a grid of its constants (words x temperature): run it on a validation corpus to
choose them, never on the corpus the figures are reported on.
Last line: ``sentence S full F bare_rarest B`` for the default routing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys

import numpy as np
import pyarrow.dataset as ds

from index.router import Router, leading_path
from index.routing import MODES, RoutingConfig


def second_sentence(text: str) -> str | None:
    """The second sentence of at least six words (the first when there is one only)."""
    long = [s for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 6]
    return long[1] if len(long) > 1 else (long[0] if long else None)


def sample_documents(run: str, n: int, seed: int) -> tuple[list[str], list[str], np.ndarray]:
    """(doc_ids, texts, stored leaves) of n distinct-text routed documents drawn by ``seed``."""
    routed = ds.dataset(os.path.join(run, "routed"), format="parquet", partitioning="hive").to_table(
        columns=["doc_id", "leaf", "first_copy"]
    )
    routed = routed.filter(routed.column("first_copy")).sort_by("doc_id")
    pick = np.sort(np.random.default_rng(seed).choice(routed.num_rows, min(n, routed.num_rows), replace=False))
    ids = [routed.column("doc_id")[int(i)].as_py() for i in pick]
    leaves = routed.column("leaf").to_numpy()[pick]
    docs = ds.dataset(os.path.join(run, "documents"), format="parquet").to_table(
        columns=["doc_id", "text"], filter=ds.field("doc_id").isin(ids)
    )
    text = dict(zip(docs.column("doc_id").to_pylist(), docs.column("text").to_pylist()))
    return ids, [text[i] for i in ids], leaves


def bare_questions(run: str, probes_path: str):
    from train.evaluate import bucket_edges, bucket_of, read_probes

    probes = read_probes(probes_path)
    routed = ds.dataset(os.path.join(run, "routed"), format="parquet", partitioning="hive").to_table(
        columns=["doc_id", "leaf"]
    )
    leaf_of = dict(zip(routed.column("doc_id").to_pylist(), routed.column("leaf").to_pylist()))
    freqs = [p.frequency for p in probes]
    rarest = bucket_of(freqs, bucket_edges(freqs)) == 0
    return [p.prompt for p in probes], [np.array([leaf_of[d] for d in p.doc_ids]) for p in probes], rarest


def variants(grid: bool) -> list[tuple[str, RoutingConfig]]:
    default = RoutingConfig()
    out = [(f"{m} ({default.vote})", dataclasses.replace(default, mode=m)) for m in MODES]
    out += [(f"{m} (linear)", dataclasses.replace(default, mode=m, vote="linear")) for m in MODES if m != "descent"]
    if grid:
        out += [
            (f"neighbours rerank words={w} temperature={t}", RoutingConfig(words=w, temperature=t))
            for w in (0.0, 0.1, 0.2, 0.3, 0.5, 1.0)
            for t in (0.005, 0.01, 0.02, 0.05)
        ]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--probes", help="probes.jsonl with doc_ids (bench/longtail.py) for the bare-question check")
    ap.add_argument("--docs", type=int, default=400, help="documents for the sentence check (half for full text)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", action="store_true", help="also the rerank vote over a grid of its constants")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    base = Router.load(args.run)
    ids, texts, leaves = sample_documents(args.run, args.docs, args.seed)
    sentences = [(second_sentence(t), lf) for t, lf in zip(texts, leaves)]
    sentences = [(s, lf) for s, lf in sentences if s]
    checks = {
        "full": (texts[: args.docs // 2], leaves[: args.docs // 2]),
        "sentence": ([s for s, _ in sentences], np.array([lf for _, lf in sentences])),
    }
    embedded = {name: base.embed(q) for name, (q, _) in checks.items()}
    bare = None
    if args.probes:
        prompts, doc_leaves, rarest = bare_questions(args.run, args.probes)
        bare = (prompts, base.embed(prompts), doc_leaves, rarest)
    results = {}
    print(
        f"{args.run}: {base.documents.meta['n_documents']:,} distinct of {base.documents.meta['n_routed']:,} "
        f"routed documents; full text {len(checks['full'][0])}, sentences {len(checks['sentence'][0])} documents"
        + (f", {len(bare[0])} bare questions ({int(bare[3].sum())} rarest)" if bare else "")
    )
    for name, cfg in variants(args.grid):
        r = Router(args.run, base.tree, base.tree_version, base.manifest, base.documents, cfg)
        row = {}
        for check, (q, want) in checks.items():
            got = r.leaves(leading_path(r.route_embeddings(embedded[check], texts=q)))
            row[check] = float(np.mean(got == want))
        if bare:
            prompts, x, doc_leaves, rarest = bare
            got = r.leaves(leading_path(r.route_embeddings(x, texts=prompts)))
            agree = np.array([np.mean(d == g) for d, g in zip(doc_leaves, got)])
            row.update(bare_all=float(agree.mean()), bare_rarest=float(agree[rarest].mean()))
        results[name] = row
        print(f"{name:<48} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "run": args.run,
                    "probes": args.probes,
                    "docs": args.docs,
                    "seed": args.seed,
                    "routing": dataclasses.asdict(RoutingConfig()),
                    "results": results,
                },
                f,
                indent=1,
            )
    head = results[f"neighbours ({RoutingConfig().vote})"]
    print(
        f"sentence {head['sentence']:.3f} full {head['full']:.3f}"
        + (f" bare_rarest {head['bare_rarest']:.3f}" if bare else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
