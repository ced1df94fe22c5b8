"""Serve an exported model over an OpenAI-compatible HTTP API: greedy completions, each with the route it fetched.

    python -m hmem.serve --run RUN --model EXPORT [--host 127.0.0.1] [--port 8000] [--cache-mb 256]
        [--resident-levels 1] [--max-tokens-limit 256] [--routing MODE] [--far S] [--name hmem]

Endpoints
  POST /v1/completions  the OpenAI completions schema: ``model`` (``--name``), ``prompt`` (a string or a list
                        of strings), ``max_tokens`` (default 16, at most ``--max-tokens-limit``), ``stop``
                        (a string or a list: the text is cut before the first one). Greedy decoding only:
                        ``temperature`` absent or 0 (anything above is refused); ``n`` 1, no ``stream``; other
                        OpenAI fields are ignored. The response adds a top-level ``hmem`` list, one entry per
                        prompt: routing mode, path, block per level, ``far`` (true: the prompt is far from
                        every training document and fetched no block; null: no far threshold), route / fetch /
                        compute milliseconds
                        (a request's prompts are answered in one batch: its means per prompt).
  GET /v1/models        the one served model
  GET /health           200 with the model's name once it is loaded
  GET /metrics          Prometheus text: requests by path and status, completion latency histogram, memory
                        cache hits / misses / bytes, blocks fetched and read

Tiered memory. The anchor and the levels <= ``--resident-levels`` stay in RAM; a deeper block is read from
the export's bank files when a prompt fetches it, through an LRU cache of ``--cache-mb``
(train.lazy_store.CachedBlockStore). The process holds the anchor, the router's encoder, the resident
levels and the cache, whatever the bank's size.

Errors are 4xx in the OpenAI shape, {"error": {"message", "type", "param", "code"}}, with a one-line message.
One model lock: concurrent requests are answered one at a time, each exactly as alone. SIGTERM or Ctrl-C
stops it after the requests in flight (exit code 0).
"""

from __future__ import annotations

import argparse
import ctypes
import signal
import sys
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict

from index.routing import MODES

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PATHS = ("/v1/completions", "/v1/models", "/health", "/metrics")  # metric labels: anything else is "other"


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(
    message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"
) -> dict:
    return {"error": {"message": " ".join(str(message).split()), "type": kind, "param": param, "code": code}}


class Metrics:
    """Request counts by (path, status) and the completion latency histogram, as Prometheus text."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.buckets = [0] * len(LATENCY_BUCKETS)
        self.count, self.total = 0, 0.0

    def observe(self, path: str, status: int, seconds: float) -> None:
        path = path if path in PATHS else "other"
        with self.lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1
            if path == "/v1/completions":
                self.count, self.total = self.count + 1, self.total + seconds
                for i, edge in enumerate(LATENCY_BUCKETS):
                    self.buckets[i] += seconds <= edge

    def text(self, store_stats: dict | None) -> str:
        lines = ["# HELP hmem_requests_total HTTP requests by path and status.", "# TYPE hmem_requests_total counter"]
        with self.lock:
            lines += [
                f'hmem_requests_total{{path="{p}",status="{s}"}} {n}' for (p, s), n in sorted(self.requests.items())
            ]
            lines += [
                "# HELP hmem_completion_seconds Latency of /v1/completions requests.",
                "# TYPE hmem_completion_seconds histogram",
            ]
            lines += [f'hmem_completion_seconds_bucket{{le="{e}"}} {n}' for e, n in zip(LATENCY_BUCKETS, self.buckets)]
            lines += [
                f'hmem_completion_seconds_bucket{{le="+Inf"}} {self.count}',
                f"hmem_completion_seconds_sum {self.total}",
                f"hmem_completion_seconds_count {self.count}",
            ]
        if store_stats is not None:
            for name, kind, key, about in (
                ("blocks_fetched_total", "counter", "fetched", "Memory blocks fetched, resident levels included."),
                ("cache_hits_total", "counter", "hits", "Deep blocks found in the cache."),
                ("cache_misses_total", "counter", "misses", "Deep blocks read from the bank files."),
                ("bank_read_bytes_total", "counter", "bytes_read", "Bytes read from the bank files."),
                ("cache_bytes", "gauge", "cached_bytes", "Bytes of deep blocks in the cache."),
                ("cache_blocks", "gauge", "cached_blocks", "Deep blocks in the cache."),
                ("cache_budget_bytes", "gauge", "budget_bytes", "The cache's byte budget (--cache-mb)."),
                ("resident_bytes", "gauge", "resident_bytes", "Bytes of the levels held in RAM."),
            ):
                lines += [
                    f"# HELP hmem_{name} {about}",
                    f"# TYPE hmem_{name} {kind}",
                    f"hmem_{name} {store_stats[key]}",
                ]
        return "\n".join(lines) + "\n"


class Service:
    """The model behind the API: an ``Asker`` whose bank reads through a ``CachedBlockStore``, and one lock."""

    def __init__(
        self,
        run: str,
        model: str,
        name: str,
        routing: str | None,
        cache_mb: float,
        resident_levels: int,
        max_tokens_limit: int,
        far: float | None = None,
    ):
        from hmem.ask import Asker
        from train.lazy_store import CachedBlockStore

        self.asker = Asker(run, model, routing, far=far)
        self.name, self.max_tokens_limit, self.created = name, max_tokens_limit, int(time.time())
        bank = self.asker.ev.bank
        self.store = None
        if bank is not None:
            self.store = bank.store = CachedBlockStore(bank.store, int(cache_mb * 2**20), resident_levels)
        self.lock = threading.Lock()
        self.metrics = Metrics()

    def check(self, req: CompletionRequest) -> list[str]:
        """The request's prompts, or an ApiError naming what is wrong with it."""
        if req.model != self.name:
            raise ApiError(
                404,
                f"model {req.model!r} is not served here; this server serves {self.name!r}",
                "model",
                "model_not_found",
            )
        if req.temperature:
            raise ApiError(
                400,
                f"temperature {req.temperature}: only greedy decoding is served (temperature 0 or absent)",
                "temperature",
            )
        if req.stream:
            raise ApiError(400, "stream: streaming is not served; ask without stream", "stream")
        if req.n != 1:
            raise ApiError(400, f"n {req.n}: one completion per prompt is served (greedy decoding)", "n")
        if not 1 <= req.max_tokens <= self.max_tokens_limit:
            raise ApiError(400, f"max_tokens {req.max_tokens}: must lie in [1, {self.max_tokens_limit}]", "max_tokens")
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts or not all(p.strip() for p in prompts):
            raise ApiError(400, "prompt is empty: give a non-empty string or a list of them", "prompt")
        context = self.asker.ev.anchor.cfg.max_seq_len
        for i, p in enumerate(prompts):
            n = 1 + len(self.asker.ev.tokenizer.encode(p).ids)  # the model reads <eot> before the prompt
            if n > context:
                raise ApiError(
                    400,
                    f"prompt {i} is {n} tokens with <eot>; the model's context is {context}",
                    "prompt",
                    "context_length_exceeded",
                )
        return prompts

    def complete(self, req: CompletionRequest) -> dict:
        prompts = self.check(req)
        stops = [req.stop] if isinstance(req.stop, str) else [s for s in req.stop or [] if s]
        with self.lock:
            before = self.store.read_seconds if self.store else 0.0
            answers = self.asker.ask(prompts, max_new=req.max_tokens, compare=False)
            fetch_ms = 1e3 * ((self.store.read_seconds if self.store else 0.0) - before) / len(prompts)
        tok = self.asker.ev.tokenizer
        choices, routes, used = [], [], 0
        for i, a in enumerate(answers):
            text = a["settings"][0]["completion"]
            cut = min((text.find(s) for s in stops if s in text), default=-1)
            n = len(tok.encode(text).ids)  # re-encoded: tokens the text holds, max_tokens when cut short by it
            finish = "stop" if cut >= 0 or n < req.max_tokens else "length"
            text = text[:cut] if cut >= 0 else text
            used += len(tok.encode(text).ids)
            choices.append({"index": i, "text": text, "finish_reason": finish, "logprobs": None})
            routes.append(
                {
                    "index": i,
                    "routing": a["routing"],
                    "path": a["path"],
                    "leaf": a["leaf"],
                    "blocks": a["blocks"],
                    "far": a["far"],  # routing.far: a far prompt fetched none of its blocks
                    "route_ms": a["ms"]["route"],
                    "fetch_ms": fetch_ms,
                    "compute_ms": a["ms"]["answer"] - fetch_ms,
                }
            )
        prompt_tokens = sum(1 + len(tok.encode(p).ids) for p in prompts)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": used, "total_tokens": prompt_tokens + used},
            "hmem": routes,
        }


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # other OpenAI fields (top_p, user, ...) change nothing here
    model: str
    prompt: str | list[str]
    max_tokens: int = 16
    temperature: float | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False


def build_app(service: Service) -> FastAPI:
    app = FastAPI(title="hmem", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def count(request: Request, call_next):
        t = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            service.metrics.observe(request.url.path, status, time.perf_counter() - t)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(error_body(e.message, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first: dict[str, Any] = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())[1:])  # loc[0] is "body"
        if first.get("type") == "json_invalid":
            message, where = f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", None
        else:
            message = f"{where or 'body'}: {first.get('msg')}"
        return JSONResponse(error_body(message, where or None), status_code=400)

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception):
        return JSONResponse(error_body(f"{type(e).__name__}: {e}", kind="server_error"), status_code=500)

    @app.post("/v1/completions")
    def completions(req: CompletionRequest) -> dict:  # sync: FastAPI runs it on a worker thread
        return service.complete(req)

    @app.get("/v1/models")
    def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": service.name, "object": "model", "created": service.created, "owned_by": "hmem"}],
        }

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": service.name}

    @app.get("/metrics")
    def metrics():
        return PlainTextResponse(
            service.metrics.text(service.store.stats() if service.store else None),
            media_type="text/plain; version=0.0.4",
        )

    return app


def bound_malloc(mmap_threshold: int = 128 << 10, arenas: int = 2) -> None:
    """Keep glibc's freed memory out of the RSS: it raises its mmap threshold to the largest chunk freed so far,
    so after the first evicted block the blocks come from the heap, where freed ones stay; and each worker
    thread gets an arena of its own, which keeps its peak. A fixed threshold maps every block and activation
    on its own (returned to the OS when freed), and two arenas serve the one-at-a-time model work."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to bound
        return
    libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD
    libc.mallopt(-8, arenas)  # M_ARENA_MAX


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hmem-serve", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="the run directory the model was trained on")
    p.add_argument("--model", required=True, help="export directory (OUT/export of train/main.py)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default="hmem", help="the model name clients give (default hmem)")
    p.add_argument("--cache-mb", type=float, default=256.0, help="LRU cache of deep memory blocks, MiB (default 256)")
    p.add_argument("--resident-levels", type=int, default=1, help="memory levels held in RAM (default 1)")
    p.add_argument("--max-tokens-limit", type=int, default=256, help="largest max_tokens a request may ask")
    p.add_argument("--routing", choices=MODES, help="routing mode (default: the model's recorded mode)")
    p.add_argument("--far", type=float, help="prompts whose best vote score is below this fetch no memory")
    args = p.parse_args(argv)
    if args.cache_mb <= 0 or args.resident_levels < 0 or args.max_tokens_limit < 1:
        print(
            f"error: --cache-mb {args.cache_mb} must be > 0, --resident-levels {args.resident_levels} >= 0, "
            f"--max-tokens-limit {args.max_tokens_limit} >= 1",
            file=sys.stderr,
        )
        return 1
    bound_malloc()
    try:
        service = Service(
            args.run,
            args.model,
            args.name,
            args.routing,
            args.cache_mb,
            args.resident_levels,
            args.max_tokens_limit,
            args.far,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    import uvicorn

    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again for its previous handler:
    # this one makes that second delivery a no-op, so a stop that was asked for exits 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    stats = service.store.stats() if service.store else {"resident_bytes": 0, "budget_bytes": 0}
    print(
        f"serving {args.name!r} on http://{args.host}:{args.port}/v1 (resident memory levels <= "
        f"{args.resident_levels}: {stats['resident_bytes'] / 2**20:.1f} MiB, deep-block cache "
        f"{stats['budget_bytes'] / 2**20:.0f} MiB)",
        flush=True,
    )
    uvicorn.run(build_app(service), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
