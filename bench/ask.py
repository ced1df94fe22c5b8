"""`hmem.ask` figures: does the verdict name a block that holds the fact, and how fast is an answer?

    python -m bench.ask --run RUN --model EXPORT --probes PROBES.jsonl        # verdicts (long-tail bench model)
    python -m bench.ask --run runs/demo --model runs/demo/model/export --latency 50 [--threads 2]

Verdicts. The probes of the rarest frequency bucket (train.evaluate's buckets) are asked with their
answers in one batched call. For those the model answers right with its fetched memory: the share
whose verdict names a block on the fetched path with p(answer) falling when it is removed, and the
share whose verdict is the leaf block; the median p before and after.

Latency. Questions are the first 12 words of the run's documents, asked one at a time as a user
would, warm: end to end (embed, route, 10 greedy tokens; questions whose answer ends sooner at <eot>
are left out) with the fetched memory; the same without the key/value cache (each token re-runs the
prompt), with how many answers agree; with no memory (the bare anchor, the baseline measured in the
same invocation); and the full ask with its comparisons. Last line: the headline figures.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def verdicts(asker, probes_path: str) -> str:
    from train.evaluate import bucket_edges, bucket_of, is_exact_match, read_probes

    probes = read_probes(probes_path)
    freqs = np.array([p.frequency for p in probes])
    rare = [p for p, b in zip(probes, bucket_of(freqs, bucket_edges(freqs))) if b == 0]
    start = time.perf_counter()
    out = asker.ask(
        [p.prompt for p in rare],
        [p.answer for p in rare],
        max_new=max(len(asker.ev.answer_ids(p.answer)) + 1 for p in rare),
    )
    wall = time.perf_counter() - start
    right = [a for a, p in zip(out, rare) if is_exact_match(a["settings"][0]["completion"], p.answer)]
    held = [a["verdict"] for a in right if a["verdict"] and a["verdict"]["p_without"] < a["verdict"]["p_fetched"]]
    leaf = [v for v in held if v["leaf"]]
    levels = {lv: sum(v["level"] == lv for v in held) for lv in sorted({v["level"] for v in held})}
    print(
        f"rarest bucket: {len(rare)} probes asked in {wall:.1f} s ({1e3 * wall / len(rare):.0f} ms each, batched, "
        f"with comparisons); {len(right)} answered right with the fetched memory"
    )
    if not right:
        return "no rarest-bucket fact answered right: no verdict to check"
    print(
        f"  verdict names a block on the path whose removal lowers p(answer): {len(held)}/{len(right)}; "
        f"by level {levels}"
    )
    if held:
        print(
            f"  median p(answer) {np.median([v['p_fetched'] for v in held]):.3f} -> "
            f"{np.median([v['p_without'] for v in held]):.3f} without that block"
        )
    return (
        f"verdicts: {len(held) / len(right):.1%} of {len(right)} right rarest-bucket answers name a block on "
        f"the path that holds them; the leaf block for {len(leaf) / len(right):.1%}"
    )


def latency(asker, n: int) -> str:
    texts = asker.router.documents.table.column("preview").to_pylist()
    pool = [" ".join(t.split()[:12]) for t in texts[:: max(1, len(texts) // (4 * n))][: 4 * n]]
    asker.ask(pool[:2], compare=False)  # warm: blocks read, pages mapped
    # the figure is for 10-token answers: keep questions the model answers at full length (no early <eot>)
    answers = [a["settings"][0]["completion"] for a in asker.ask(pool, max_new=10, compare=False)]
    questions = [q for q, a in zip(pool, answers) if len(asker.ev.tokenizer.encode(a).ids) >= 10][:n]
    bank = asker.ev.bank

    def timed(fn) -> tuple[np.ndarray, list]:
        """Milliseconds per question, and what ``fn`` returned for each."""
        ms, out = [], []
        for q in questions:
            t = time.perf_counter()
            out.append(fn(q))
            ms.append(1e3 * (time.perf_counter() - t))
        return np.array(ms), out

    def answer(q: str) -> str:
        return asker.ask([q], max_new=10, compare=False)[0]["settings"][0]["completion"]

    fetched, cached = timed(answer)
    decode, asker.ev._decode = asker.ev._decode, asker.ev._recompute  # no key/value cache: re-run per token
    uncached, recomputed = timed(answer)
    same = sum(a == b for a, b in zip(cached, recomputed))
    asker.ev._decode = decode
    asker.ev.bank = None  # the bare anchor: no fetch, no memory compute
    bare, _ = timed(answer)
    asker.ev.bank = bank
    full, _ = timed(lambda q: asker.ask([q], max_new=10, compare=True))
    for name, ms in (
        ("ask --fast, fetched memory", fetched),
        ("the same without the cache", uncached),
        ("bare anchor (baseline)", bare),
        ("ask with comparisons", full),
    ):
        print(f"  {name:<28} p50 {np.median(ms):7.1f} ms   p95 {np.percentile(ms, 95):7.1f} ms")
    return (
        f"ask p50 {np.median(fetched):.1f} ms, p95 {np.percentile(fetched, 95):.1f} ms for 10 tokens with the "
        f"fetched memory ({np.median(fetched) / np.median(bare):.2f}x the bare anchor's p50 "
        f"{np.median(bare):.1f} ms); comparisons cost p50 {np.median(full) - np.median(fetched):.1f} ms more; "
        f"the key/value cache is {np.median(uncached) / np.median(fetched):.2f}x faster than re-running the prompt "
        f"per token, same answer for {same}/{len(questions)} ({len(questions)} questions with 10-token answers, "
        f"of {len(pool)} drawn; one at a time)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/demo")
    p.add_argument("--model", default="runs/demo/model/export")
    p.add_argument("--probes", help="probe JSONL: measure the verdicts")
    p.add_argument("--latency", type=int, default=0, help="questions to time one at a time (0: none)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import torch

    from hmem.ask import Asker

    torch.set_num_threads(args.threads)
    asker = Asker(args.run, args.model)
    lines = []
    if args.probes:
        lines.append(verdicts(asker, args.probes))
    if args.latency:
        lines.append(latency(asker, args.latency))
    if not lines:
        p.error("give --probes and/or --latency N")
    print("; ".join(lines))


if __name__ == "__main__":
    main()
