"""Evaluate an exported model: held-out perplexity per memory setting, knowledge probes, per-block reports.

    python -m train.evaluate --model EXPORT --run RUN [--heldout DOCS.jsonl] [--probes PROBES.jsonl]
        [--routing neighbours descent ...] --out RESULTS.json

Routing. A text is routed by the run's router in a routing mode (index/router.py: descent,
neighbours, hybrid, levels, two_paths); ``--routing`` lists the modes to compare, the first one is
the headline (default: the mode the model's export records). Training documents keep their stored
paths; only what a prompt or held-out text fetches depends on the mode.

Memory settings. A routed text fetches, per level, one block:
  fetched     the blocks on its path under the headline mode (``fetched[mode]``: under another mode;
              two_paths fetches the blocks of both paths, shared ancestors once); with ``routing.far``
              set, a text far from every training document fetches none (index/router.py) and
              ``fetched[always]`` is the headline route fetched whatever the distance
  generic     the generic memory (one shared block per level, co-trained with probability p_generic)
  none        no memory: the bare anchor (the only setting of an anchor-only model)
  generic@l   its path, with level l's block swapped for the generic one   (per-level ablation)
  off@l       its path, with level l disabled (block id -1)                 (per-level ablation)

Perplexity. Each held-out document (JSONL with ``text``, optional ``source``) is tokenised with the
run's tokenizer as ``<eot> text <eot>`` and cut into consecutive windows of seq_len + 1 tokens, the
way the job packs training documents; every window uses the document's route.

Probes. JSONL with ``prompt``, ``answer``, ``entity``, ``frequency`` (the entity's corpus frequency)
and optionally ``doc_ids`` (the entity's training documents; without them, the routed documents
whose text names the entity, as a whole word, are used) plus any labels (``fact``, ``domain``).
A prompt is completed greedily; it is right when the completion, stripped, starts with the answer
followed by a non-alphanumeric character or its end. Per probe also:
  agreement   share of the entity's training documents that sit in the probe's leaf
  oracle      accuracy when the probe fetches the path holding most of those documents instead of
              its own route (separates routing errors from memory capacity)
  blocked     accuracy when every block on a path of those documents is disabled (id -1)
  oracle_leaf share of probes whose route is the oracle's leaf (per mode)
Probes are grouped in 5 buckets of entity frequency, log-spaced between the smallest and largest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import torch

from index.router import leading_path
from index.routing import MODES, VOTES
from index.tree import generic_block_ids, n_tree_blocks, path_block_ids
from pipeline import tokenizer
from pipeline.stages import Ticker
from train.model import DecodeCache, token_nll

N_BUCKETS = 5


@dataclass
class Probe:
    prompt: str
    answer: str
    entity: str
    frequency: int
    doc_ids: list[str] | None = None
    fact: str = ""
    domain: str = ""


def read_jsonl(path: str, required: tuple[str, ...]) -> list[dict]:
    """Rows of a JSONL file; a bad line or a missing field is an error naming the file and line."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e})") from e
            missing = [k for k in required if row.get(k) in (None, "")]
            if missing:
                raise ValueError(f"{path}:{i}: missing {missing}; each line needs {list(required)}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def read_probes(path: str) -> list[Probe]:
    """Probes of a JSONL file; a field of the wrong type is an error naming the line and field."""
    known = set(Probe.__dataclass_fields__)
    rows = read_jsonl(path, ("prompt", "answer", "entity", "frequency"))
    for i, r in enumerate(rows, start=1):
        for key, kind in (("prompt", str), ("answer", str), ("entity", str), ("frequency", int)):
            if not isinstance(r[key], kind) or isinstance(r[key], bool):
                raise ValueError(f"{path}: probe {i}: {key} is {r[key]!r}, expected {kind.__name__}")
    return [Probe(**{k: v for k, v in r.items() if k in known}) for r in rows]


def bucket_edges(frequencies, n: int = N_BUCKETS) -> np.ndarray:
    """n+1 log-spaced edges; bucket b holds frequencies in [edges[b], edges[b+1]) (the last edge is max + 1)."""
    f = np.asarray(frequencies, dtype=np.float64)
    return np.geomspace(f.min(), f.max() + 1, n + 1)


def bucket_of(frequencies, edges: np.ndarray) -> np.ndarray:
    return np.clip(
        np.searchsorted(edges, np.asarray(frequencies, dtype=np.float64), side="right") - 1, 0, len(edges) - 2
    )


def oracle_leaf(doc_leaves: np.ndarray) -> int:
    """The leaf holding most of an entity's documents (ties: the smallest leaf, deterministically)."""
    top = Counter(np.asarray(doc_leaves).tolist()).most_common()
    return min(l for l, c in top if c == top[0][1])


def is_exact_match(completion: str, answer: str) -> bool:
    c, a = completion.strip(), answer.strip()
    return c.startswith(a) and (len(c) == len(a) or not c[len(a)].isalnum())


class Evaluator:
    """An exported model, its tokenizer and the run's router; every method is batched and uses no grad."""

    def __init__(self, model_dir: str, router, batch_size: int = 16):
        from train.export import load_model

        self.anchor, self.bank, self.meta = load_model(model_dir)
        router.check_tree_version(self.meta["tree_version"])
        self.router, self.batch_size = router, batch_size
        tok = os.path.join(model_dir, "tokenizer.json")
        if not os.path.exists(tok):
            raise FileNotFoundError(f"{tok} is missing: re-export the model (train.export copies the run's tokenizer)")
        self.tokenizer = tokenizer.read(tok)
        self.seq_len = min(int(self.meta["seq_len"]), self.anchor.cfg.max_seq_len)
        self.eot, self.pad = int(self.meta["eot_id"]), int(self.meta["pad_id"])
        self.k, self.depth = int(self.meta["k"]), int(self.meta["depth"])

    @property
    def settings(self) -> list[str]:
        """Memory settings this model supports (see the module doc)."""
        if self.bank is None:
            return ["none"]
        levels = [l for l in range(1, self.depth + 1) if self.bank.config.ranks[l - 1] > 0]
        return ["fetched", "generic", "none"] + [f"{s}@{l}" for l in levels for s in ("generic", "off")]

    def block_ids(self, paths: np.ndarray, setting: str, far: np.ndarray | None = None) -> torch.Tensor | None:
        """[N, p] block ids of ``paths`` [N, p] under ``setting``; None means no memory. Two paths per text
        ([N, 2, p], the two_paths mode) give [N, 2p] for ``fetched``: the second path's blocks that the
        first already fetches are disabled (-1), so a shared ancestor counts once. ``far`` [N] (Router.far):
        those texts fetch no block under ``fetched`` (all ids -1)."""
        if setting == "none" or self.bank is None:
            return None
        if setting == "fetched" and far is not None:
            ids = self.block_ids(paths, setting)
            ids[torch.from_numpy(np.asarray(far, dtype=bool))] = -1
            return ids
        if paths.ndim == 3:
            if setting == "fetched":
                first, second = path_block_ids(paths[:, 0], self.k), path_block_ids(paths[:, 1], self.k)
                return torch.from_numpy(np.concatenate([first, np.where(second == first, -1, second)], axis=1))
            paths = paths[:, 0]
        ids = path_block_ids(paths, self.k)
        generic = generic_block_ids(self.k, self.depth)
        if setting == "generic":
            ids[:] = generic
        elif "@" in setting:
            kind, level = setting.split("@")
            ids[:, int(level) - 1] = generic[int(level) - 1] if kind == "generic" else -1
        elif setting != "fetched":
            raise ValueError(f"unknown memory setting {setting!r}; one of {self.settings}")
        return torch.from_numpy(ids)

    def _memory(self, ids: torch.Tensor | None):
        if ids is None:
            return None
        if ids.shape[1] == 2 * self.depth:  # two paths: both sets of blocks, applied together
            from train.memory import FetchedUnion

            return FetchedUnion([self.bank.fetch(part, requires_grad=False) for part in ids.split(self.depth, 1)])
        return self.bank.fetch(ids, requires_grad=False)

    def fetch_cost(self, ids: torch.Tensor) -> float:
        """Mean fetched memory units per text, relative to one full path (two_paths: up to 2)."""
        ranks = torch.tensor(self.bank.config.ranks * (ids.shape[1] // self.depth), dtype=torch.float64)
        return float(((ids >= 0).double() @ ranks).mean() / sum(self.bank.config.ranks))

    def routes(self, texts: list[str], modes: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """(paths of ``texts`` under each routing mode, their nearest-document scores (Router.nearest; None
        without a vote)), the texts embedded once."""
        x = self.router.embed(texts)
        by_mode = {mode: self.router.route_embeddings(x, mode, texts) for mode in modes}
        return by_mode, None if self.router.documents is None else self.router.nearest(x, texts)

    @torch.no_grad()
    def window_nll(
        self,
        windows: list[list[int]],
        ids: torch.Tensor | None,
        skip: list[int] | None = None,
        tick: Ticker | None = None,
    ) -> np.ndarray:
        """Summed next-token NLL of each token window (input = w[:-1], target = w[1:]), leaving out the first
        ``skip[i]`` targets of window i (a prompt before its answer); ``tick`` counts the windows done."""
        out = np.zeros(len(windows))
        for s in range(0, len(windows), self.batch_size):
            part = windows[s : s + self.batch_size]
            x = self.padded(part)
            target = torch.arange(1, x.shape[1])[None, :]
            mask = target < torch.tensor([len(w) for w in part])[:, None]
            if skip is not None:
                mask &= target > torch.tensor(skip[s : s + len(part)])[:, None]
            logits = self.anchor(x[:, :-1], self._memory(None if ids is None else ids[s : s + len(part)]))
            nll = token_nll(logits, x[:, 1:])
            out[s : s + len(part)] = (nll * mask).sum(1).numpy()
            if tick:
                tick.add(len(part))
        return out

    def padded(self, seqs: list[list[int]]) -> torch.Tensor:
        """Token lists as one right-padded [B, longest] batch (causal: padding changes no earlier position)."""
        x = torch.full((len(seqs), max(map(len, seqs))), self.pad, dtype=torch.long)
        for i, q in enumerate(seqs):
            x[i, : len(q)] = torch.tensor(q)
        return x

    def prompt_ids(self, prompt: str) -> list[int]:
        """A prompt's tokens as the model reads it: after <eot>, as every training document starts."""
        return [self.eot] + self.tokenizer.encode(prompt).ids

    def answer_ids(self, answer: str) -> list[int]:
        """An answer's tokens after its prompt: one leading space, as completions start."""
        return self.tokenizer.encode(" " + answer.strip()).ids

    def answer_logprob(self, prompts: list[str], answers: list[list[int]], ids: torch.Tensor | None) -> np.ndarray:
        """log p(answer | <eot> prompt), summed over the answer's tokens (``answer_ids``, or a completion's own
        tokens); row i of ``ids`` is prompt i's blocks. A prompt too long for the model keeps its end, as
        ``complete`` does."""
        wins, skip = [], []
        for p, ans in zip(prompts, answers):
            prompt = self.prompt_ids(p)[-max(1, self.anchor.cfg.max_seq_len + 1 - len(ans)) :]
            wins.append(prompt + ans)
            skip.append(len(prompt) - 1)
        return -self.window_nll(wins, ids, skip)

    def windows(self, text: str) -> list[list[int]]:
        stream = [self.eot] + self.tokenizer.encode(text).ids + [self.eot]
        return [stream[s : s + self.seq_len + 1] for s in range(0, len(stream) - 1, self.seq_len)]

    def text_nll(
        self,
        texts: list[str],
        paths: np.ndarray,
        setting: str,
        far: np.ndarray | None = None,
        tick: Ticker | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(summed NLL, predicted tokens) per text under ``setting``, each text on its own path (``far``: the
        texts that fetch nothing under ``fetched``; ``tick`` counts the windows done)."""
        wins, owner = [], []
        for i, t in enumerate(texts):
            ws = self.windows(t)
            wins += ws
            owner += [i] * len(ws)
        owner = np.asarray(owner)
        ids = self.block_ids(paths[owner], setting, None if far is None else far[owner])
        nll = self.window_nll(wins, ids, tick=tick)
        return (
            np.bincount(owner, weights=nll, minlength=len(texts)),
            np.bincount(owner, weights=[len(w) - 1 for w in wins], minlength=len(texts)),
        )

    def perplexity(self, docs: list[dict], settings: list[str] | None = None, modes: list[str] | None = None) -> dict:
        """Per setting: perplexity over all held-out documents and per ``source``. ``modes``: routing modes,
        the first for every setting, the others for ``fetched[mode]``."""
        texts = [d["text"] for d in docs]
        sources = np.array([d.get("source") or "all" for d in docs])
        modes = modes or [self.router.routing.mode]
        routes, nearest = self.routes(texts, modes)
        far = self.router.far(nearest)
        runs = [(setting, routes[modes[0]], setting, far) for setting in settings or self.settings]
        if self.bank is not None:
            runs += [(f"fetched[{m}]", routes[m], "fetched", None) for m in modes[1:]]
            runs += [("fetched[always]", routes[modes[0]], "fetched", None)] if far is not None else []
        out = {}
        tick = Ticker("perplexity", len(runs) * sum(len(self.windows(t)) for t in texts), "windows")
        for name, paths, setting, far_ in runs:
            nll, n = self.text_nll(texts, paths, setting, far_, tick)
            row = {"all": math.exp(nll.sum() / n.sum())}
            for s in sorted(set(sources) - {"all"}):
                row[s] = math.exp(nll[sources == s].sum() / n[sources == s].sum())
            out[name] = row
        return out

    def complete(
        self, prompts: list[str], ids: torch.Tensor | None, max_new: list[int], tick: Ticker | None = None
    ) -> list[str]:
        """Greedy continuation of each prompt (after <eot>), ``max_new[i]`` tokens or until <eot>, as text."""
        return [self.tokenizer.decode(t) for t in self.generate(prompts, ids, max_new, tick)]

    @torch.no_grad()
    def generate(
        self, prompts: list[str], ids: torch.Tensor | None, max_new: list[int], tick: Ticker | None = None
    ) -> list[list[int]]:
        """``complete``'s tokens: a completion scored as the model wrote it, not re-encoded from its text
        (``tick`` counts the prompts done)."""
        out = []
        for s in range(0, len(prompts), self.batch_size):
            seqs = [self.prompt_ids(p) for p in prompts[s : s + self.batch_size]]
            want = max_new[s : s + len(seqs)]
            memory = self._memory(None if ids is None else ids[s : s + len(seqs)])
            # the anchor's key/value cache when the whole answer fits its context; else re-run the window per token
            cached = hasattr(self.anchor, "decode") and max(map(len, seqs)) + max(want) <= self.anchor.cfg.max_seq_len
            new = (self._decode if cached else self._recompute)(seqs, memory, want)
            for n, m in zip(new, want):
                n = n[:m]
                out.append(n[: n.index(self.eot)] if self.eot in n else n)
            if tick:
                tick.add(len(seqs))
        return out

    def _decode(self, seqs: list[list[int]], memory, want: list[int]) -> list[list[int]]:
        cache = DecodeCache(torch.tensor([len(q) for q in seqs]))
        logits = self.anchor.decode(self.padded(seqs), cache, memory)
        new = [[] for _ in seqs]
        for _ in range(max(want)):
            for i, t in enumerate(logits.argmax(-1).tolist()):
                new[i].append(t)
            if all(len(n) >= m or self.eot in n for n, m in zip(new, want)):
                break  # every answer is complete: more tokens would be cut off
            logits = self.anchor.decode(torch.tensor([[n[-1]] for n in new]), cache, memory)
        return new

    def _recompute(self, seqs: list[list[int]], memory, want: list[int]) -> list[list[int]]:
        new = [[] for _ in seqs]
        for _ in range(max(want)):
            views = [q[-self.anchor.cfg.max_seq_len :] for q in seqs]  # a long prompt keeps its end
            logits = self.anchor(self.padded(views), memory)
            nxt = logits[torch.arange(len(views)), torch.tensor([len(v) - 1 for v in views])].argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                new[i].append(t)
                seqs[i].append(t)
        return new

    def entity_documents(self, probes: list[Probe]) -> dict[str, list[str]]:
        """entity -> its training doc ids: the probes' ``doc_ids``, else routed documents naming the entity.

        ``documents/`` is streamed in Arrow batches and matched by Arrow's RE2 regex kernel, one pass
        per batch and entity; only matching doc ids reach Python. "As a whole word" is Python's ``\b``
        with Unicode word characters (letters, digits, underscore), case-insensitive.
        """
        found = {p.entity: list(p.doc_ids) for p in probes if p.doc_ids}
        missing = sorted({p.entity for p in probes} - set(found))
        if missing:
            import pyarrow.compute as pc
            import pyarrow.dataset as ds

            word, before, after = r"[\pL\pN_]", r"(?:^|[^\pL\pN_])", r"(?:$|[^\pL\pN_])"
            patterns = {
                e: (before if re.match(r"\w", e[:1]) else word)
                + "(?:"
                + re.escape(e)
                + ")"
                + (after if re.match(r"\w", e[-1:]) else word)
                for e in missing
            }
            found.update({e: [] for e in missing})
            documents = ds.dataset(os.path.join(self.router.run_dir, "documents"), format="parquet")
            for batch in documents.to_batches(columns=["doc_id", "text"]):
                for e, pattern in patterns.items():
                    hit = pc.match_substring_regex(batch.column("text"), pattern, ignore_case=True)
                    found[e] += pc.filter(batch.column("doc_id"), pc.fill_null(hit, False)).to_pylist()
        return found

    def doc_paths(self, doc_ids: set[str]) -> dict[str, list[int]]:
        import pyarrow.compute as pc
        import pyarrow.dataset as ds

        if not doc_ids:  # no probe names a training document (isin of an empty list has no type)
            return {}
        table = ds.dataset(os.path.join(self.router.run_dir, "routed"), format="parquet", partitioning="hive").to_table(
            columns=["doc_id", "path"], filter=pc.field("doc_id").isin(sorted(doc_ids))
        )
        return dict(zip(table.column("doc_id").to_pylist(), table.column("path").to_pylist()))

    def probe_oracle(
        self, probes: list[Probe], routes: np.ndarray, mode_leaves: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray], list[set]]:
        """From each probe's entity documents: (oracle paths [N, p], agreement per mode [N] (NaN without
        documents), blocked block-id sets). A probe whose entity has no routed document keeps its own route
        as its oracle and blocks nothing."""
        entity_docs = self.entity_documents(probes)
        paths_of = self.doc_paths({d for docs in entity_docs.values() for d in docs})
        oracle, blocked = routes.copy(), []
        agreement = {m: np.full(len(probes), np.nan) for m in mode_leaves}
        for i, p in enumerate(probes):
            doc_paths = [paths_of[d] for d in entity_docs[p.entity] if d in paths_of]
            if not doc_paths:
                blocked.append(set())
                continue
            doc_leaves = self.router.leaves(np.asarray(doc_paths))
            for m, leaves in mode_leaves.items():
                agreement[m][i] = float(np.mean(doc_leaves == leaves[i]))
            oracle[i] = doc_paths[int(np.flatnonzero(doc_leaves == oracle_leaf(doc_leaves))[0])]
            blocked.append(set(path_block_ids(np.asarray(doc_paths), self.k).ravel().tolist()))
        return oracle, agreement, blocked

    def probe_runs(
        self,
        by_mode: dict[str, np.ndarray],
        modes: list[str],
        routes: np.ndarray,
        oracle: np.ndarray,
        blocked: list[set],
        far: np.ndarray | None = None,
    ) -> dict:
        """The probes' block ids per evaluated setting (the module doc's probe settings); ``blocked``: the
        headline route with the blocks on the entity documents' paths disabled; ``far``: the probes that fetch
        nothing under ``fetched`` (then ``fetched[always]`` fetches their route)."""
        if self.bank is None:
            return {"none": None}
        runs = {
            "fetched": self.block_ids(by_mode[modes[0]], "fetched", far),
            **({"fetched[always]": self.block_ids(by_mode[modes[0]], "fetched")} if far is not None else {}),
            "generic": self.block_ids(routes, "generic"),
            "none": None,
            "oracle": self.block_ids(oracle, "fetched"),
            **{f"fetched[{m}]": self.block_ids(by_mode[m], "fetched") for m in modes[1:]},
        }
        ids = self.block_ids(routes, "fetched")
        for i, b in enumerate(blocked):
            ids[i] = torch.tensor([-1 if int(x) in b else int(x) for x in ids[i]])
        runs["blocked"] = ids
        return runs

    def probe(self, probes: list[Probe], modes: list[str] | None = None) -> dict:
        """Per-probe records and per-bucket summaries (see the module doc); ``modes``: routing modes to
        compare, the first is the headline (``fetched``, ``blocked``, ``agreement``)."""
        prompts = [p.prompt for p in probes]
        modes = modes or [self.router.routing.mode]
        by_mode, nearest = self.routes(prompts, modes)
        far = self.router.far(nearest)
        first = {m: leading_path(r) for m, r in by_mode.items()}
        routes = first[modes[0]]
        leaves = self.router.leaves(routes)
        mode_leaves = {m: self.router.leaves(r) for m, r in first.items()}
        oracle, mode_agreement, blocked = self.probe_oracle(probes, routes, mode_leaves)
        agreement = mode_agreement[modes[0]]
        max_new = [len(self.tokenizer.encode(" " + p.answer).ids) + 1 for p in probes]
        runs = self.probe_runs(by_mode, modes, routes, oracle, blocked, far)
        correct = {}
        tick = Ticker("probes", len(runs) * len(prompts), "completions")
        for name, ids in runs.items():
            completions = self.complete(prompts, ids, max_new, tick)
            correct[name] = np.array([is_exact_match(c, p.answer) for c, p in zip(completions, probes)])
        freqs = np.array([p.frequency for p in probes])
        edges = bucket_edges(freqs)
        bucket = bucket_of(freqs, edges)
        n_blocks = n_tree_blocks(self.k, self.depth)
        oracle_leaves = self.router.leaves(oracle)
        on_oracle = {m: mode_leaves[m] == oracle_leaves for m in modes}
        buckets = bucket_summaries(probes, freqs, bucket, agreement, mode_agreement, on_oracle, correct)
        records = [
            dict(
                asdict(p),
                doc_ids=None,
                bucket=int(bucket[i]),
                leaf=int(leaves[i]),
                agreement=None if np.isnan(agreement[i]) else float(agreement[i]),
                blocked_share=len(blocked[i]) / n_blocks,
                nearest=None if nearest is None or not np.isfinite(nearest[i]) else float(nearest[i]),
                far=None if far is None else bool(far[i]),
                **{n: bool(c[i]) for n, c in correct.items()},
            )
            for i, p in enumerate(probes)
        ]
        return {
            "edges": edges.tolist(),
            "buckets": buckets,
            "records": records,
            "modes": modes,
            "accuracy": {n: float(c.mean()) for n, c in correct.items()},
            "routing_agreement": float(np.nanmean(agreement)),
            "fetch_cost": {m: self.fetch_cost(runs["fetched" if m == modes[0] else f"fetched[{m}]"]) for m in modes}
            if self.bank is not None
            else {},
            "blocked_bank_share": float(np.mean([len(b) for b in blocked]) / n_blocks),
            "far_share": None if far is None else float(far.mean()),
        }


def bucket_summaries(
    probes: list[Probe],
    freqs: np.ndarray,
    bucket: np.ndarray,
    agreement: np.ndarray,
    mode_agreement: dict[str, np.ndarray],
    on_oracle: dict[str, np.ndarray],
    correct: dict[str, np.ndarray],
) -> list[dict]:
    """``Evaluator.probe``'s per-bucket rows: frequency range, sizes, routing agreement (headline and per mode),
    oracle-leaf share and accuracy per setting; None for an empty bucket."""
    buckets = []
    for b in range(N_BUCKETS):
        sel = bucket == b
        f = freqs[sel]
        buckets.append(
            {
                "bucket": b,
                "frequency_range": [int(f.min()), int(f.max())] if sel.any() else None,
                "probes": int(sel.sum()),
                "entities": len({probes[i].entity for i in np.flatnonzero(sel)}),
                "routing_agreement": float(np.nanmean(agreement[sel])) if sel.any() else None,
                "routing_agreement_by_mode": {
                    m: float(np.nanmean(a[sel])) if sel.any() else None for m, a in mode_agreement.items()
                },
                "oracle_leaf_by_mode": {m: float(o[sel].mean()) if sel.any() else None for m, o in on_oracle.items()},
                "accuracy": {n: float(c[sel].mean()) if sel.any() else None for n, c in correct.items()},
            }
        )
    return buckets


def block_report(model_dir: str, router, texts: list[str]) -> list[list[dict]]:
    """Per text, per memory level: the text's mean NLL (nats/token) with its whole path, without that
    level's block and with the generic block in its place; ``delta`` = without - with: how much the
    block carries the text. ``hmem.query --model`` prints it."""
    ev = Evaluator(model_dir, router)
    if ev.bank is None:
        raise ValueError(f"{model_dir} is an anchor-only model: it has no memory blocks to report on")
    paths = router.route_texts(texts)
    if paths.ndim == 3:
        raise ValueError("the per-level report needs one path per text: use another routing mode than two_paths")
    blocks = path_block_ids(paths, ev.k)
    nll = {}
    for setting in ev.settings:
        if setting != "none":
            total, n = ev.text_nll(texts, paths, setting)
            nll[setting] = total / n
    return [
        [
            {
                "level": l,
                "block": int(blocks[q, l - 1]),
                "nll_fetched": float(nll["fetched"][q]),
                "nll_without": float(nll[f"off@{l}"][q]),
                "nll_generic": float(nll[f"generic@{l}"][q]),
                "delta": float(nll[f"off@{l}"][q] - nll["fetched"][q]),
            }
            for l in range(1, ev.depth + 1)
            if f"off@{l}" in nll
        ]
        for q in range(len(texts))
    ]


def model_routing(
    model_dir: str,
    modes: list[str] | None = None,
    neighbours: int | None = None,
    nprobe: int | None = None,
    vote: str | None = None,
    words: float | None = None,
    temperature: float | None = None,
    far: float | None = None,
):
    """The routing of prompts for an exported model: the one its meta.json records (index.router defaults
    for older exports; a recorded routing without ``vote`` used the linear vote, and keeps it), with the
    first of ``modes``, the given sizes, ``vote`` and ``far`` overriding it."""
    from index.routing import RoutingConfig

    from train.export import read_meta

    meta = read_meta(model_dir)
    recorded = dict(meta.get("routing") or {})
    if recorded and "vote" not in recorded:
        recorded["vote"] = "linear"  # recorded before votes had a name: the rule it was evaluated with
    if meta.get("memory") is None:  # a dense model fetches nothing: routing decides nothing, needs no document index
        recorded, far = dict(recorded, mode="descent", far=None), None
    given = {
        "mode": modes[0] if modes else None,
        "neighbours": neighbours,
        "nprobe": nprobe,
        "vote": vote,
        "words": words,
        "temperature": temperature,
        "far": far,
    }
    return RoutingConfig(**dict(recorded, **{k: v for k, v in given.items() if v is not None}))


def model_summary(ev: Evaluator) -> dict:
    from train.memory import param_counts

    out = {
        "anchor_params": ev.anchor.num_params(),
        "step": ev.meta.get("step"),
        "tree_version": ev.meta["tree_version"],
    }
    if ev.bank is not None:
        counts = param_counts(ev.anchor.cfg, ev.bank.config)
        out.update(fetched_params=counts["fetched"], bank_params=counts["bank"], ranks=list(ev.bank.config.ranks))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """hmem-evaluate's command line: the model, its run, what to evaluate on and how to route it."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="export directory (OUT/export of train/main.py)")
    ap.add_argument("--run", required=True, help="the run directory the model was trained on")
    ap.add_argument("--heldout", help="JSONL of held-out documents (text, optional source)")
    ap.add_argument("--probes", help="JSONL of probes (prompt, answer, entity, frequency[, doc_ids])")
    ap.add_argument("--out", help="write the results JSON here (default: print it)")
    ap.add_argument("--max-docs", type=int, default=0, help="only the first N held-out documents (0: all)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--routing",
        nargs="+",
        choices=MODES,
        metavar="MODE",
        help=f"routing modes to compare ({', '.join(MODES)}); the first is the headline "
        "(default: the model's recorded mode)",
    )
    ap.add_argument("--neighbours", type=int, help="documents in the neighbour vote (default: the model's)")
    ap.add_argument("--nprobe", type=int, help="leaf lists the vote searches (default: the model's)")
    ap.add_argument("--vote", choices=VOTES, help="how the neighbours weigh (index/router.py; default: the model's)")
    ap.add_argument("--words", type=float, help="rerank vote: weight of the query's words (default: the model's)")
    ap.add_argument("--temperature", type=float, help="rerank vote: temperature (default: the model's)")
    ap.add_argument(
        "--far", type=float, help="prompts whose best vote score is below this fetch no memory (default: the model's)"
    )
    return ap.parse_args(argv)


def summary_line(out: str, result: dict) -> str:
    """What main prints when the results went to a file: where, and the headline numbers."""
    line = [f"wrote {out}"]
    if "perplexity" in result:
        line.append("held-out perplexity " + ", ".join(f"{k} {v['all']:.2f}" for k, v in result["perplexity"].items()))
    if "probes" in result:
        line.append("probe accuracy " + ", ".join(f"{k} {v:.1%}" for k, v in result["probes"]["accuracy"].items()))
    return "; ".join(line)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from index.router import Router

    try:
        routing = model_routing(
            args.model, args.routing, args.neighbours, args.nprobe, args.vote, args.words, args.temperature, args.far
        )
        modes = args.routing or [routing.mode]
        router = Router.load(args.run, documents=any(m != "descent" for m in modes), routing=routing)
        ev = Evaluator(args.model, router, args.batch_size)
        result = {"model": model_summary(ev), "settings": ev.settings, "routing": dataclasses.asdict(routing)}
        if args.heldout:
            docs = read_jsonl(args.heldout, ("text",))
            result["perplexity"] = ev.perplexity(docs[: args.max_docs or None], modes=modes)
        if args.probes:
            result["probes"] = ev.probe(read_probes(args.probes), modes)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=1)
    if not args.out:
        print(text)
        return 0
    with open(args.out, "w") as f:
        f.write(text)
    print(summary_line(args.out, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
