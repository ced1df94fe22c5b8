"""Which memory blocks does a text fetch, and do the documents that carry it live there?

    python -m index.query --run RUN "some text" ["more text" ...]
    python -m index.query --run RUN --file queries.txt --json     # one query per line; '-' reads stdin
    python -m index.query --run RUN --model MODEL_DIR "some text"  # + per-level share of the fact
    python -m index.query --run RUN --routing descent "some text"  # another routing mode (index/router.py)

For each query: the path (i1..ip) under the routing mode (default: the model's recorded mode with
--model, else ``neighbours``, the vote of the nearest training documents), the greedy-descent path
for comparison, per level the node's global block id and its document/token counts, the nearest
training documents inside the query's leaf and over the corpus, and the share of the corpus-wide
ones that sit in the query's leaf. A low share means the documents carrying this fact were routed
elsewhere, so the blocks this query fetches were not trained on them.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from index.router import MODES, Router, RoutingConfig


def answer(router: Router, texts: list[str], n: int) -> list[dict]:
    """One JSON-able object per query."""
    x = router.embed(texts)
    routed = router.route_embeddings(x)
    two = routed.ndim == 3
    paths = routed[:, 0] if two else routed  # two_paths: the first path leads the report
    descent = router.descend(x)
    leaves = router.leaves(paths)
    stats = router.node_stats(paths)
    in_leaf = router.neighbours(x, n, leaves=leaves)
    corpus = router.neighbours(x, n)
    out = []
    for q, text in enumerate(texts):
        leaf = int(leaves[q])
        wide = [dict(asdict(nb), in_leaf=nb.leaf == leaf) for nb in corpus[q]]
        out.append({"text": text, "routing": router.routing.mode, "path": paths[q].tolist(), "leaf": leaf,
                    "second_path": routed[q, 1].tolist() if two else None, "descent_path": descent[q].tolist(),
                    "blocks": [lv["block"] for lv in stats[q]], "levels": stats[q],
                    "leaf_neighbours": [asdict(nb) for nb in in_leaf[q]], "neighbours": wide,
                    "leaf_share": sum(nb["in_leaf"] for nb in wide) / max(1, len(wide)),
                    "tree_version": router.tree_version})
    return out


def model_report(model_dir: str, router: Router, answers: list[dict]) -> None:
    """Hook for ``--model``: train.evaluate measures, per level, how much the fetched block carries the fact.

    Adds ``answers[q]["model"]``. The trainer's export records ``tree_version``;
    train.evaluate checks it with ``router.check_tree_version`` before measuring.
    """
    try:
        from train import evaluate
    except ImportError as e:
        raise RuntimeError(f"--model needs train/evaluate.py (the trainer's evaluation), which this checkout "
                           f"does not have yet ({e}); run without --model") from e
    for a, report in zip(answers, evaluate.block_report(model_dir, router, [a["text"] for a in answers])):
        a["model"] = report


def _snippet(text: str, words: int = 12) -> str:
    return " ".join(text.split()[:words])


def format_answer(a: dict) -> str:
    lines = [f"query: {_snippet(a['text'], 20)!r}",
             f"path: {a['path']}   leaf {a['leaf']}   routing {a['routing']}   tree {a['tree_version']}"
             + (f"   second path {a['second_path']}" if a.get("second_path") else "")
             + ("" if a["descent_path"] == a["path"] else f"   (descent: {a['descent_path']})"),
             f"  {'level':>5} {'node':>8} {'block':>8} {'documents':>10} {'tokens':>12}"]
    lines += [f"  {lv['level']:>5} {lv['local']:>8} {lv['block']:>8} {lv['documents']:>10} {lv['tokens']:>12}"
              for lv in a["levels"]]
    lines.append(f"nearest training documents in leaf {a['leaf']}:")
    lines += [f"  {nb['score']:.3f}  {nb['doc_id']}  {_snippet(nb['preview'])}" for nb in a["leaf_neighbours"]]
    lines.append("nearest training documents in the whole corpus:")
    lines += [f"  {nb['score']:.3f}  {nb['doc_id']}  leaf {nb['leaf']}{' (this leaf)' if nb['in_leaf'] else ''}"
              f"  {_snippet(nb['preview'])}" for nb in a["neighbours"]]
    share = a["leaf_share"]
    lines.append(f"share of corpus-wide neighbours in this leaf: {share:.0%}"
                 + ("" if share >= 0.5 else "  -- most related documents were routed elsewhere: "
                    "the blocks this query fetches were not trained on them"))
    if a.get("model"):
        lines.append(f"model: mean loss of the query text {a['model'][0]['nll_fetched']:.3f} nats/token with its path; per level:")
        lines += [f"  level {lv['level']} block {lv['block']}: {lv['nll_without']:.3f} without it ({lv['delta']:+.3f}), "
                  f"{lv['nll_generic']:.3f} with the generic block instead" for lv in a["model"]]
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
    p = argparse.ArgumentParser(prog="python -m index.query", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="run directory written by jobs/cluster_corpus.py")
    p.add_argument("texts", nargs="*", help="query texts ('-' reads one query per line from stdin)")
    p.add_argument("--file", help="one query per line ('-' for stdin)")
    p.add_argument("-n", type=int, default=5, help="neighbours to list (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per line and query")
    p.add_argument("--model", help="trainer export: also report per level how much the block carries the fact")
    p.add_argument("--routing", choices=MODES, help="routing mode (default: the model's recorded mode with --model, "
                                                    "else neighbours)")
    args = p.parse_args(argv)
    try:
        texts = read_queries(args)
        routing = RoutingConfig(mode=args.routing) if args.routing else RoutingConfig()
        if args.model:  # the mode the model records (train.evaluate reads the export; index never imports train)
            from train.evaluate import model_routing

            routing = model_routing(args.model, [args.routing] if args.routing else None)
        router = Router.load(args.run, routing=routing)
        answers = answer(router, texts, args.n)
        if args.model:
            model_report(args.model, router, answers)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for a in answers:
        print(json.dumps(a) if args.json else format_answer(a) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
