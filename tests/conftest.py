"""The machine's memory at the start of the run (so a CI log shows when tests ran short of it), the tiny
trained model that the evaluation and ask tests share, and the job's run that the routing, forget and cluster
tests share."""

import glob
import os
import subprocess
import sys

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures import PROMPTS, make_run_dir, trainer_args

from index.docindex import build_document_index
from index.router import Router
from corpora.bbc import write_jsonl
from tests.spark_helpers import SMALL, bbc, submit


def pytest_sessionstart(session):
    vm = psutil.virtual_memory()
    line = f"memory: {vm.available / 2**30:.1f} of {vm.total / 2**30:.1f} GiB available"
    if os.path.isdir("/dev/shm"):
        shm = psutil.disk_usage("/dev/shm")
        stale = glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")
        line += f"; /dev/shm {shm.used / 2**30:.1f} GiB used, {len(stale)} DeepSpeed all-reduce buffers"
    session.config.pluginmanager.get_plugin("terminalreporter").write_line(line)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {
    **os.environ,
    "TORCH_EXTENSIONS_DIR": os.path.join(ROOT, ".cache", "torch_extensions"),
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": ROOT,
    "HF_HUB_OFFLINE": "1",
}


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """A tiny model trained by the real trainer (3 steps) on a fixture run with a 384-d tree; routed/ and
    documents/ name two probe entities. (run dir, export dir, {entity: descent path of its prompt})."""
    root = tmp_path_factory.mktemp("evaluate")
    run = make_run_dir(str(root / "run"), k=2, depth=2, seq_len=16, dim=384)
    out = root / "model"
    cmd = [sys.executable] + trainer_args(run, out, "schedule.max_steps=3", "optim.memory.lr=0.05")
    p = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    router = Router.load(run, documents=False)
    routes = dict(zip(PROMPTS, router.route_texts(list(PROMPTS.values())).tolist()))
    # the entity's training documents: hydrogen's on its probe's own path, tree's under the other level-1 node
    away = [1 - routes["tree"][0], routes["tree"][1]]
    docs = [
        ("h0", routes["hydrogen"], "hydrogen is element one"),
        ("h1", routes["hydrogen"], "Hydrogen: one proton"),
        ("t0", away, "a tree of memory blocks"),
    ]
    rows = {
        "doc_id": [d for d, _, _ in docs],
        "path": [p for _, p, _ in docs],
        "leaf": [p[0] * 2 + p[1] for _, p, _ in docs],
        "l1": [p[0] for _, p, _ in docs],
    }
    pq.write_to_dataset(pa.table(rows), os.path.join(run, "routed"), partition_cols=["l1"])
    os.makedirs(os.path.join(run, "documents"))
    pq.write_table(
        pa.table({"doc_id": [d for d, _, _ in docs], "text": [t for _, _, t in docs]}),
        os.path.join(run, "documents", "part-0.parquet"),
    )
    return run, str(out / "export"), routes


@pytest.fixture(scope="session")
def bbc_run(tmp_path_factory):
    """The job (SMALL) on 48 BBC articles with their ids, and its document index: {input, run, recs}. One job
    for every test that needs a run of real documents; read only (a test writes its outputs elsewhere)."""
    d = tmp_path_factory.mktemp("bbc48")
    recs = [{"id": r["id"], "text": r["text"]} for r in bbc(48, start=900)]
    write_jsonl(d / "input.jsonl", recs)
    p = submit(["--input", str(d / "input.jsonl"), "--id-column", "id", "--output", str(d / "run"), *SMALL])
    assert p.returncode == 0, p.stdout[-4000:]
    build_document_index(str(d / "run"), log=lambda m: None)
    return {"input": d / "input.jsonl", "run": d / "run", "recs": recs}
