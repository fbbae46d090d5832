"""The gateway's HTTP front door: OpenAI routes in, one backend out.

One request: authenticate the virtual key -> check model access, rate limit and budget -> choose a
pool (fixed, weighted split, or semantic route) -> Forwarder picks a backend and relays -> one
audit row, metrics, spend and token counts once the response is complete.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.routing import Route

from pagedserve import __version__
from pagedserve.gateway.audit import AuditWriter
from pagedserve.gateway.backends import Backend, Pool, make_backend
from pagedserve.gateway.config import GatewayConfig, ModelRouteConfig
from pagedserve.gateway.health import Monitor
from pagedserve.gateway.keys import BudgetTracker, KeyCache, KeyInfo, RateLimiter
from pagedserve.gateway.metrics import GatewayMetrics
from pagedserve.gateway.policies import RequestInfo, WeightedSplit, make_policy
from pagedserve.gateway.proxy import Forwarder, Trace
from pagedserve.gateway.store import open_db, utcnow
from pagedserve.server.middleware import BodyLimitMiddleware
from pagedserve.server.errors import APIError, install_error_handlers

log = logging.getLogger("pagedserve.gateway")

ANONYMOUS = KeyInfo(id=None, name="anonymous", department="anonymous", models=("*",), rpm=None, tpm=None,
                    monthly_budget=None)


@dataclass
class Decision:
    pool: str
    route: str | None = None


class ModelRoute:
    """How one public model name picks its pool.

    A semantic route's embedding model loads in the background once the gateway runs (sentence-
    transformers takes seconds to tens of seconds): the gateway is healthy and serves every other
    model meanwhile; requests for this one wait for the load, or get 503 if it failed."""

    def __init__(self, cfg: ModelRouteConfig):
        self.cfg = cfg
        self.split = WeightedSplit([(t.pool, t.weight) for t in cfg.split]) if cfg.split else None
        self.semantic = None
        self.semantic_error: str | None = None
        self.semantic_loaded = asyncio.Event()
        if cfg.semantic is not None and cfg.semantic.model is None:
            from pagedserve.gateway.semantic import default_embedding_model

            default_embedding_model()  # not installed: say so at start, not at the first request

    async def load_semantic(self) -> None:
        from pagedserve.gateway.semantic import SemanticRouter

        t0 = time.monotonic()
        try:
            self.semantic = await asyncio.to_thread(SemanticRouter, self.cfg.semantic)
            log.info("semantic routing for %r ready in %.1fs", self.cfg.name, time.monotonic() - t0)
        except Exception as e:
            self.semantic_error = f"{type(e).__name__}: {e}"[:500]
            log.error("semantic routing for %r could not load its embedding model: %s", self.cfg.name,
                      self.semantic_error)
        finally:
            self.semantic_loaded.set()

    @property
    def semantic_state(self) -> str:
        if self.cfg.semantic is None:
            return "none"
        return "ready" if self.semantic else "failed" if self.semantic_error else "loading"

    async def decide(self, query: str) -> Decision:
        if self.cfg.pool is not None:
            return Decision(self.cfg.pool)
        if self.split is not None:
            pool = self.split.choose()
            return Decision(pool, f"split:{pool}")
        await self.semantic_loaded.wait()
        if self.semantic is None:
            raise APIError(503, f"model {self.cfg.name!r} routes by meaning, and its embedding model could not "
                                f"be loaded ({self.semantic_error}); see the gateway's log", code="router_unavailable")
        d = await self.semantic.aclassify(query)
        return Decision(d.pool, d.route)


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def request_texts(endpoint: str, body: dict) -> tuple[str, str]:
    """(whole prompt for prefix affinity, the user's question for semantic routing)."""
    if endpoint == "chat/completions":
        msgs = [m for m in body.get("messages") or () if isinstance(m, dict)]
        whole = "\n".join(f"{m.get('role')}: {_text(m.get('content'))}" for m in msgs)
        users = [_text(m.get("content")) for m in msgs if m.get("role") == "user"]
        return whole, users[-1] if users else whole
    p = body.get("prompt")
    if isinstance(p, list):
        p = p[0] if p and isinstance(p[0], str) else json.dumps(p[:1])
    p = p if isinstance(p, str) else ""
    return p, p


class Gateway:
    def __init__(self, cfg: GatewayConfig):
        self.cfg = cfg
        self.metrics = GatewayMetrics()
        by_name = {b.name: b for b in cfg.backends}
        made: dict[str, Backend] = {}  # a backend listed in two pools shares one state
        self.pools: dict[str, Pool] = {}
        for pc in cfg.pools:
            self.pools[pc.name] = Pool(pc, [made.setdefault(n, make_backend(by_name[n], pc)) for n in pc.backends])
        self.policies = {p.name: make_policy(p.policy, p.affinity_max_entries) for p in cfg.pools}
        self.routes = {m.name: ModelRoute(m) for m in cfg.models}
        self.db = open_db(cfg.database.url)
        self.keys = KeyCache(self.db)
        self.keys.refresh()
        self.limiter = RateLimiter()
        self.budget = BudgetTracker(self.db)
        self.client: aiohttp.ClientSession | None = None
        self.audit: AuditWriter | None = None
        self.forwarder: Forwarder | None = None
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        # Idle connections are dropped after 4 s, before uvicorn's 5 s keep-alive closes them from
        # the replica's side (aiohttp's default keeps them 15 s, and a request sent on a connection
        # the server is closing fails before the first byte and needlessly overflows its pool).
        connector = aiohttp.TCPConnector(limit=4096, limit_per_host=0, keepalive_timeout=4)
        self.client = aiohttp.ClientSession(connector=connector,
                                            timeout=aiohttp.ClientTimeout(total=None, sock_read=120))
        d = self.cfg.database
        self.audit = AuditWriter(self.db, d.queue_size, d.batch_size, d.flush_interval_s)
        self.audit.start()
        self.forwarder = Forwarder(self.client, self.pools, self.policies, self.metrics)
        monitor = Monitor(self.client, self.pools, self.cfg.health.interval_s, self.cfg.health.timeout_s)
        await monitor.check_all()  # know who is up before the first request
        self.tasks = [asyncio.create_task(monitor.run_health(), name="health"),
                      asyncio.create_task(self._refresh_keys(), name="keys")]
        for pool in self.pools.values():
            if pool.cfg.discovery is not None:
                self.tasks.append(asyncio.create_task(monitor.run_discovery(pool), name=f"discover-{pool.name}"))
        for route in self.routes.values():
            if route.cfg.semantic is not None:
                self.tasks.append(asyncio.create_task(route.load_semantic(), name=f"semantic-{route.cfg.name}"))

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.forwarder is not None:
            await self.forwarder.drain()
        await self.audit.close()
        await self.client.close()
        self.db.dispose()

    async def _refresh_keys(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.auth.refresh_s)
            try:
                await asyncio.to_thread(self.keys.refresh)
            except Exception as e:
                log.warning("could not re-read keys (keeping the last set): %s", e)

    # -- per request -------------------------------------------------------------------------
    def authenticate(self, request: Request) -> KeyInfo:
        auth = request.headers.get("authorization", "")
        if not auth:
            if self.cfg.auth.require_key:
                raise APIError(401, "missing API key: send 'Authorization: Bearer <key>' (create one with "
                                    "`pagedserve gateway keys create`)", code="invalid_api_key")
            return ANONYMOUS
        secret = auth.removeprefix("Bearer ").strip()
        key = self.keys.lookup(secret)
        if key is None:
            raise APIError(401, "invalid API key", code="invalid_api_key")
        if key.revoked:
            raise APIError(401, f"API key {key.id} has been revoked", code="invalid_api_key")
        return key

    def admit(self, key: KeyInfo, model: str) -> None:
        if model not in self.routes:
            raise APIError(404, f"model {model!r} does not exist; available: {sorted(self.routes)}", "model",
                           "model_not_found")
        if not key.allows(model):
            raise APIError(403, f"API key {key.id} (department {key.department}) may not use model {model!r}; "
                                f"allowed: {', '.join(key.models)}", "model", "model_not_allowed")
        if key.id is not None:
            spent = self.budget.over(key)
            if spent is not None:
                raise APIError(402, f"monthly budget exceeded: key {key.id} (department {key.department}) has spent "
                                    f"{spent:.4f} of its monthly budget of {key.monthly_budget:.4f}; raise the "
                                    "budget or wait for next month", code="budget_exceeded")
            limited = self.limiter.check(key)
            if limited is not None:
                what, retry = limited
                raise APIError(429, f"rate limit exceeded for key {key.id}: {what}", code="rate_limit_exceeded",
                               headers={"Retry-After": str(max(1, int(retry + 0.999)))})

    def finish(self, key: KeyInfo, model: str, endpoint: str, decision: Decision | None, trace: Trace, stream: bool,
               ts, prompt: str | None) -> None:
        """Book one finished request: cost, spend, token window, metrics, audit row (never blocks)."""
        pool = self.pools.get(trace.pool) if trace.pool else None
        u = trace.usage
        cost = 0.0
        if pool is not None:
            pr = pool.cfg.prices
            cost = (u.prompt_tokens * pr.input_per_million + u.completion_tokens * pr.output_per_million) / 1e6
        latency = time.monotonic() - trace.t0
        if key.id is not None:
            self.budget.add(key.id, cost)
            self.limiter.add_tokens(key.id, u.prompt_tokens + u.completion_tokens)
        m = self.metrics
        labels = (key.department, model, trace.pool or "", trace.backend or "")
        m.requests.labels(*labels, str(trace.status)).inc()
        if u.prompt_tokens:
            m.tokens.labels(*labels, "prompt").inc(u.prompt_tokens)
        if u.completion_tokens:
            m.tokens.labels(*labels, "completion").inc(u.completion_tokens)
        if cost:
            m.cost.labels(*labels).inc(cost)
        m.latency.labels(model, trace.pool or "").observe(latency)
        if trace.ttft_s is not None:
            m.ttft.labels(model, trace.pool or "").observe(trace.ttft_s)
        row = dict(ts=ts, key_id=key.id, department=key.department, model=model, endpoint=endpoint,
                   route=decision.route if decision else None, pool=trace.pool, backend=trace.backend,
                   attempts=trace.attempts, fallback=trace.fallback, stream=stream, prompt_tokens=u.prompt_tokens,
                   completion_tokens=u.completion_tokens, cost=cost, ttft_s=trace.ttft_s, latency_s=latency,
                   status=trace.status, error=trace.error, prompt=prompt if self.cfg.database.log_prompts else None)
        try:
            self.audit.queue.put_nowait(row)
        except asyncio.QueueFull:  # the database is behind: wait in the background, never drop
            self.forwarder.background(self.audit.put(row))

    async def handle(self, request: Request, endpoint: str) -> Response:
        trace, ts = Trace(), utcnow()
        key: KeyInfo = ANONYMOUS
        model, decision, stream, prompt = None, None, False, None
        try:
            raw = await request.body()
            try:
                body = json.loads(raw)
            except ValueError as e:
                raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
            if not isinstance(body, dict):
                raise APIError(400, "request body must be a JSON object", code="invalid_request")
            key = self.authenticate(request)
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise APIError(400, "'model' is required (a string; see GET /v1/models)", "model", "invalid_request")
            stream = bool(body.get("stream"))
            self.admit(key, model)
            whole, question = request_texts(endpoint, body)
            prompt = whole
            decision = await self.routes[model].decide(question)
            info = RequestInfo(session=request.headers.get(self.pools[decision.pool].cfg.session_header), prompt=whole)
            return await self.forwarder.forward(
                endpoint, body, model, decision.pool, info, trace,
                lambda tr: self.finish(key, model, endpoint, decision, tr, stream, ts, prompt))
        except APIError as e:
            if trace.status == 0:  # refused before forwarding: still one audit row
                reason = e.code if isinstance(e.code, str) else str(e.status)
                self.metrics.rejected.labels(reason).inc()
                trace.status, trace.error = e.status, e.message[:500]
                self.finish(key, model or "", endpoint, decision, trace, stream, ts, prompt)
            raise


def build_gateway_app(gw: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        await gw.start()
        yield
        log.info("gateway shutting down: writing the audit log")
        await gw.stop()

    app = FastAPI(title="pagedserve gateway", version=__version__, lifespan=lifespan)
    app.add_middleware(BodyLimitMiddleware, limit=gw.cfg.server.max_request_body_bytes)
    app.state.gateway = gw

    install_error_handlers(app, log)

    # The two proxy routes are plain Starlette routes: the gateway reads the body itself, so
    # FastAPI's dependency and validation layer would only add per-request CPU.
    async def completions(request: Request):
        return await gw.handle(request, "completions")

    async def chat(request: Request):
        return await gw.handle(request, "chat/completions")

    app.router.routes[:0] = [Route("/v1/completions", completions, methods=["POST"]),
                             Route("/v1/chat/completions", chat, methods=["POST"])]

    @app.get("/v1/models")
    async def models(request: Request):
        key = gw.authenticate(request)
        now = int(time.time())
        data = [{"id": name, "object": "model", "created": now, "owned_by": "pagedserve-gateway"}
                for name in gw.routes if key.allows(name)]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        pools = {name: {"available": len(p.available()), "backends": len(p.backends)} for name, p in gw.pools.items()}
        semantic = {name: r.semantic_state for name, r in gw.routes.items() if r.cfg.semantic is not None}
        return JSONResponse({"status": "ok", "pools": pools, "semantic_routes": semantic})

    @app.get("/metrics")
    async def metrics():
        m = gw.metrics
        for pool in gw.pools.values():
            for b in pool.backends:
                m.backend_healthy.labels(pool.name, b.name).set(1 if b.available() else 0)
                m.backend_outstanding.labels(pool.name, b.name).set(b.outstanding)
        m.audit_queue.set(gw.audit.queue.qsize() if gw.audit else 0)
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    return app
