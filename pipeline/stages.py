"""Stage bookkeeping: completion markers (resume), timing, and a progress line with rate and ETA.

A stage writes its outputs first and its marker ``RUN/stages/<name>.json`` last,
with the stage's stats and the Spark stages it ran (tasks each, from the status
tracker: the stage's Spark jobs carry its name as their job group),
so a run killed mid-stage redoes that stage only; Spark's overwrite mode makes
the redo idempotent. The marker records the config fingerprint: a rerun with a
different config into the same directory is refused instead of mixing outputs.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable


def fmt_duration(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class RecentRate:
    """Items per second over the last ``window`` seconds of (time, items done) samples.

    A steady run reads its true rate once the start-up (model loads, first batches) has left
    the window, instead of a done/elapsed figure that carries the start-up forever."""

    def __init__(self, t0: float, window: float = 60.0):
        self.window = window
        self.samples: deque[tuple[float, float]] = deque([(t0, 0.0)])

    def add(self, t: float, done: float) -> float:
        self.samples.append((t, done))
        while (
            len(self.samples) > 2 and t - self.samples[1][0] >= self.window
        ):  # keep one sample at or before the window start
            self.samples.popleft()
        (t_a, d_a), (t_b, d_b) = self.samples[0], self.samples[-1]
        return (d_b - d_a) / (t_b - t_a) if t_b > t_a else 0.0


def count_line(done: float, total: int, unit: str, rate: float) -> str:
    """`done/total unit, rate unit/s, ETA` (no ETA before a rate is known or after the end)."""
    line = f"{done:,.0f}/{total:,} {unit}, {rate:,.1f} {unit}/s"
    return line + (f", ETA {fmt_duration((total - done) / rate)}" if rate > 0 and done < total else "")


class Ticker:
    """Progress of a loop outside Spark: ``add(n)`` after each piece of work; every ``every`` seconds, and at
    the end, prints `[name] done/total unit, rate over the recent window, ETA` to stderr."""

    def __init__(self, name: str, total: int, unit: str, every: float = 30.0, window: float = 60.0):
        self.name, self.total, self.unit, self.every = name, total, unit, every
        self.done, self.last = 0, time.time()
        self.rate = RecentRate(self.last, window)

    def add(self, n: int) -> None:
        self.done += n
        now = time.time()
        rate = self.rate.add(now, self.done)
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            print(f"[{self.name}] {count_line(self.done, self.total, self.unit, rate)}", file=sys.stderr, flush=True)


class Progress(threading.Thread):
    """Polls Spark's status tracker and prints `stage: tasks, items/s, ETA` every few seconds.

    With ``done_items`` (a live count, pipeline/counter.py) the rate is items counted over the
    last ``window`` seconds and the ETA the remaining items at that rate. Without it, items per
    second are estimated as (items in the stage) x (share of tasks done) / elapsed, which is
    exact when tasks are even and honest about what it is otherwise.
    """

    def __init__(
        self,
        spark,
        name: str,
        total_items: int | None,
        unit: str,
        every: float = 10.0,
        done_items: Callable[[], float] | None = None,
        window: float = 60.0,
    ):
        super().__init__(daemon=True)
        self.tracker = spark.sparkContext.statusTracker()
        self.name, self.total, self.unit, self.every = name, total_items, unit, every
        self.stop_event = threading.Event()
        self.t0 = time.time()
        self.done_items, self.rate = done_items, RecentRate(self.t0, window)

    def counted_line(self, now: float) -> str:
        """`items done/total, items/s over the recent window, ETA` from the live count."""
        done = min(self.done_items(), self.total)
        return ", " + count_line(done, self.total, self.unit, self.rate.add(now, done))

    def run(self):
        while not self.stop_event.wait(self.every):
            done = total = 0
            for sid in self.tracker.getActiveStageIds():
                info = self.tracker.getStageInfo(sid)
                if info:
                    done += info.numCompletedTasks
                    total += info.numTasks
            elapsed = time.time() - self.t0
            line = f"[{self.name}] {fmt_duration(elapsed)} elapsed, tasks {done}/{total}"
            if self.done_items and self.total:
                line += self.counted_line(time.time())
            elif total and done and self.total:
                frac = done / total
                eta = fmt_duration(elapsed * (1 - frac) / frac)
                line += f", ~{self.total * frac / elapsed:,.0f} {self.unit}/s, ETA {eta}"
            print(line, file=sys.stderr, flush=True)

    def stop(self):
        self.stop_event.set()


def spark_stages(spark, group: str) -> list[dict]:
    """Every Spark stage the jobs of ``group`` ran, with its task count (skipped stages, whose shuffle
    output was reused, are left out: they ran no tasks)."""
    tracker = spark.sparkContext.statusTracker()
    ids = {
        sid for job in tracker.getJobIdsForGroup(group) if (info := tracker.getJobInfo(job)) for sid in info.stageIds
    }
    out = []
    for sid in sorted(ids):
        stage = tracker.getStageInfo(sid)
        if stage and stage.numCompletedTasks:
            out.append({"stage": sid, "name": stage.name, "tasks": stage.numTasks})
    return out


@dataclass
class Stages:
    run_dir: str
    fingerprint: str

    def marker(self, name: str) -> str:
        return os.path.join(self.run_dir, "stages", f"{name}.json")

    def done(self, name: str) -> dict | None:
        """The stats of a completed stage, or None."""
        path = self.marker(name)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            m = json.load(f)
        if m["fingerprint"] != self.fingerprint:
            raise SystemExit(
                f"{self.run_dir} holds a run with another config (stage {name}: {m['fingerprint']} != "
                f"{self.fingerprint}); "
                "use a fresh --output or delete the directory"
            )
        return m["stats"]

    def finish(self, name: str, stats: dict, seconds: float, spark_stages: list[dict]) -> None:
        os.makedirs(os.path.dirname(self.marker(name)), exist_ok=True)
        tmp = self.marker(name) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(
                {
                    "fingerprint": self.fingerprint,
                    "seconds": seconds,
                    "stats": stats,
                    "tasks": sum(s["tasks"] for s in spark_stages),
                    "spark_stages": spark_stages,
                },
                f,
                indent=2,
            )
        os.replace(tmp, self.marker(name))

    def seconds(self, name: str) -> float:
        with open(self.marker(name)) as f:
            return json.load(f)["seconds"]

    def run(
        self,
        spark,
        name: str,
        fn,
        total_items: int | None = None,
        unit: str = "docs",
        done_items: Callable[[], float] | None = None,
    ) -> dict:
        """Run ``fn() -> stats`` unless its marker exists; print what happened (``done_items``: see Progress)."""
        stats = self.done(name)
        if stats is not None:
            print(f"[{name}] done earlier ({fmt_duration(self.seconds(name))}), skipped", file=sys.stderr, flush=True)
            return stats
        t0 = time.time()
        print(f"[{name}] start", file=sys.stderr, flush=True)
        progress = Progress(spark, name, total_items, unit, done_items=done_items)
        progress.start()
        sc = spark.sparkContext
        sc.setJobGroup(f"{self.fingerprint}:{name}", name)
        try:
            stats = fn()
        finally:
            progress.stop()
            sc.setLocalProperty("spark.jobGroup.id", None)
        dt = time.time() - t0
        self.finish(name, stats, dt, spark_stages(spark, f"{self.fingerprint}:{name}"))
        rate = f", {total_items / dt:,.1f} {unit}/s" if total_items else ""
        print(f"[{name}] finished in {fmt_duration(dt)}{rate}", file=sys.stderr, flush=True)
        return stats
