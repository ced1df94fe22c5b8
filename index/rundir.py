"""The run directory (docs/FORMATS.md): the one reader and writer of its manifest.json.

pipeline/ writes a run; index/ and train/ read it. The manifest's ``format`` versions the whole directory
(manifest, shards/, routed/, documents/, tokenizer.json): a reader refuses an unknown version in one line,
and the keys every reader relies on are checked for type once, here, instead of being cast at each use.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa

FORMAT = "hmem-run/1"
MANIFEST = "manifest.json"
# the keys every reader relies on, and their JSON types (docs/FORMATS.md lists the rest) ...
REQUIRED = {"tree_version": str, "k": int, "depth": int, "levels": list, "config": dict}
# ... and those a trainer or an evaluator also needs (the router alone does not)
TRAINING = {"seq_len": int, "vocab_size": int, "eot_id": int, "pad_id": int, "documents_routed": int}


# shards/l1=<i1>/*.parquet: packed sequences (docs/FORMATS.md); the job writes it through Spark's equivalent
SHARD_SCHEMA = pa.schema(
    [
        ("seq_id", pa.int64()),
        ("path", pa.list_(pa.int32())),
        ("leaf", pa.int64()),
        ("tokens", pa.list_(pa.int32())),
        ("n_valid", pa.int32()),
        ("doc_ids", pa.list_(pa.string())),
    ]
)


def read_manifest(run_dir: str, need: dict | None = None) -> dict:
    """A run's manifest.json, checked: present, JSON, this format, the REQUIRED (and ``need``) keys' types."""
    path = os.path.join(run_dir, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: is the jobs/cluster_corpus.py run finished? "
            "(a run directory holds tree/, shards/, routed/, manifest.json; docs/FORMATS.md)"
        )
    try:
        with open(path) as f:
            m = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is corrupt ({e}): rerun jobs/cluster_corpus.py into a new directory") from None
    fmt = m.get("format") if isinstance(m, dict) else None
    if fmt != FORMAT:
        raise ValueError(
            f"{path}: format {fmt!r}, this code reads {FORMAT!r}: rerun jobs/cluster_corpus.py "
            "with this version, or use the version that wrote it"
        )
    for key, kind in {**REQUIRED, **(need or {})}.items():
        if not isinstance(m.get(key), kind) or isinstance(m.get(key), bool):
            raise ValueError(f"{path}: {key} is {m.get(key)!r}, expected {kind.__name__} ({FORMAT}, docs/FORMATS.md)")
    return m


def check(m: dict, where: str = MANIFEST) -> None:
    """The count invariants: every input row routed or quarantined, every level counting every document."""
    if m["documents_in"] != m["documents_routed"] + m["documents_quarantined"]:
        raise ValueError(
            f"{where}: {m['documents_in']} in != {m['documents_routed']} routed + "
            f"{m['documents_quarantined']} quarantined"
        )
    for lv in m["levels"]:
        if sum(lv["node_documents"]) != m["documents_routed"]:
            raise ValueError(
                f"{where}: level {lv['level']} counts {sum(lv['node_documents'])} documents, "
                f"expected {m['documents_routed']}"
            )


def write_manifest(run_dir: str, m: dict) -> str:
    """Check the invariants, stamp with FORMAT and write atomically (a crash leaves the old manifest or none, never
    half)."""
    m = {**m, "format": FORMAT}
    check(m, os.path.join(run_dir, MANIFEST))
    path, tmp = os.path.join(run_dir, MANIFEST), os.path.join(run_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(m, f, indent=1)
    os.replace(tmp, path)
    return path
