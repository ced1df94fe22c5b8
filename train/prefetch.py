"""Read the blocks of the next batches while the current step computes (disk store, train/store_disk.py).

``Prefetcher`` wraps a loader (``next_batch``, ``state_dict``, ``load_state_dict``, ``len``) and
keeps ``depth`` batches drawn ahead of the one the trainer is given. Each batch drawn ahead is
queued to a thread that loads its blocks and their AdamW moments into the store's cache
(``store.prefetch``); evictions of updated records happen there too, so they are written behind.

The batches are the loader's own, in its order, and ``state_dict`` is the loader's state before
the first batch not yet handed out (a snapshot taken when it was drawn), so a checkpoint resumes
exactly as without a prefetcher.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections import deque


class Prefetcher:
    def __init__(self, loader, store, depth: int):
        self.loader, self.store, self.depth = loader, store, depth
        self.ahead: deque = deque()  # (loader state before the batch, batch)
        self.jobs: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="bank-prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (block_ids := self.jobs.get()) is not None:
            try:
                for level in self.store.shapes:
                    col = block_ids[:, level - 1]
                    ids = col[col >= 0].unique()
                    if len(ids):
                        self.store.prefetch(level, ids)
            except BaseException as e:  # surfaced on the trainer's thread at the next batch
                self.error = e
                return

    def next_batch(self):
        if self.error is not None:
            raise RuntimeError("the bank prefetch thread failed") from self.error
        while len(self.ahead) < self.depth + 1:
            state = copy.deepcopy(self.loader.state_dict())
            batch = self.loader.next_batch()
            self.ahead.append((state, batch))
            self.jobs.put(batch.block_ids)
        return self.ahead.popleft()[1]

    def state_dict(self) -> dict:
        return self.ahead[0][0] if self.ahead else self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self.ahead.clear()  # queued loads only warm the cache

    def resume(self, ownership, states: list[dict]) -> None:
        self.loader.resume(ownership, states)
        self.ahead.clear()

    def __len__(self) -> int:
        return len(self.loader)

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
