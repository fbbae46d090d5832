"""The gateway's HTTP front door: OpenAI routes in, one backend out.

One request: authenticate the virtual key -> check model access, rate limit and budget -> choose a
pool (fixed, weighted split, or semantic route) -> Forwarder picks a backend and relays -> one
audit row, metrics, spend and token counts once the response is complete.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.routing import Route

from pagedserve import __version__
from pagedserve.batch.executor import CallExecutor
from pagedserve.batch.limits import BatchLimits
from pagedserve.batch.manager import BatchManager
from pagedserve.batch.store import BatchStore
from pagedserve.gateway.audit import AuditWriter
from pagedserve.gateway.backends import Backend, Pool, make_backend
from pagedserve.gateway.config import GatewayConfig, ModelRouteConfig
from pagedserve.gateway.health import Monitor
from pagedserve.gateway.keys import BudgetExceeded, BudgetLedger, KeyCache, KeyInfo, RateLimiter
from pagedserve.gateway.metrics import GatewayMetrics
from pagedserve.gateway.policies import RequestInfo, WeightedSplit, make_policy
from pagedserve.gateway.proxy import Forwarder, Trace
from pagedserve.gateway.store import open_db, utcnow
from pagedserve.server.middleware import BodyLimitMiddleware, bearer_token
from pagedserve.server.serving_batches import batches_router
from pagedserve.server.serving_files import files_router
from pagedserve.server.errors import APIError, install_error_handlers, quote

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
        self.admin_key = os.environ.get(cfg.server.admin_key_env) if cfg.server.admin_key_env else None
        self.db = open_db(cfg.database.url)
        self.keys = KeyCache(self.db)
        self.keys.refresh()
        self.limiter = RateLimiter()
        # A reservation outlives the longest request (then lapses, should this gateway die).
        self.budget = BudgetLedger(self.db, hold_s=cfg.server.request_timeout_s + 60)
        self.batches: BatchManager | None = None
        if cfg.batches.dir is not None:
            b = cfg.batches
            self.batches = BatchManager(BatchStore(b.dir), CallExecutor(self.run_line), list(self.routes),
                                        BatchLimits(b.max_file_bytes, b.max_lines, b.priority or 0, b.concurrency))
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
        self.audit = AuditWriter(self.db, d.queue_size, d.batch_size, d.flush_interval_s, self.metrics)
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
        await self.audit.close(self.cfg.database.drain_timeout_s)
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
        """The request's virtual key, from 'Authorization: Bearer <key>' (the scheme in any case, as
        RFC 7235 allows; a bare key without it is refused)."""
        auth = request.headers.get("authorization", "")
        if not auth.strip():
            if self.cfg.auth.require_key:
                raise APIError(401, "missing API key: send 'Authorization: Bearer <key>' (create one with "
                                    "`pagedserve gateway keys create`)", code="invalid_api_key")
            return ANONYMOUS
        secret = bearer_token(auth)
        if secret is None:
            raise APIError(401, "malformed Authorization header: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        key = self.keys.lookup(secret)
        if key is None:
            raise APIError(401, "invalid API key", code="invalid_api_key")
        if key.revoked:
            raise APIError(401, f"API key {key.id} has been revoked", code="invalid_api_key")
        return key

    def check_admin(self, request: Request) -> None:
        """/metrics and the API docs: the admin key, unless metrics are public by config."""
        want = self.admin_key
        if want is None:
            raise APIError(403, "this needs the gateway's admin key, and none is configured: set "
                                "server.admin_key_env (or server.public_metrics: true for /metrics on a trusted "
                                "network)", code="admin_key_required")
        secret = bearer_token(request.headers.get("authorization"))
        if secret is None or not hmac.compare_digest(secret.encode(), want.encode()):
            raise APIError(401, "this needs the gateway's admin key: send 'Authorization: Bearer <admin key>'",
                           code="invalid_api_key")

    def admit(self, key: KeyInfo, model: str) -> None:
        if model not in self.routes:
            raise APIError(404, f"model {quote(model)} does not exist; available: {sorted(self.routes)}", "model",
                           "model_not_found")
        if not key.allows(model):
            raise APIError(403, f"API key {key.id} (department {key.department}) may not use model {quote(model)}; "
                                f"allowed: {', '.join(key.models)}", "model", "model_not_allowed")

    def worst_case(self, endpoint: str, body: dict, pool_name: str) -> tuple[int, float]:
        """(tokens, cost) the request can use at most: the prompt's UTF-8 bytes bound its tokens
        (byte-level BPE tokens are at least a byte), a chat adds 8 per message and
        auth.budget_template_tokens for the template's own text (SmolLM2's default system prompt
        is ~20), and max_tokens (or auth.budget_max_tokens when unset) per output, at the highest
        prices of the pool and the fallbacks it may overflow to."""
        def size(x) -> int:
            if isinstance(x, str):
                return len(x.encode("utf-8", "surrogatepass"))
            if isinstance(x, list):
                return sum(size(v) for v in x) if x and not isinstance(x[0], int) else len(x)
            return 0

        prompts = 1
        if endpoint == "chat/completions":
            msgs = [m for m in body.get("messages") or () if isinstance(m, dict)]
            prompt_tokens = self.cfg.auth.budget_template_tokens + sum(
                8 + len(_text(m.get("content")).encode("utf-8", "surrogatepass")) for m in msgs)
        else:
            p = body.get("prompt")
            prompt_tokens = size(p)
            if isinstance(p, list) and p and not isinstance(p[0], int):
                prompts = len(p)
        mt = body.get("max_completion_tokens") or body.get("max_tokens")
        n = body.get("n") if isinstance(body.get("n"), int) and body.get("n") > 0 else 1
        out = (mt if isinstance(mt, int) and mt > 0 else self.cfg.auth.budget_max_tokens) * n * prompts
        chain, name = [], pool_name
        while name is not None and name not in chain:
            chain.append(name)
            name = self.pools[name].cfg.fallback
        pin = max(self.pools[c].cfg.prices.input_per_million for c in chain)
        pout = max(self.pools[c].cfg.prices.output_per_million for c in chain)
        return prompt_tokens + out, (prompt_tokens * pin + out * pout) / 1e6

    async def reserve(self, key: KeyInfo, endpoint: str, body: dict, pool_name: str, trace: Trace) -> None:
        """Rate limits, then the budget: each holds the request's worst case until finish() settles
        it, so concurrent requests cannot all pass a check that has room for one."""
        if key.id is None:
            return
        tokens, cost = self.worst_case(endpoint, body, pool_name)
        limited = self.limiter.check(key, tokens if key.tpm is not None else 0)
        if limited is not None:
            what, retry = limited
            raise APIError(429, f"rate limit exceeded for key {key.id}: {what}", code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, int(retry + 0.999)))})
        trace.reserved_tokens = tokens if key.tpm is not None else 0
        if key.monthly_budget is None:
            return
        try:
            trace.reservation = await asyncio.to_thread(self.budget.reserve, key, cost)
        except BudgetExceeded as e:
            self.limiter.add_tokens(key.id, 0, reserved=trace.reserved_tokens)
            trace.reserved_tokens = 0
            held = f", {e.reserved:.6f} held by requests in flight" if e.reserved else ""
            raise APIError(402, f"monthly budget exceeded: key {key.id} (department {key.department}) has spent "
                                f"{e.spent:.6f} of its monthly budget of {key.monthly_budget:.6f}{held}; this "
                                f"request may cost up to {e.worst:.6f} (a smaller max_tokens costs less). Raise the "
                                "budget or wait for next month", code="budget_exceeded") from None

    def finish(self, key: KeyInfo, model: str, endpoint: str, decision: Decision | None, trace: Trace, stream: bool,
               ts, prompt: str | None, batch_id: str | None = None) -> None:
        """Book one finished request: cost, spend, token window, metrics, audit row (never blocks).
        A batch line (`batch_id`) costs the pool's batch_prices where it has them."""
        pool = self.pools.get(trace.pool) if trace.pool else None
        u = trace.usage
        cost = 0.0
        if pool is not None:
            pr = pool.cfg.batch_prices if batch_id is not None and pool.cfg.batch_prices is not None else \
                pool.cfg.prices
            cost = (u.prompt_tokens * pr.input_per_million + u.completion_tokens * pr.output_per_million) / 1e6
        latency = time.monotonic() - trace.t0
        if key.id is not None:
            self.limiter.add_tokens(key.id, u.prompt_tokens + u.completion_tokens, reserved=trace.reserved_tokens)
            trace.reserved_tokens = 0
        if trace.reservation is not None:
            r, trace.reservation = trace.reservation, None
            self.forwarder.background(self._settle(r, cost))
        m = self.metrics
        # A name a client made up is no label (unbounded, attacker-chosen); the audit row keeps it.
        known = model if model in self.routes else "(unknown)"
        labels = (key.department, known, trace.pool or "", trace.backend or "")
        m.requests.labels(*labels, str(trace.status)).inc()
        if u.prompt_tokens:
            m.tokens.labels(*labels, "prompt").inc(u.prompt_tokens)
        if u.completion_tokens:
            m.tokens.labels(*labels, "completion").inc(u.completion_tokens)
        if cost:
            m.cost.labels(*labels).inc(cost)
        m.latency.labels(known, trace.pool or "").observe(latency)
        if trace.ttft_s is not None:
            m.ttft.labels(known, trace.pool or "").observe(trace.ttft_s)
        row = dict(ts=ts, key_id=key.id, department=key.department, model=model, endpoint=endpoint,
                   route=decision.route if decision else None, pool=trace.pool, backend=trace.backend,
                   attempts=trace.attempts, fallback=trace.fallback, stream=stream, prompt_tokens=u.prompt_tokens,
                   completion_tokens=u.completion_tokens, cost=cost, ttft_s=trace.ttft_s, latency_s=latency,
                   status=trace.status, error=trace.error, prompt=prompt if self.cfg.database.log_prompts else None,
                   batch_id=batch_id)
        self.audit.submit(row, self.forwarder.background)

    async def _settle(self, r, cost: float) -> None:
        try:
            await asyncio.to_thread(self.budget.settle, r, cost)
        except Exception as e:  # the reservation lapses at its expiry; the audit row has the cost
            log.error("could not settle the budget of key %s (%s); its reservation lapses in %.0fs", r.key_id,
                      str(e).splitlines()[0][:200], self.budget.hold_s)

    async def handle(self, request: Request, endpoint: str) -> Response:
        key: KeyInfo | None = None
        try:
            key = self.authenticate(request)  # before the body is read: a keyless client costs nothing
            raw = await request.body()
            try:
                body = json.loads(raw)
            except ValueError as e:
                raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
            if not isinstance(body, dict):
                raise APIError(400, "request body must be a JSON object", code="invalid_request")
        except APIError as e:
            self._refused(e, key, "", endpoint, None, Trace(), False, utcnow(), None)
            raise
        return await self.serve(key, endpoint, body, request.headers.get)

    async def serve(self, key: KeyInfo, endpoint: str, body: dict, header=lambda name: None,
                    batch_id: str | None = None) -> Response:
        """One request of `key`, over HTTP (handle) or a batch line (run_line): model access, rate
        limit and budget, then the pool and the forwarder; a refusal books its audit row and raises."""
        trace, ts = Trace(), utcnow()
        trace.deadline = trace.t0 + self.cfg.server.request_timeout_s
        model, decision, prompt = body.get("model"), None, None
        stream = bool(body.get("stream"))
        try:
            if not isinstance(model, str) or not model:
                raise APIError(400, "'model' is required (a string; see GET /v1/models)", "model", "invalid_request")
            self.admit(key, model)
            whole, question = request_texts(endpoint, body)
            prompt = whole
            decision = await self.routes[model].decide(question)
            await self.reserve(key, endpoint, body, decision.pool, trace)
            info = RequestInfo(session=header(self.pools[decision.pool].cfg.session_header), prompt=whole)
            return await self.forwarder.forward(
                endpoint, body, model, decision.pool, info, trace,
                lambda tr: self.finish(key, model, endpoint, decision, tr, stream, ts, prompt, batch_id))
        except APIError as e:
            self._refused(e, key, model, endpoint, decision, trace, stream, ts, prompt, batch_id)
            raise

    def _refused(self, e: APIError, key: KeyInfo | None, model, endpoint: str, decision: Decision | None,
                 trace: Trace, stream: bool, ts, prompt: str | None, batch_id: str | None = None) -> None:
        if trace.status != 0:  # failed after forwarding: finish() booked it
            return
        reason = e.code if isinstance(e.code, str) else str(e.status)
        self.metrics.rejected.labels(reason).inc()
        if key is not None:  # one audit row; unauthenticated requests only count (anyone could send them)
            trace.status, trace.error = e.status, e.message
            self.finish(key, model if isinstance(model, str) else "", endpoint, decision, trace, stream, ts, prompt,
                        batch_id)

    async def run_line(self, owner: str | None, batch_id: str, line) -> tuple[int, object, str | None]:
        """One batch line as the key that created the batch (serve: the same admission, budget,
        routing, failover and audit row, with its batch id); a refusal (a revoked key, a spent
        budget, an unknown model) is the line's error response."""
        endpoint = line.url.removeprefix("/v1/")
        body = dict(line.body)
        if self.cfg.batches.priority is not None:
            own = body.get("priority") if isinstance(body.get("priority"), int) else 0
            body["priority"] = max(self.cfg.batches.priority, own)
        key = ANONYMOUS if owner is None else self.keys.by_id(owner)
        try:
            if key is None or key.revoked:
                e = APIError(401, f"API key {owner} that created this batch has been revoked or deleted",
                             code="invalid_api_key")
                self._refused(e, key, body.get("model"), endpoint, None, Trace(), False, utcnow(), None, batch_id)
                raise e
            resp = await self.serve(key, endpoint, body, batch_id=batch_id)
        except APIError as e:
            return e.status, e.body(), None
        try:
            out = json.loads(resp.body)
        except ValueError:
            out = {"error": {"message": resp.body[:2000].decode("utf-8", "replace"), "type": "invalid_response"}}
        rid = out.get("id") if isinstance(out, dict) and isinstance(out.get("id"), str) else None
        return resp.status_code, out, rid

def build_gateway_app(gw: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        await gw.start()
        if gw.batches is not None:
            gw.batches.start()  # resumes batches a previous process left unfinished
        yield
        if gw.batches is not None:
            await gw.batches.stop()  # lines stop where they are; the next start resumes them
        log.info("gateway shutting down: writing the audit log")
        await gw.stop()

    # The API docs describe every route and are served behind the admin key (below), not openly.
    app = FastAPI(title="pagedserve gateway", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(BodyLimitMiddleware, limit=gw.cfg.server.max_request_body_bytes,
                       paths={"/v1/files": gw.cfg.batches.max_file_bytes + (64 << 10)})
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

    def batch_manager() -> BatchManager:
        if gw.batches is None:
            raise APIError(404, "the Files and Batches API is off: set batches.dir in the gateway config",
                           code="batch_api_off")
        return gw.batches

    def owner(request: Request) -> str | None:  # each key sees only its own files and batches
        return gw.authenticate(request).id

    app.include_router(files_router(batch_manager, owner))
    app.include_router(batches_router(batch_manager, owner))

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

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request):
        gw.check_admin(request)
        from fastapi.openapi.utils import get_openapi

        return JSONResponse(get_openapi(title=app.title, version=app.version, routes=app.routes))

    @app.get("/metrics")
    async def metrics(request: Request):
        if not gw.cfg.server.public_metrics:
            gw.check_admin(request)
        m = gw.metrics
        for pool in gw.pools.values():
            for b in pool.backends:
                m.backend_healthy.labels(pool.name, b.name).set(1 if b.available() else 0)
                m.backend_outstanding.labels(pool.name, b.name).set(b.outstanding)
        m.audit_queue.set(gw.audit.queue.qsize() if gw.audit else 0)
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    return app
