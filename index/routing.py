"""RoutingConfig: how a prompt is routed at inference (the modes and votes: index/router.py's doc).

Apart from the router, which needs faiss, so that the trainer's config can hold one without it.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("descent", "neighbours", "hybrid", "levels", "two_paths")
VOTES = ("rerank", "linear")


@dataclass
class RoutingConfig:
    """How a prompt is routed at inference (recorded in an exported model's meta.json)."""

    mode: str = "neighbours"
    neighbours: int = 32  # training documents in the vote
    nprobe: int = 64  # leaf lists the vote searches (bounded: the cost does not grow with the corpus)
    hybrid_share: float = 0.5  # hybrid: the vote wins when its leaf holds this share of the weight
    vote: str = "rerank"  # how neighbours weigh (index/router.py's doc)
    # rerank's constants, chosen with bench/routing_check.py --grid on a validation corpus that no figure is
    # reported on (configs/longtail/corpus_once.yaml, seed 7; docs/RESULTS.md, "Routing")
    words: float = 0.5  # score = similarity + words x the share of the query's words the document holds
    temperature: float = 0.01  # weight = exp((score - best) / temperature)
    # a prompt whose best vote score is below ``far`` fetches no memory (the bare model): a block trained only on
    # documents unlike the prompt has nothing for it and can damage what the anchor knows (issue 21's retention).
    # None: every prompt fetches its route. Chosen per model on a validation split (bench/posthoc.py).
    far: float | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"routing mode {self.mode!r}: one of {MODES}")
        if self.vote not in VOTES:
            raise ValueError(f"routing vote {self.vote!r}: one of {VOTES}")
        if self.neighbours < 1 or self.nprobe < 1 or not 0 < self.hybrid_share <= 1:
            raise ValueError(f"routing: neighbours and nprobe must be >= 1 and 0 < hybrid_share <= 1 ({self})")
        if self.words < 0 or self.temperature <= 0:
            raise ValueError(f"routing: words must be >= 0 and temperature > 0 ({self})")
        if self.far is not None and not self.needs_index:
            raise ValueError("routing.far compares the vote's best score: it needs a mode that votes, not descent")

    @property
    def needs_index(self) -> bool:
        return self.mode != "descent"
