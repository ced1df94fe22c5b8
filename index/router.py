"""Router: a run's tree + its document index; texts/embeddings -> paths, blocks, neighbours.

Two questions, two answers. A *training document's* path is the greedy descent of its embedding
(index/route.py, the Spark job's own code), stored once in ``RUN/routed/``; nothing here changes it.
What a *prompt* fetches is a routing mode, chosen at inference (``RoutingConfig``):

  descent     the greedy descent, as for training documents. A bare question ("The atomic number of
              iron is") is short and far from any document; descent sent it to its documents' leaf
              for ~15% of rare entities on a held-out corpus.
  neighbours  the leaf with the most vote weight among the prompt's ``neighbours`` nearest distinct
              training documents (document index, index/docindex.py, ``nprobe`` lists). The
              documents that state a fact are the prompt's nearest, wherever descent goes.
  hybrid      the neighbours' leaf when it holds at least ``hybrid_share`` of the vote's weight,
              else descent.
  levels      the vote taken level by level: the level-1 node with the most weight, then among
              the neighbours under it the level-2 node, and so on.
  two_paths   the two leaves with the most weight, both fetched (shared ancestors once): up to
              twice the fetched memory, see ``fetch_cost``.

A query with no neighbour found (an empty index region) falls back to descent.

Far prompts (``RoutingConfig.far``): a prompt whose best vote score (``nearest``) is below ``far`` is
far from every training document; ``far`` marks it, and the model answers it with no memory.

The vote's weights (``RoutingConfig.vote``):

  rerank      (default) each neighbour's score is its cosine similarity plus ``words`` times the
              IDF-weighted share of the query's words it contains (index/terms.py), and its weight
              is exp((score - best score) / ``temperature``): the clearly nearest document wins, a
              crowd of weaker ones does not outvote it. The words separate what the encoder puts
              side by side: an article's own sentence from another article on its subject, iron's
              documents from cobalt's for "The atomic number of iron is".
  linear      the similarity itself (the rule before rerank; exports that record no ``vote``
              used it). Ten documents at 0.4 outweigh one at 0.7, so on a corpus without copies it
              often picks the leaf of a crowd rather than of the document that matches.

Copies of a text are one entry of the document index, so neither rule counts them: the route is
the same whether a document is in the corpus once or many times.
Scores are cosine similarities of L2-normalised embeddings (approximate: PQ codes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from index.docindex import DocumentIndex, Hits, TreeVersionError
from index.rundir import read_manifest
from index.route import Descender
from index.routing import MODES, RoutingConfig
from index.terms import term_hashes
from index.tree import Tree, local_index, path_block_ids


@dataclass
class Neighbour:
    doc_id: str
    score: float  # cosine similarity (PQ-approximate)
    leaf: int
    preview: str
    copies: int  # routed documents with this text (one index entry)
    words: float | None = None  # share of the query's words it holds (IDF-weighted), when the texts are given
    weight: float | None = None  # its share of the weight of the n neighbours listed with it


def leaf_paths(leaves: np.ndarray, k: int, depth: int) -> np.ndarray:
    """Root-to-leaf paths [..., depth] of leaf local indices (the inverse of index.tree.local_index)."""
    leaves = np.asarray(leaves, dtype=np.int64)
    return np.stack([(leaves // k ** (depth - 1 - l)) % k for l in range(depth)], axis=-1).astype(np.int32)


def leading_path(routes: np.ndarray) -> np.ndarray:
    """The first path [N, p] of routes [N, p] or [N, 2, p] (two_paths: the path the report and the metrics lead
    with)."""
    return routes[:, 0] if routes.ndim == 3 else routes


def vote_scores(hits: Hits, cfg: RoutingConfig, word_share: np.ndarray | None = None) -> np.ndarray:
    """Score of each hit under ``cfg.vote`` (module doc): the similarity, plus ``words`` x the word share under
    ``rerank``; -inf for a missing hit. ``word_share`` [N, m]: DocumentIndex.word_share of the queries' terms."""
    found = hits.rows >= 0
    sims = np.nan_to_num(hits.sims, nan=0.0).astype(np.float64)
    if cfg.vote == "rerank":
        if word_share is None:
            raise ValueError("the rerank vote weighs the query's words: pass the query texts")
        sims = sims + cfg.words * word_share
    return np.where(found, sims, -np.inf)


def vote_weights(hits: Hits, cfg: RoutingConfig, word_share: np.ndarray | None = None) -> np.ndarray:
    """Vote weight of each hit under ``cfg.vote`` (module doc); 0 for a missing hit."""
    found = hits.rows >= 0
    score = vote_scores(hits, cfg, word_share)
    if cfg.vote == "linear":
        return np.clip(np.where(found, score, 0.0), 0.0, None) + found * 1e-9
    best = score.max(axis=1, keepdims=True)
    return np.where(found, np.exp((score - np.where(np.isfinite(best), best, 0.0)) / cfg.temperature), 0.0)


def vote(keys: np.ndarray, weights: np.ndarray, top: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``top`` keys with the most summed weight (ties: the smallest key) and their share
    of the row's weight. keys [N, m] (-1 = no hit) -> (best [N, top] with -1 where none, share [N, top])."""
    n = keys.shape[0]
    best = np.full((n, top), -1, dtype=np.int64)
    share = np.zeros((n, top))
    for i in range(n):
        ok = keys[i] >= 0
        if not ok.any():
            continue
        uniq, inv = np.unique(keys[i][ok], return_inverse=True)
        w = np.bincount(inv, weights=weights[i][ok])
        order = np.lexsort((uniq, -w))[:top]  # most weight first, then the smallest key
        best[i, : len(order)] = uniq[order]
        share[i, : len(order)] = w[order] / w.sum()
    return best, share


class Router:
    """Load with ``Router.load(run_dir)``; all methods are batched over queries."""

    def __init__(
        self,
        run_dir: str,
        tree: Tree,
        tree_version: str,
        manifest: dict,
        documents: DocumentIndex | None,
        routing: RoutingConfig | None = None,
    ):
        self.run_dir, self.tree, self.manifest, self.documents = run_dir, tree, manifest, documents
        self.tree_version = tree_version  # tree.version hashes every centroid: once per load, not per query
        self.routing = routing or RoutingConfig(mode="neighbours" if documents is not None else "descent")
        if self.routing.needs_index and documents is None:
            raise ValueError(
                f"routing mode {self.routing.mode!r} votes over the document index; load the router "
                f"with documents=True (python jobs/build_index.py --run {run_dir} builds it)"
            )
        self.descender = Descender(tree)
        self._encoder = None
        self._last = None  # the last vote's (key, hits, word shares): route, share and neighbours of one query reuse it

    @classmethod
    def load(cls, run_dir: str, documents: bool = True, routing: RoutingConfig | None = None) -> "Router":
        """``documents=False`` skips the document index (descent routing and blocks only)."""
        if not os.path.isdir(run_dir):
            raise FileNotFoundError(f"run directory {run_dir} does not exist")
        tree = Tree.load(os.path.join(run_dir, "tree"))
        manifest = read_manifest(run_dir)
        version = tree.version
        if manifest.get("tree_version") != version:
            raise TreeVersionError(
                f"{run_dir}: manifest.json has tree_version {manifest.get('tree_version')!r} "
                f"but tree/ is {version!r}; the run directory mixes two runs"
            )
        index = DocumentIndex.load(run_dir, tree, version) if documents else None
        return cls(run_dir, tree, version, manifest, index, routing)

    def check_tree_version(self, version: str) -> None:
        """Refuse a model trained on another tree: its block ids would name other nodes."""
        if version != self.tree_version:
            raise TreeVersionError(
                f"the model was trained on tree {version!r} but {self.run_dir} holds tree "
                f"{self.tree_version!r}; query it with the run directory it was trained on"
            )

    def embed(self, texts: list[str], precision: str | None = None) -> np.ndarray:
        """Embed as the job did (windows, encoder precision); another ``precision`` is refused."""
        from index.encoder import PrecisionMismatch, embed_texts, load_encoder, run_precision

        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"query {i} is empty: give some text to route")
        run = run_precision(self.manifest, self.tree.config)
        if precision not in (None, run):
            raise PrecisionMismatch(
                f"{self.run_dir} was embedded at encoder precision {run!r}; {precision!r} "
                f"embeddings would route differently from its documents"
            )
        if self._encoder is None:
            self._encoder = load_encoder(precision=run)
        windows = int(self.manifest.get("config", {}).get("max_windows", 1))
        return embed_texts(self._encoder, texts, batch_size=64, max_windows=windows)

    # -- routing
    def descend(self, x: np.ndarray) -> np.ndarray:
        """Greedy-descent paths [N, p] (int32) of L2-normalised embeddings [N, dim]: a training document's path."""
        return self.descender.route(np.atleast_2d(x))

    def route_embeddings(self, x: np.ndarray, mode: str | None = None, texts: list[str] | None = None) -> np.ndarray:
        """Paths of embeddings [N, dim] of ``texts`` under ``mode`` (default: this router's): [N, p] (int32), or
        [N, 2, p] for ``two_paths`` (the second path repeats the first where the vote found one leaf).
        ``texts``: the texts embedded, whose words the ``rerank`` vote reads (not needed for descent)."""
        mode = mode or self.routing.mode
        if mode not in MODES:
            raise ValueError(f"routing mode {mode!r}: one of {MODES}")
        x = np.atleast_2d(x)
        descent = self.descend(x)
        if mode == "descent":
            return descent
        if self.documents is None:
            raise ValueError(f"routing mode {mode!r} needs the document index: load the router with documents=True")
        cfg, k, depth = self.routing, self.tree.k, self.tree.depth
        hits, words = self._search(x, texts)
        weights = vote_weights(hits, cfg, words)
        if mode == "levels":
            chosen = np.zeros(len(x), dtype=np.int64)
            alive = hits.leaves >= 0
            for level in range(1, depth + 1):
                node = np.where(alive, hits.leaves // k ** (depth - level), -1)  # local index at this level
                best, _ = vote(node, weights)
                chosen = best[:, 0]
                alive &= node == chosen[:, None]
            paths = leaf_paths(np.maximum(chosen, 0), k, depth)
            return np.where((chosen >= 0)[:, None], paths, descent)
        best, share = vote(np.where(hits.leaves >= 0, hits.leaves, -1), weights, top=2)
        found = best[:, 0] >= 0
        first = np.where(found[:, None], leaf_paths(np.maximum(best[:, 0], 0), k, depth), descent)
        if mode == "neighbours":
            return first
        if mode == "hybrid":
            return np.where((found & (share[:, 0] >= cfg.hybrid_share))[:, None], first, descent)
        second = np.where((best[:, 1] >= 0)[:, None], leaf_paths(np.maximum(best[:, 1], 0), k, depth), first)
        return np.stack([first, second], axis=1)

    def nearest(self, x: np.ndarray, texts: list[str]) -> np.ndarray:
        """Per query, its vote's best score (``vote_scores``): how close its nearest training document is; -inf
        where the vote found none."""
        hits, words = self._search(np.atleast_2d(x), texts)
        return vote_scores(hits, self.routing, words).max(axis=1)

    def far(self, nearest: np.ndarray | None) -> np.ndarray | None:
        """[N] bool: the queries whose ``nearest`` score is below ``routing.far`` (they fetch no memory); None when
        the routing sets no ``far`` (or gives no scores: no vote)."""
        if self.routing.far is None or nearest is None:
            return None
        return nearest < self.routing.far

    def route_texts(self, texts: list[str], mode: str | None = None) -> np.ndarray:
        return self.route_embeddings(self.embed(texts), mode, texts)

    def _search(self, x: np.ndarray, texts: list[str] | None) -> tuple[Hits, np.ndarray | None]:
        """The vote's ``neighbours`` nearest documents of x and, with texts, their word shares (memoised: the
        query CLI asks for the route, the vote's share and the nearest documents of the same queries)."""
        key = (
            np.ascontiguousarray(x, dtype=np.float32).tobytes(),
            None if texts is None else tuple(texts),
            self.routing.neighbours,
            self.routing.nprobe,
        )
        if self._last is None or self._last[0] != key:
            hits = self.documents.search(x, self.routing.neighbours, self.routing.nprobe)
            self._last = (key, hits, None if texts is None else self.word_share(texts, hits))
        return self._last[1], self._last[2]

    def word_share(self, texts: list[str] | None, hits: Hits) -> np.ndarray:
        """[N, m]: the share of each query's words (IDF-weighted) that each hit holds (rerank's evidence)."""
        if texts is None or len(texts) != hits.rows.shape[0]:
            raise ValueError(
                "the rerank vote weighs the query's words: route_embeddings needs the texts embedded "
                "(texts=...), one per embedding"
            )
        return self.documents.word_share([term_hashes(t) for t in texts], hits.rows)

    def blocks(self, paths: np.ndarray) -> np.ndarray:
        """Global block ids [N, p] of each path's nodes (index/tree.py numbering)."""
        return path_block_ids(paths, self.tree.k)

    def leaves(self, paths: np.ndarray) -> np.ndarray:
        return local_index(np.atleast_2d(paths), self.tree.k, self.tree.depth)

    def node_stats(self, paths: np.ndarray) -> list[list[dict]]:
        """Per query, per level: local index, block id, documents and tokens of that node (manifest.json)."""
        paths = np.atleast_2d(paths)
        blocks = self.blocks(paths)
        levels = self.manifest["levels"]
        out = []
        for q in range(paths.shape[0]):
            rows = []
            for l in range(self.tree.depth):
                local = int(local_index(paths[q : q + 1], self.tree.k, l + 1)[0])
                rows.append(
                    {
                        "level": l + 1,
                        "local": local,
                        "block": int(blocks[q, l]),
                        "documents": int(levels[l]["node_documents"][local]),
                        "tokens": int(levels[l]["node_tokens"][local]),
                    }
                )
            out.append(rows)
        return out

    def vote_share(self, x: np.ndarray, texts: list[str], leaves: np.ndarray) -> np.ndarray:
        """Per query, the share of its vote's weight (its ``neighbours`` nearest documents) held by ``leaves[i]``."""
        hits, words = self._search(np.atleast_2d(x), texts)
        weights = vote_weights(hits, self.routing, words)
        held = (weights * (hits.leaves == np.asarray(leaves).reshape(-1, 1))).sum(axis=1)
        return held / np.maximum(weights.sum(axis=1), 1e-300)

    def neighbours(
        self, x: np.ndarray, n: int, leaves: np.ndarray | None = None, texts: list[str] | None = None
    ) -> list[list[Neighbour]]:
        """The n nearest distinct routed documents of each embedding: within its leaf ``leaves[i]`` when
        given, else over the corpus (the ``nprobe`` nearest lists, as the vote searches). With ``texts``,
        each carries its word share and vote weight, and they are listed by the vote's score."""
        if self.documents is None:
            raise ValueError(f"{self.run_dir}: router loaded without the document index")
        x = np.atleast_2d(x)
        words = weights = None
        if leaves is None and texts is not None and n <= self.routing.neighbours:  # the vote's own nearest
            hits, words = self._search(x, texts)
            hits, words = Hits(hits.sims[:, :n], hits.rows[:, :n], hits.leaves[:, :n]), words[:, :n]
        else:
            hits = (
                self.documents.search(x, n, self.routing.nprobe)
                if leaves is None
                else self.documents.search_leaves(x, np.asarray(leaves).reshape(-1, 1), n)
            )
            words = None if texts is None else self.word_share(texts, hits)
        if texts is not None:
            weights = vote_weights(hits, self.routing, words)
            weights = weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-300)
        out = []
        for q, (sims, rows) in enumerate(zip(hits.sims, hits.rows)):
            ok = np.flatnonzero(rows >= 0)
            if weights is not None:
                ok = ok[np.argsort(-weights[q, ok], kind="stable")]
            docs = self.documents.documents(rows[ok])
            out.append(
                [
                    Neighbour(
                        d,
                        float(sims[j]),
                        int(lf),
                        pv,
                        int(c),
                        None if words is None else float(words[q, j]),
                        None if weights is None else float(weights[q, j]),
                    )
                    for j, d, lf, pv, c in zip(ok, docs["doc_id"], docs["leaf"], docs["preview"], docs["copies"])
                ]
            )
        return out
