"""The install is the pinned one: every package of constraints.txt at its version (make install uses the file;
a benchmark figure or a CI time is only comparable between installs that agree)."""

import importlib.metadata
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_installed_versions_are_the_pinned_ones():
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        pins = dict(line.strip().split("==") for line in f if "==" in line and not line.startswith("#"))
    assert len(pins) > 50
    found = {}
    for name in pins:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    wrong = {n: (v, found[n]) for n, v in pins.items() if found[n] != v}
    assert not wrong, f"installed versions differ from constraints.txt (pinned, installed): {wrong}; run make install"
