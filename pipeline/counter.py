"""Live item counts from executors, for progress lines that are true while tasks run.

Spark reports a Python task's accumulator updates only when the task ends, so a
stage of a few long tasks shows no progress until it is nearly over. Instead,
each Python worker sends a UDP datagram ("n more items done") to a listener on
the driver after every batch. Best effort by design: a lost datagram only makes
the live figure low, sending never blocks or fails a task, and a retried task
counts twice (the figure is capped at the stage's total). Stage results never
depend on these counts.
"""

from __future__ import annotations

import socket
import struct
import threading

_FORMAT = "!d"  # items done since the last datagram (float: windowed documents count pro rata)
_sock: socket.socket | None = None  # one sending socket per worker process


class ItemCounter(threading.Thread):
    """Driver side: ``with ItemCounter(host) as c: ... c.address ... c.done``."""

    def __init__(self, host: str = "127.0.0.1"):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.5)
        self.address: tuple[str, int] = self.sock.getsockname()
        self.done = 0.0
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            try:
                data = self.sock.recv(64)
            except socket.timeout:
                continue
            except OSError:
                return
            if len(data) == struct.calcsize(_FORMAT):
                self.done += struct.unpack(_FORMAT, data)[0]

    def __enter__(self) -> "ItemCounter":
        self.start()
        return self

    def __exit__(self, *exc):
        self._halt.set()
        self.join()
        self.sock.close()


def report(address: tuple[str, int] | None, items: float) -> None:
    """Worker side: count ``items`` as done. Never raises."""
    global _sock
    if address is None or items <= 0:
        return
    try:
        if _sock is None:
            _sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        _sock.sendto(struct.pack(_FORMAT, items), address)
    except OSError:
        pass
