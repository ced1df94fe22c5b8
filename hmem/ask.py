"""Ask an exported model a question: its answer with the memory it fetches, and the block that holds it.

    python -m hmem.ask --run RUN --model EXPORT "The capital of Chad is" [--answer "N'Djamena"]
    python -m hmem.ask --run RUN --model EXPORT --file questions.jsonl --json   # batched, one JSON line each
    python -m hmem.ask --run RUN --model EXPORT --fast "..."   # only the answer with the fetched memory

Per question: the route (mode, path, block per level, the vote's share in the leaf) and the model's
greedy completion (``--max-new`` tokens, stopping at <eot>) with its fetched memory. Unless ``--fast``,
the same completion with no memory, with the generic memory and with each level's block removed, and
the answer's probability under each setting: p(answer) = exp(summed log-probability of its tokens
after the prompt). The answer is ``--answer`` (or a question file's ``answer``), else the model's own
completion with its memory. The verdict names the block whose removal costs the answer most, as
"level 2 block 37 holds it: p 0.62 -> 0.03"; when no removal lowers p(answer) by 0.1%, no block on
the path holds it alone (the anchor, or several blocks together, carry it). A question far from every
training document (the model's ``routing.far``, or ``--far``: its vote's best score is below it) is
answered with no memory, and says so.

A question file holds one question per line: plain text, or JSON with ``question`` (or ``prompt``,
so a probe file works as is) and optionally ``answer``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

from hmem.cli import respond
from index.router import Router, leading_path
from index.routing import MODES, VOTES
from index.tree import path_block_ids
from train.evaluate import Evaluator, model_routing


class Asker:
    """An export, its tokenizer and the run's router, loaded once; ``ask`` answers a batch of questions."""

    def __init__(
        self,
        run_dir: str,
        model_dir: str,
        mode: str | None = None,
        vote: str | None = None,
        batch_size: int = 16,
        far: float | None = None,
    ):
        routing = model_routing(model_dir, [mode] if mode else None, vote=vote, far=far)
        self.router = Router.load(run_dir, documents=routing.mode != "descent", routing=routing)
        self.ev = Evaluator(model_dir, self.router, batch_size)
        self.router.embed(["warm up"])  # the encoder loads on first use: keep it out of the first answer's time

    def compared(self) -> list[str]:
        """The settings a full ask compares with the fetched memory (train.evaluate names)."""
        return [s for s in self.ev.settings if s in ("none", "generic") or s.startswith("off@")]

    def ask(
        self, questions: list[str], answers: list[str | None] | None = None, max_new: int = 10, compare: bool = True
    ) -> list[dict]:
        ev, n = self.ev, len(questions)
        answers = answers or [None] * n
        t0 = time.perf_counter()
        x = self.router.embed(questions)
        routed = self.router.route_embeddings(x, texts=questions)
        first = leading_path(routed)
        leaves = self.router.leaves(first)
        descent = self.router.routing.mode == "descent"  # no vote, no document index needed
        share = None if descent else self.router.vote_share(x, questions, leaves)
        nearest = None if descent else self.router.nearest(x, questions)
        far = self.router.far(nearest)
        t1 = time.perf_counter()
        settings = ["fetched"] + (self.compared() if compare else []) if ev.bank is not None else ["none"]
        ids = {s: ev.block_ids(routed, s, far) for s in settings}
        completions, spent = {}, {}
        for s in settings:
            t = time.perf_counter()
            completions[s] = ev.generate(questions, ids[s], [max_new] * n)
            spent[s] = time.perf_counter() - t
        tokens = [
            ev.answer_ids(a) if a is not None else own_answer(ev, c) for a, c in zip(answers, completions[settings[0]])
        ]
        scored = [a if a is not None else ev.tokenizer.decode(t).strip() or None for a, t in zip(answers, tokens)]
        completions = {s: [ev.tokenizer.decode(t) for t in c] for s, c in completions.items()}
        logp = {}
        if compare:
            t = time.perf_counter()
            have = [i for i, a in enumerate(tokens) if a]
            for s in settings:
                lp = np.full(n, -math.inf)
                if have:
                    lp[have] = ev.answer_logprob(
                        [questions[i] for i in have],
                        [tokens[i] for i in have],
                        None if ids[s] is None else ids[s][have],
                    )
                logp[s] = lp
            spent["scoring"] = time.perf_counter() - t
        blocks = path_block_ids(first, ev.k)
        out = []
        for q in range(n):
            far_q = far is not None and bool(far[q])  # answered with no memory: no block to name
            rows = [
                {
                    "setting": s,
                    "label": label(s, blocks[q], far_q),
                    "completion": completions[s][q],
                    **({"logprob": float(logp[s][q]), "p": math.exp(logp[s][q])} if logp else {}),
                }
                for s in settings
            ]
            out.append(
                {
                    "question": questions[q],
                    "answer": scored[q],
                    "answer_given": answers[q] is not None,
                    "routing": self.router.routing.mode,
                    "vote": self.router.routing.vote,
                    "path": first[q].tolist(),
                    "leaf": int(leaves[q]),
                    "blocks": blocks[q].tolist(),
                    "vote_share": None if share is None else float(share[q]),
                    "nearest": None if nearest is None or not np.isfinite(nearest[q]) else float(nearest[q]),
                    "far": None if far is None else bool(far[q]),
                    "far_below": self.router.routing.far,
                    "settings": rows,
                    "verdict": verdict(rows, blocks[q]) if logp and not far_q else None,
                    "ms": {
                        "route": 1e3 * (t1 - t0) / n,
                        "answer": 1e3 * spent[settings[0]] / n,
                        "compare": 1e3 * sum(v for k, v in spent.items() if k != settings[0]) / n,
                    },
                }
            )
        return out


def own_answer(ev, completion: list[int]) -> list[int]:
    """The model's completion as the answer to score: its tokens before the first line break, as generated
    (its text re-encoded could differ: a completion need not start with the space an answer gets)."""
    text = [ev.tokenizer.decode([t]) for t in completion]
    start = next((i for i, t in enumerate(text) if t.strip()), len(text))  # leading blank lines stay in the score
    end = next((i for i in range(start + 1, len(text)) if "\n" in text[i]), len(text))
    return completion[:end] if start < len(text) else []


def label(setting: str, blocks: np.ndarray, far: bool = False) -> str:
    if setting.startswith("off@"):
        level = int(setting.split("@")[1])
        return f"without level {level} block {int(blocks[level - 1])}"
    if setting == "fetched" and far:
        return "no memory (far)"
    return {"fetched": "fetched memory", "none": "no memory", "generic": "generic memory"}[setting]


MIN_DROP = 1e-3  # nats: a removal that changes p(answer) by less than 0.1% holds nothing (float rounding)


def verdict(rows: list[dict], blocks: np.ndarray) -> dict | None:
    """The level whose removal lowers p(answer) most, or None when no removal lowers it by MIN_DROP."""
    p = {r["setting"]: r for r in rows}
    if "fetched" not in p or not math.isfinite(p["fetched"]["logprob"]):
        return None
    drops = {int(s.split("@")[1]): p["fetched"]["logprob"] - r["logprob"] for s, r in p.items() if s.startswith("off@")}
    if not drops or max(drops.values()) < MIN_DROP:
        return None
    level = max(drops, key=drops.get)
    return {
        "level": level,
        "block": int(blocks[level - 1]),
        "p_fetched": p["fetched"]["p"],
        "p_without": p[f"off@{level}"]["p"],
        "logprob_drop": drops[level],
        "leaf": level == len(blocks),
    }


def format_answer(a: dict) -> str:
    route = f"{a['routing']}" + ("" if a["routing"] == "descent" else f" ({a['vote']} vote)")
    share = "" if a["vote_share"] is None else f"   this leaf holds {a['vote_share']:.0%} of the vote"
    lines = [f"question: {a['question']!r}", f"route: {route}   path {a['path']}   blocks {a['blocks']}{share}"]
    scored = a["settings"][0].get("p") is not None
    if scored:
        lines.append(f"answer scored: {a['answer']!r} ({'given' if a['answer_given'] else 'the model’s own'})")
    width = max(len(r["label"]) for r in a["settings"])
    for r in a["settings"]:
        p = f"   p(answer) {r['p']:.3g}" if scored else ""
        lines.append(f"  {r['label']:<{width}}  {r['completion'].strip()!r}{p}")
    v = a["verdict"]
    if a.get("far"):
        lines.append(
            "verdict: far from every training document (nearest score "
            + ("none found" if a["nearest"] is None else f"{a['nearest']:.3f}")
            + f" < {a['far_below']:g}): answered with no memory"
        )
    elif v:
        lines.append(
            f"verdict: level {v['level']} block {v['block']} holds it: p {v['p_fetched']:.3g} -> "
            f"{v['p_without']:.3g}" + (" (the leaf)" if v["leaf"] else "")
        )
    elif scored:
        lines.append(
            "verdict: removing no single block lowers p(answer): the anchor or several blocks carry it"
            if a["answer"]
            else "verdict: none (the model gave no answer to score)"
        )
    lines.append(
        f"time: route {a['ms']['route']:.0f} ms, answer {a['ms']['answer']:.0f} ms"
        + (f", comparisons {a['ms']['compare']:.0f} ms" if scored else "")
    )
    return "\n".join(lines)


def read_questions(args: argparse.Namespace) -> tuple[list[str], list[str | None]]:
    if args.file:
        questions, answers = [], []
        with sys.stdin if args.file == "-" else open(args.file, encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line) if line.lstrip().startswith("{") else {"question": line.strip()}
                except json.JSONDecodeError as e:
                    raise ValueError(f"{args.file}:{i}: not JSON ({e})") from e
                q = row.get("question") or row.get("prompt")
                if not q:
                    raise ValueError(f"{args.file}:{i}: no 'question' (or 'prompt') field")
                questions.append(q)
                answers.append(row.get("answer"))
    else:
        questions, answers = list(args.questions), [args.answer] * len(args.questions)
    if not questions:
        raise ValueError("no question: give question arguments or --file FILE ('-' for stdin)")
    return questions, answers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hmem-ask", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="the run directory the model was trained on")
    p.add_argument("--model", required=True, help="export directory (OUT/export of train/main.py)")
    p.add_argument("questions", nargs="*", help="questions (prompts to complete)")
    p.add_argument("--answer", help="the expected answer to score (every question on the command line)")
    p.add_argument("--file", help="one question per line, text or JSON with question/prompt [+ answer]; '-': stdin")
    p.add_argument("--max-new", type=int, default=10, help="tokens to generate (default 10)")
    p.add_argument("--fast", action="store_true", help="only the answer with the fetched memory: no comparison")
    p.add_argument("--routing", choices=MODES, help="routing mode (default: the model's recorded mode)")
    p.add_argument("--vote", choices=VOTES, help="how the neighbours weigh (default: the model's recorded vote)")
    p.add_argument("--far", type=float, help="questions whose best vote score is below this fetch no memory")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", action="store_true", help="one JSON object per line and question")
    args = p.parse_args(argv)

    def work() -> list[dict]:
        if args.max_new < 1:
            raise ValueError(f"--max-new {args.max_new}: must be at least 1")
        questions, answers = read_questions(args)
        asker = Asker(args.run, args.model, args.routing, args.vote, args.batch_size, args.far)
        return asker.ask(questions, answers, args.max_new, compare=not args.fast)

    return respond(work, args.json, format_answer)


if __name__ == "__main__":
    sys.exit(main())
