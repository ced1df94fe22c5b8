"""python -m hmem.serve as a subprocess on loopback, on the tiny trained model: the real openai client, the
endpoints, bad input, a client that hangs up, concurrency, SIGTERM, and the RSS of a bank 10x the cache."""

import json
import math
import os
import shutil
import signal
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import psutil
import pytest
from fixtures import PROMPTS, make_run_dir

from bench.serve import serving as bench_serving
from hmem.ask import Asker
from index.router import Router
from index.tree import Tree
from train.memory import MemoryConfig, TensorBlockStore
from train.model import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {
    **os.environ,
    "PYTHONPATH": ROOT,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
QUESTIONS = list(PROMPTS.values()) + ["hydrogen blocks", "the tree of memory", "one proton", "a number is"]


def serving(run: str, export: str, *flags: str):
    """The server on a free port (descent routing: the fixture runs have no document index), ready."""
    return bench_serving(run, export, "--routing", "descent", *flags, env=ENV, timeout=120)


@pytest.fixture(scope="module")
def server(tiny_export):
    run, export, _ = tiny_export
    with serving(run, export, "--max-tokens-limit", "32") as (port, _proc):
        yield port


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="x", max_retries=0)


def post(port: int, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(
        f"http://127.0.0.1:{port}/v1/completions",
        content=content,
        headers={"content-type": "application/json"},
        timeout=60,
        **kw,
    )


def test_openai_client_round_trip_is_the_askers_answer(tiny_export, client):
    run, export, _ = tiny_export
    want = Asker(run, export, mode="descent").ask(QUESTIONS[:2], max_new=8, compare=False)
    one = client.completions.create(model="hmem", prompt=QUESTIONS[0], max_tokens=8)
    assert one.choices[0].text == want[0]["settings"][0]["completion"]
    route = one.model_extra["hmem"][0]
    assert route["path"] == want[0]["path"] and route["blocks"] == want[0]["blocks"] and route["routing"] == "descent"
    assert route["far"] is None  # descent sets no far threshold
    assert route["fetch_ms"] >= 0 and route["compute_ms"] > 0
    both = client.completions.create(model="hmem", prompt=QUESTIONS[:2], max_tokens=8)
    assert [c.text for c in both.choices] == [w["settings"][0]["completion"] for w in want]
    assert [r["path"] for r in both.to_dict()["hmem"]] == [w["path"] for w in want]
    assert both.usage.prompt_tokens > 0 and all(c.finish_reason in ("stop", "length") for c in both.choices)
    text = want[0]["settings"][0]["completion"]
    if text.strip():
        stop = text.strip()[-1]
        cut = client.completions.create(model="hmem", prompt=QUESTIONS[0], max_tokens=8, stop=[stop])
        assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["hmem"]
    assert httpx.get(f"http://127.0.0.1:{server}/health").json()["status"] == "ok"
    client.completions.create(model="hmem", prompt=QUESTIONS[2], max_tokens=2)
    post(server, {"model": "hmem", "prompt": ""})
    text = httpx.get(f"http://127.0.0.1:{server}/metrics").text
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if not line.startswith("#")
    }
    assert values['hmem_requests_total{path="/v1/completions",status="200"}'] >= 1
    assert values['hmem_requests_total{path="/v1/completions",status="400"}'] >= 1
    assert values["hmem_completion_seconds_count"] >= 2 and values['hmem_completion_seconds_bucket{le="+Inf"}'] >= 2
    assert values["hmem_blocks_fetched_total"] >= 2  # one block per level and prompt
    assert values["hmem_cache_hits_total"] + values["hmem_cache_misses_total"] >= 1  # level 2 is not resident
    assert values["hmem_resident_bytes"] > 0 and values["hmem_cache_budget_bytes"] == 256 * 2**20


@pytest.mark.parametrize(
    "body, status, param",
    [
        ("{not json", 400, None),
        ({"model": "hmem", "prompt": ""}, 400, "prompt"),
        ({"model": "hmem", "prompt": []}, 400, "prompt"),
        ({"model": "hmem", "prompt": ["a", " "]}, 400, "prompt"),
        ({"model": "hmem", "prompt": "hydrogen " * 200}, 400, "prompt"),  # past the tiny model's 64-token context
        ({"model": "hmem", "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "hmem", "prompt": "a", "max_tokens": 33}, 400, "max_tokens"),
        ({"model": "gpt-4", "prompt": "a"}, 404, "model"),
        ({"model": "hmem", "prompt": "a", "temperature": 0.7}, 400, "temperature"),
        ({"prompt": "a"}, 400, "model"),
    ],
)
def test_bad_input_is_a_4xx_with_one_line(server, body, status, param):
    r = post(server, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"] and "\n" not in error["message"]


def test_a_client_that_hangs_up_does_not_hurt(server, client):
    body = json.dumps({"model": "hmem", "prompt": QUESTIONS[0], "max_tokens": 16}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    for sent in (head[:20], head + body[:10], head + body):  # half a head, half a body, a whole request
        with socket.create_connection(("127.0.0.1", server)) as s:
            s.sendall(sent)
    assert client.completions.create(model="hmem", prompt=QUESTIONS[1], max_tokens=4).choices[0].text is not None


def test_concurrent_requests_answer_as_sequential_ones(client):
    def ask(q):
        r = client.completions.create(model="hmem", prompt=q, max_tokens=6)
        return r.choices[0].text, r.model_extra["hmem"][0]["path"]

    sequential = [ask(q) for q in QUESTIONS]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(ask, QUESTIONS * 3))
    assert concurrent == sequential * 3


@pytest.mark.slow
def test_sigterm_stops_cleanly(tiny_export):
    run, export, _ = tiny_export
    with serving(run, export) as (port, proc):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # released


TOPICS = (
    "hydrogen",
    "football",
    "parliament",
    "the stock market",
    "a film festival",
    "rainfall",
    "a court case",
    "a new phone",
)
ANGLES = (
    "history of",
    "news about",
    "prices of",
    "the future of",
    "questions on",
    "a report on",
    "people and",
    "the rules of",
)
PROMPTS_64 = [f"{a} {t}" for t in TOPICS for a in ANGLES]  # leaf i holds prompt i; topic j is level-1 node j


def big_bank_export(tiny_export, root, ranks: tuple[int, int]) -> tuple[str, str, int, int]:
    """The tiny model's anchor over a k=8 tree whose leaves are PROMPTS_64's embeddings (level 1: each topic's
    mean), so they fetch many different blocks, and a large random bank (written by TensorBlockStore.save, as the
    trainer's export does): (run dir, export dir, bank bytes, bytes of a level-2 block). The bank's w_down is
    zero: answers stay the anchor's, the fetches are real."""
    _, tiny, _ = tiny_export
    run = make_run_dir(str(root / "run"), k=8, depth=2, seq_len=16, dim=384)
    x = Router.load(run, documents=False).embed(PROMPTS_64)
    tree = Tree(
        k=8,
        depth=2,
        dim=384,
        centroids=[x.reshape(8, 8, -1).mean(1), x],
        biases=[np.zeros(8, np.float32), np.zeros(64, np.float32)],
    )
    tree.save(os.path.join(run, "tree"))
    with open(os.path.join(run, "manifest.json")) as f:
        manifest = json.load(f)
    with open(os.path.join(run, "manifest.json"), "w") as f:
        json.dump(dict(manifest, tree_version=tree.version), f)
    export = root / "export"
    (export / "bank").mkdir(parents=True)
    for f in ("anchor.safetensors", "tokenizer.json"):
        shutil.copy(os.path.join(tiny, f), export / f)
    with open(os.path.join(tiny, "meta.json")) as f:
        meta = json.load(f)
    mem = MemoryConfig(**dict(meta["memory"], ranks=list(ranks), k=8, depth=2))
    store = TensorBlockStore.create(mem, ModelConfig(**meta["model"]))
    store.save(str(export / "bank" / "rank0.safetensors"))
    meta.update(
        tree_version=tree.version, k=8, depth=2, memory=mem.to_dict(), bank_files={"bank/rank0.safetensors": {}}
    )  # load_model reads the file names only
    with open(export / "meta.json", "w") as f:
        json.dump(meta, f)
    return run, str(export), store.nbytes(), sum(4 * math.prod(s) for s in store.shapes[2].values())


CACHE_MB = 40
MARGIN_MB = 40  # a fetch's transient copies (the file read, the stacked rows, the per-layer concatenation:
# about 3 blocks of 7.3 MiB) and allocator slack; the base (after one request) holds Python, torch, the encoder,
# the anchor and the resident level


@pytest.mark.slow
def test_rss_stays_within_the_cache_budget_on_a_bank_10x_larger(tiny_export, tmp_path):
    run, export, bank_bytes, block_bytes = big_bank_export(tiny_export, tmp_path, ranks=(64, 10_000))
    assert bank_bytes > 10 * CACHE_MB * 2**20
    with serving(run, export, "--cache-mb", str(CACHE_MB)) as (port, proc):
        rss = psutil.Process(proc.pid)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        client.completions.create(model="hmem", prompt="warm up", max_tokens=2)
        base = rss.memory_info().rss
        leaves, peak = set(), base
        for p in PROMPTS_64:
            r = client.completions.create(model="hmem", prompt=p, max_tokens=1)
            leaves.add(r.model_extra["hmem"][0]["blocks"][1])
            peak = max(peak, rss.memory_info().rss)
        stats = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    touched_mb = len(leaves) * block_bytes / 2**20
    print(
        f"bank {bank_bytes / 2**20:.0f} MiB (level-2 blocks of {block_bytes / 2**20:.1f} MiB), cache {CACHE_MB} MiB, "
        f"{len(leaves)} leaf blocks touched ({touched_mb:.0f} MiB), RSS {base / 2**20:.0f} MiB after one request, "
        f"peak {peak / 2**20:.0f} MiB (+{(peak - base) / 2**20:.0f} MiB; allowed +{CACHE_MB + MARGIN_MB})"
    )
    assert touched_mb > 2 * (CACHE_MB + MARGIN_MB)  # an unbounded cache would fail the bound below
    assert "hmem_cache_misses_total" in stats
    assert peak - base <= (CACHE_MB + MARGIN_MB) * 2**20
