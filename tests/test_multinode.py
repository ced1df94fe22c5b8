"""Two nodes on one machine: 2 launchers x 1 rank each over loopback, DeepSpeed's own multi-node launcher.

The launcher is ``deepspeed --no_ssh --num_nodes 2 --node_rank i --hostfile H`` (DeepSpeed 0.19.8's
runner.py): with --no_ssh the runner neither checks ssh nor starts pdsh; it hands the hostfile's hosts
and --node_rank to deepspeed.launcher.launch, which starts the local ranks of that node only (global
ranks numbered along the hostfile). The host names are never resolved, so two names work on one host.
Each node has LOCAL_SIZE=1 < WORLD_SIZE=2, so DeepSpeed's shared-memory all-reduce stays off and every
collective goes through gloo over TCP: the path the ranks take between real machines. torchrun would
do as well; DeepSpeed's launcher is the one docs/DISTRIBUTED.md describes first.

When node 1 dies, node 0 must exit non-zero within 90 s: its rank's next gloo collective fails on the
closed connections ("Connection reset by peer", a few seconds here) and its launcher stops. A peer lost
without closing them would be caught by DeepSpeed's process-group timeout (DEEPSPEED_TIMEOUT, 10 minutes).
"""

import os
import signal
import subprocess
import time

import numpy as np
import pytest
from fixtures import PROMPTS, make_run_dir, trainer_args
from test_trainer import BIN, ENV, ROOT, losses, shm_buffers, train

from index.router import Router
from train.distributed import free_port
from train.evaluate import Evaluator

SETS = ("schedule.max_steps=60", "schedule.checkpoint_every=10", "schedule.log_every=1")


def launch_nodes(run: str, out: str, logs: str) -> tuple[list[subprocess.Popen], list[list[str]]]:
    """Both nodes' launchers, each in its own process group (a node's launcher and its ranks die together)."""
    hostfile = os.path.join(logs, "hostfile")
    with open(hostfile, "w") as f:
        f.write("node0 slots=1\nnode1 slots=1\n")
    port, procs, cmds = free_port(), [], []
    for node in range(2):
        cmd = [
            f"{BIN}/deepspeed",
            "--no_ssh",
            "--num_nodes",
            "2",
            "--node_rank",
            str(node),
            "--hostfile",
            hostfile,
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            *trainer_args(run, out, *SETS),
        ]
        with open(os.path.join(logs, f"node{node}.{port}.log"), "w") as log:
            procs.append(
                subprocess.Popen(cmd, env=ENV, cwd=ROOT, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
            )
        cmds.append(cmd)
    return procs, cmds


def node_log(logs: str, cmds: list[list[str]], node: int) -> str:
    port = cmds[node][cmds[node].index("--master_port") + 1]
    with open(os.path.join(logs, f"node{node}.{port}.log")) as f:
        return f.read()


def perplexities(export: str, run: str) -> dict[str, float]:
    """Perplexity of a few texts on every leaf's path, per memory setting, through the real Evaluator."""
    ev = Evaluator(export, Router.load(run, documents=False), batch_size=4)
    texts = list(PROMPTS.values()) * 2
    paths = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    out = {}
    for setting in ("fetched", "generic", "none"):
        nll, n = ev.text_nll(texts, paths, setting)
        out[setting] = float(np.exp(nll.sum() / n.sum()))
    return out


@pytest.mark.slow
def test_two_nodes_survive_a_dead_node_and_match_one_node(tmp_path):
    run = make_run_dir(str(tmp_path / "run"), k=2, depth=2, seqs_per_leaf=[6, 9, 12, 6])
    ref, out, logs = str(tmp_path / "ref"), str(tmp_path / "out"), str(tmp_path)
    train("deepspeed", run, ref, *SETS)  # one node, 2 ranks, uninterrupted

    procs, cmds = launch_nodes(run, out, logs)
    latest = os.path.join(out, "checkpoints", "latest")
    deadline, tag = time.time() + 240, ""
    while time.time() < deadline and procs[0].poll() is None and tag < "step00000020":
        tag = open(latest).read().strip() if os.path.exists(latest) else ""
        time.sleep(0.02)
    training = procs[0].poll() is None
    os.killpg(procs[1].pid, signal.SIGKILL)  # node 1: its launcher and its rank
    procs[1].wait()
    killed = time.time()
    try:
        rc = procs[0].wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(procs[0].pid, signal.SIGKILL)
        pytest.fail("node 0 hung after node 1 died")
    assert training and tag >= "step00000020", node_log(logs, cmds, 0)[-3000:]  # killed after a checkpoint
    assert rc != 0, node_log(logs, cmds, 0)[-3000:]
    print(f"node 0 exited {rc} {time.time() - killed:.1f}s after node 1 was killed")
    assert not os.path.exists(os.path.join(out, "export")), "the run finished before node 1 was killed"
    assert not any(shm_buffers(c) for c in cmds)

    procs, cmds = launch_nodes(run, out, logs)
    for node, p in enumerate(procs):
        try:
            rc = p.wait(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                os.killpg(q.pid, signal.SIGKILL)
            pytest.fail(f"the relaunched node {node} did not finish")
        assert rc == 0, node_log(logs, cmds, node)[-3000:]
    resumed = [line for line in node_log(logs, cmds, 0).splitlines() if "resumed from" in line]
    assert resumed, node_log(logs, cmds, 0)[-3000:]
    print(resumed[0])

    a, b = losses(ref), losses(out)
    assert sorted(a) == sorted(b) == list(range(1, 61))
    diff = max(abs(a[s] - b[s]) for s in a)
    print(f"max |loss(1 node) - loss(2 nodes)| = {diff:.3g}")
    assert diff <= 1e-5
    want, got = perplexities(os.path.join(ref, "export"), run), perplexities(os.path.join(out, "export"), run)
    print(f"perplexity 1 node {want}, 2 nodes {got}")
    assert all(got[s] == pytest.approx(want[s], rel=1e-6) for s in want)
