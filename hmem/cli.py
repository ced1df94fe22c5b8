"""What the hmem commands share: answers out as text or JSON lines, a failure as one line on stderr."""

from __future__ import annotations

import json
import sys
from typing import Callable


def respond(work: Callable[[], list[dict]], as_json: bool, fmt: Callable[[dict], str]) -> int:
    """Run ``work``; print each answer (one JSON object per line, or ``fmt``'s text) and return the exit code."""
    try:
        out = work()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for a in out:
        print(json.dumps(a) if as_json else fmt(a) + "\n")
    return 0
