"""Which residual quantizer would let the compressed neighbour vote match the exact one? (issue 10)

    python -m bench.doc_index_quantizers --real RUN PROBES.jsonl [RUN PROBES.jsonl ...] --variants pq:48:8 pq:64:7

For each real run (nprobe covers every list on these runs, so only the codes matter) and each
variant, the documents' residuals to their leaf centroid are quantized and decoded in memory (no
index is written), and the vote over the m nearest documents is compared with the exact vote
(flat inner product over the raw embeddings, as bench/doc_index.py's ``exact_vote``), under two
similarity estimates from the decoded document x^ = centroid + decoded residual:

  index   1 - ||q - x^||^2 / 2, what the IVF L2 scan returns (bench/doc_index.py's figure for pq:48:8)
  unit    <q, x^> / ||x^||: x^ projected back onto the unit sphere the documents live on

and two ways of training the codebooks:

  build     on this run's own residuals, as build_document_index does (its sample is the whole run
            below train_sample documents). On a small run with many identical documents (the long-tail
            corpus: 14,176 documents, ~2,200 distinct vectors) a large codebook partly memorises the
            corpus, which no 100k-of-billions training sample can do.
  held-out  on the residuals of the other runs given (their own trees), without any vector that occurs
            in this run: codebooks that never saw these documents, as at scale.
            With --extra VECTORS.npy (other real embeddings, e.g. BBC sentences), the first --extra-rows of
            them are added, as residuals to their leaf in this run's tree: a held-out training sample
            nearer the size a build takes at scale (a few thousand vectors under-train 2^bits centroids).

--noise SIGMA ... asks how precise the similarities must be: the agreement when each distinct document's
exact similarity to a question is off by a normal error of std SIGMA (copies of a document share it),
mean of 3 draws. Each variant's line gives its own error's std over the exact m nearest, to compare.

Variants: pq:M:BITS (IndexIVFPQ's product quantizer), opq:M:BITS, rq:M:BITS[:BEAM] (residual
quantizer), prq:SPLITS:M:BITS. Code bytes are what an IVF list would store per document; +8 for the id.
Last line: per variant and protocol, the lowest agreement over the runs (first probe file, ``index`` estimate).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


from index.routing import RoutingConfig

SIMILARITY = RoutingConfig(vote="linear")  # the vote on similarities alone: what PQ codes approximate


def quantizer(variant: str, dim: int):
    import faiss

    name, *a = variant.split(":")
    a = [int(v) for v in a]
    if name in ("pq", "opq"):
        q = faiss.ProductQuantizer(dim, a[0], a[1])
    elif name == "rq":
        q = faiss.ResidualQuantizer(dim, a[0], a[1])
        if len(a) > 2:
            q.max_beam_size = a[2]
    elif name == "prq":
        q = faiss.ProductResidualQuantizer(dim, a[0], a[1], a[2])
    else:
        raise ValueError(f"variant {variant!r}: pq:M:BITS, opq:M:BITS, rq:M:BITS[:BEAM] or prq:SPLITS:M:BITS")
    opq = faiss.OPQMatrix(dim, a[0]) if name == "opq" else None
    return q, opq


def decoded(variant: str, train: np.ndarray, res: np.ndarray) -> tuple[np.ndarray, int, float]:
    """res quantized with codebooks trained on ``train``: (decoded residuals, code bytes, seconds)."""
    t = time.time()
    q, opq = quantizer(variant, res.shape[1])
    if opq is not None:
        opq.train(train)
        train, res = opq.apply(train), opq.apply(res)
    q.train(train)
    out = q.decode(q.compute_codes(res))
    if opq is not None:
        out = opq.reverse_transform(out)
    return out, q.code_size, time.time() - t


def vote_leaf(sims: np.ndarray, leaf: np.ndarray, m: int) -> np.ndarray:
    from index.docindex import Hits
    from index.router import vote, vote_weights

    top = np.argsort(-sims, axis=1, kind="stable")[:, :m]
    return vote(leaf[top], vote_weights(Hits(np.take_along_axis(sims, top, 1), top, leaf[top]), SIMILARITY))[0][:, 0]


def load_run(run: str, probes: list[str]) -> dict:
    from index.docindex import _batches, embedding_matrix
    from index.router import Router

    router = Router.load(run, documents=False)
    xs, leaves = [], []
    for batch in _batches(os.path.join(run, "routed"), ["leaf", "embedding", "first_copy"]):
        batch = batch.filter(batch.column("first_copy"))  # the index holds one entry per distinct text
        xs.append(embedding_matrix(batch.column("embedding"), router.tree.dim, run))
        leaves.append(batch.column("leaf").to_numpy(zero_copy_only=False).astype(np.int64))
    x, leaf = np.concatenate(xs), np.concatenate(leaves)
    out = {
        "x": x,
        "leaf": leaf,
        "res": x - np.asarray(router.tree.centroids[-1], dtype=np.float32)[leaf],
        "keys": set(map(bytes, x.round(5))),
        "q": {},
        "router": router,
    }
    for path in probes:
        with open(path) as f:
            out["q"][os.path.basename(path)] = router.embed([json.loads(line)["prompt"] for line in f if line.strip()])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--real", nargs="+", required=True, metavar="RUN PROBES", help="runs and probe files, in pairs")
    p.add_argument(
        "--also",
        nargs="*",
        default=[],
        help="further probe files per run, by name in the run's probes directory (e.g. probes_context.jsonl)",
    )
    p.add_argument("--variants", nargs="+", default=["pq:48:8", "pq:64:7", "pq:48:9"])
    p.add_argument("--protocols", nargs="+", default=["build", "held-out"], choices=["build", "held-out"])
    p.add_argument("--neighbours", type=int, default=32)
    p.add_argument("--extra", help="float32 [N, dim] .npy of further real embeddings for the held-out training set")
    p.add_argument("--extra-rows", type=int, nargs="+", default=[0], help="how many of them (one pass per value)")
    p.add_argument(
        "--noise",
        type=float,
        nargs="*",
        default=[],
        metavar="SIGMA",
        help="also the agreement under a per-document similarity error of this std",
    )
    args = p.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    pairs = list(zip(args.real[::2], args.real[1::2]))
    if len(args.real) % 2 or ("held-out" in args.protocols and len(pairs) < 2):
        p.error("--real takes RUN PROBES pairs; the held-out protocol needs at least two runs")
    runs = [
        load_run(run, [probes] + [os.path.join(os.path.dirname(probes), a) for a in args.also]) for run, probes in pairs
    ]
    for r in runs:
        r["sims"] = {name: q @ r["x"].T for name, q in r["q"].items()}  # exact similarities, once per probe file
        r["exact"] = {name: vote_leaf(sims, r["leaf"], args.neighbours) for name, sims in r["sims"].items()}
        r["top"] = {
            name: np.argsort(-sims, axis=1, kind="stable")[:, : args.neighbours] for name, sims in r["sims"].items()
        }
        if args.noise:
            r["copy"] = np.unique(r["x"].round(5), axis=0, return_inverse=True)[1].ravel()  # copies share an error
    for sigma in args.noise:
        figures = []
        for r in runs:
            name, sims = next(iter(r["sims"].items()))
            rng = np.random.default_rng(0)
            figures.append(
                np.mean(
                    [
                        (
                            vote_leaf(
                                sims + rng.normal(0, sigma, (len(sims), r["copy"].max() + 1))[:, r["copy"]],
                                r["leaf"],
                                args.neighbours,
                            )
                            == r["exact"][name]
                        ).mean()
                        for _ in range(3)
                    ]
                )
            )
        print(f"similarity error std {sigma}: vote = exact vote {' / '.join(f'{v:.1%}' for v in figures)}", flush=True)
    headline = []
    extra = np.load(args.extra, mmap_mode="r") if args.extra else np.zeros((0, runs[0]["x"].shape[1]), np.float32)
    from index.tree import local_index

    for r in runs:
        tree = r["router"].tree
        leaf = local_index(r["router"].descend(np.asarray(extra, dtype=np.float32)), tree.k, tree.depth)
        r["extra_res"] = extra - np.asarray(tree.centroids[-1], dtype=np.float32)[leaf]
    plans = [(v, "build", 0) for v in args.variants if "build" in args.protocols]
    plans += [(v, "held-out", n) for v in args.variants for n in args.extra_rows if "held-out" in args.protocols]
    for variant, protocol, n_extra in sorted(plans, key=lambda t: args.variants.index(t[0])):
        figures, mse, secs, err, code = {}, [], [], [], 0
        for i, r in enumerate(runs):
            if protocol == "build":
                train = r["res"]
            else:
                others = [o for j, o in enumerate(runs) if j != i]
                train = np.concatenate(
                    [o["res"][[bytes(v) not in r["keys"] for v in o["x"].round(5)]] for o in others]
                    + [r["extra_res"][:n_extra]]
                )
            res_hat, code, s = decoded(variant, train, r["res"])
            x_hat = r["x"] - r["res"] + res_hat
            mse.append(float(((x_hat - r["x"]) ** 2).sum(1).mean()))
            secs.append(s)
            n2 = (x_hat**2).sum(1)
            for name, q in r["q"].items():
                ip = q @ x_hat.T
                l2 = ip - n2 / 2 + 0.5
                if name == next(iter(r["q"])):
                    err.append(float(np.std(np.take_along_axis(l2 - r["sims"][name], r["top"][name], 1))))
                for est, sims in (("index", l2), ("unit", ip / np.sqrt(n2))):
                    same = vote_leaf(sims, r["leaf"], args.neighbours) == r["exact"][name]
                    figures.setdefault(f"{name.removesuffix('.jsonl')} {est}", []).append(same.mean())
        label = f"{protocol}+{n_extra} extra" if n_extra else protocol
        print(
            f"{variant} {label}: {code} code bytes + 8 id = {code + 8} B/document; train+encode "
            f"{' / '.join(f'{s:.0f}' for s in secs)} s; error ||x^ - x||^2 "
            f"{' / '.join(f'{v:.4f}' for v in mse)}; similarity error std over the exact {args.neighbours} "
            f"nearest {' / '.join(f'{v:.4f}' for v in err)}",
            flush=True,
        )
        for key, vals in figures.items():
            print(f"    vote = exact vote, {key:24s} {' / '.join(f'{v:.1%}' for v in vals)}", flush=True)
        headline.append(f"{variant} {label} {min(next(iter(figures.values()))):.3f}")
    print("min_vote_agreement " + "; ".join(headline))


if __name__ == "__main__":
    main()
