"""Which memory blocks does a text fetch, and do the documents that carry it live there?

    python -m hmem.query --run RUN "some text" ["more text" ...]
    python -m hmem.query --run RUN --file queries.txt --json     # one query per line; '-' reads stdin
    python -m hmem.query --run RUN --model MODEL_DIR "some text"  # + per-level share of the fact
    python -m hmem.query --run RUN --routing descent "some text"  # another routing mode (index/router.py)

For each query: the path (i1..ip) under the routing mode (default: the model's recorded mode with
--model, else ``neighbours`` with the ``rerank`` vote: the nearest training documents, re-scored by
the query's words), the greedy-descent path for comparison, per level the node's global block id
and its document/token counts, the nearest training documents inside the query's leaf, and the
documents the vote weighed with their weight, similarity and share of the query's words. The share
of the vote's weight in the chosen leaf says how clear the route is: a low share means no training
document clearly matches the query, so its blocks may not hold what it asks about.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from hmem.cli import respond
from index.router import Router, leading_path
from index.routing import MODES, VOTES, RoutingConfig
from train.evaluate import block_report, model_routing


def answer(router: Router, texts: list[str], n: int) -> list[dict]:
    """One JSON-able object per query."""
    x = router.embed(texts)
    routed = router.route_embeddings(x, texts=texts)
    two = routed.ndim == 3
    paths = leading_path(routed)
    descent = router.descend(x)
    leaves = router.leaves(paths)
    stats = router.node_stats(paths)
    in_leaf = router.neighbours(x, n, leaves=leaves, texts=texts)
    corpus = router.neighbours(x, n, texts=texts)
    share = router.vote_share(x, texts, leaves)
    out = []
    for q, text in enumerate(texts):
        leaf = int(leaves[q])
        wide = [dict(asdict(nb), in_leaf=nb.leaf == leaf) for nb in corpus[q]]
        out.append(
            {
                "text": text,
                "routing": router.routing.mode,
                "vote": router.routing.vote,
                "path": paths[q].tolist(),
                "leaf": leaf,
                "second_path": routed[q, 1].tolist() if two else None,
                "descent_path": descent[q].tolist(),
                "blocks": [lv["block"] for lv in stats[q]],
                "levels": stats[q],
                "leaf_neighbours": [asdict(nb) for nb in in_leaf[q]],
                "neighbours": wide,
                "vote_share": float(share[q]),
                "tree_version": router.tree_version,
            }
        )
    return out


def model_report(model_dir: str, router: Router, answers: list[dict]) -> None:
    """``--model``: per level, how much the fetched block carries the text (train.evaluate.block_report).

    Adds ``answers[q]["model"]``; block_report checks the export's ``tree_version`` against the run's.
    """
    for a, report in zip(answers, block_report(model_dir, router, [a["text"] for a in answers])):
        a["model"] = report


def _snippet(text: str, words: int = 12) -> str:
    return " ".join(text.split()[:words])


def format_answer(a: dict) -> str:
    lines = [
        f"query: {_snippet(a['text'], 20)!r}",
        f"path: {a['path']}   leaf {a['leaf']}   routing {a['routing']}"
        + ("" if a["routing"] == "descent" else f" ({a['vote']} vote)")
        + f"   tree {a['tree_version']}"
        + (f"   second path {a['second_path']}" if a.get("second_path") else "")
        + ("" if a["descent_path"] == a["path"] else f"   (descent: {a['descent_path']})"),
        f"  {'level':>5} {'node':>8} {'block':>8} {'documents':>10} {'tokens':>12}",
    ]
    lines += [
        f"  {lv['level']:>5} {lv['local']:>8} {lv['block']:>8} {lv['documents']:>10} {lv['tokens']:>12}"
        for lv in a["levels"]
    ]

    def doc(nb: dict) -> str:
        copies = f" (x{nb['copies']})" if nb["copies"] > 1 else ""
        return f"{nb['doc_id']}{copies}  {_snippet(nb['preview'])}"

    lines.append(f"training documents in leaf {a['leaf']} (similarity, share of the query's words):")
    lines += [f"  {nb['score']:.3f} {nb['words']:4.0%}  {doc(nb)}" for nb in a["leaf_neighbours"]]
    lines.append(
        "the corpus's nearest training documents, by vote weight (share of the listed ones' weight, similarity, words):"
    )
    lines += [
        f"  {nb['weight']:4.0%} {nb['score']:.3f} {nb['words']:4.0%}  leaf {nb['leaf']}"
        f"{' (this leaf)' if nb['in_leaf'] else ''}  {doc(nb)}"
        for nb in a["neighbours"]
    ]
    share = a["vote_share"]
    lines.append(
        f"this leaf holds {share:.0%} of the vote's weight"
        + (
            ""
            if share >= 0.5
            else "  -- no document clearly matches: the blocks this query fetches may not hold what it asks about"
        )
    )
    if a.get("model"):
        lines.append(
            f"model: mean loss of the query text {a['model'][0]['nll_fetched']:.3f} nats/token with its path; per "
            "level:"
        )
        lines += [
            f"  level {lv['level']} block {lv['block']}: {lv['nll_without']:.3f} without it ({lv['delta']:+.3f}), "
            f"{lv['nll_generic']:.3f} with the generic block instead"
            for lv in a["model"]
        ]
    return "\n".join(lines)


def read_queries(args: argparse.Namespace) -> list[str]:
    texts = list(args.texts)
    if args.file or texts == ["-"]:
        source = args.file or "-"
        with sys.stdin if source == "-" else open(source) as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
    if not texts:
        raise ValueError("no query: give text arguments, --file FILE, or '-' for stdin")
    return texts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hmem-query", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="run directory written by jobs/cluster_corpus.py")
    p.add_argument("texts", nargs="*", help="query texts ('-' reads one query per line from stdin)")
    p.add_argument("--file", help="one query per line ('-' for stdin)")
    p.add_argument("-n", type=int, default=5, help="neighbours to list (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per line and query")
    p.add_argument("--model", help="trainer export: also report per level how much the block carries the fact")
    p.add_argument(
        "--routing",
        choices=MODES,
        help="routing mode (default: the model's recorded mode with --model, else neighbours)",
    )
    p.add_argument(
        "--vote",
        choices=VOTES,
        help="how the neighbours weigh (default: the model's recorded vote with --model, else rerank)",
    )
    args = p.parse_args(argv)

    def work() -> list[dict]:
        texts = read_queries(args)
        given = {k: v for k, v in (("mode", args.routing), ("vote", args.vote)) if v}
        routing = RoutingConfig(**given)
        if args.model:  # the mode the model records
            routing = model_routing(args.model, [args.routing] if args.routing else None, vote=args.vote)
        router = Router.load(args.run, routing=routing)
        answers = answer(router, texts, args.n)
        if args.model:
            model_report(args.model, router, answers)
        return answers

    return respond(work, args.json, format_answer)


if __name__ == "__main__":
    sys.exit(main())
