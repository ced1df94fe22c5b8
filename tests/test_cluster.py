"""A real Spark standalone cluster on loopback (a master and two workers, each with its own work and local
directories) gives the same outputs as local[2]."""

import os
import socket
import subprocess
import time

import numpy as np
import pytest

from tests.spark_helpers import BIN, SMALL, manifest, read_table, spark_env, submit
from train.distributed import free_port

pytestmark = pytest.mark.slow


def wait_for_port(port: int, timeout: float = 90) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="module")
def standalone(tmp_path_factory):
    logs = tmp_path_factory.mktemp("spark-logs")
    port = free_port()
    cls = os.path.join(BIN, "spark-class")
    master = subprocess.Popen(
        [
            cls,
            "org.apache.spark.deploy.master.Master",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--webui-port",
            str(free_port()),
        ],
        env=spark_env(),
        stdout=open(logs / "master.log", "w"),
        stderr=subprocess.STDOUT,
    )
    workers, workdirs = [], []
    try:
        wait_for_port(port)
        url = f"spark://127.0.0.1:{port}"
        for w in range(2):  # no directory shared between workers, or with the driver's scratch space
            env = dict(spark_env(), SPARK_WORKER_DIR=str(logs / f"work{w}"), SPARK_LOCAL_DIRS=str(logs / f"local{w}"))
            workdirs.append(logs / f"work{w}")
            workers.append(
                subprocess.Popen(
                    [
                        cls,
                        "org.apache.spark.deploy.worker.Worker",
                        url,
                        "--host",
                        "127.0.0.1",
                        "--cores",
                        "1",
                        "--memory",
                        "2g",
                        "--webui-port",
                        str(free_port()),
                    ],
                    env=env,
                    stdout=open(logs / f"worker{w}.log", "w"),
                    stderr=subprocess.STDOUT,
                )
            )
        time.sleep(5)
        yield url, workdirs
    finally:
        for p in (*workers, master):
            p.terminate()
            p.wait(30)


def test_standalone_cluster_matches_local(standalone, bbc_run, tmp_path):
    url, workdirs = standalone
    local = bbc_run["run"]  # the same job on local[2] (conftest.py)
    args = ["--input", str(bbc_run["input"]), "--id-column", "id", *SMALL]
    cluster = submit([*args, "--output", str(tmp_path / "cluster")], master=url)
    assert cluster.returncode == 0, cluster.stdout[-3000:]
    # both workers really ran executors for the job (an application folder appears in each one's work dir)
    for workdir in workdirs:
        assert any(name.startswith("app-") for name in os.listdir(workdir)), workdir
    ml, mc = manifest(local), manifest(tmp_path / "cluster")
    assert mc["tree_version"] == ml["tree_version"] and mc["checksums"] == ml["checksums"]
    assert mc["levels"] == ml["levels"] and mc["sequences"] == ml["sequences"]
    rl = read_table(local / "routed").sort_values("doc_id")
    rc = read_table(tmp_path / "cluster" / "routed").sort_values("doc_id")
    assert rl.doc_id.tolist() == rc.doc_id.tolist()
    assert np.array_equal(np.stack(rl.path.to_numpy()), np.stack(rc.path.to_numpy()))
    sl = read_table(local / "shards").sort_values("seq_id")
    sc = read_table(tmp_path / "cluster" / "shards").sort_values("seq_id")
    assert [list(t) for t in sl.tokens] == [list(t) for t in sc.tokens]
