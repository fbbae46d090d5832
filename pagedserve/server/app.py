"""The OpenAI-compatible HTTP server: the app, its errors and plain routes; each endpoint family
lives in its own module (serving_chat, serving_completion, serving_models) and shares a
ServingContext (context.py)."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pagedserve import __version__
from pagedserve.engine.async_engine import AsyncEngine, EngineDeadError, ShuttingDownError
from pagedserve.batch.executor import AppExecutor
from pagedserve.batch.manager import BatchManager
from pagedserve.batch.store import BatchStore
from pagedserve.server import serving_batches, serving_chat, serving_completion, serving_files, serving_models
from pagedserve.server.context import ServerSettings, ServingContext
from pagedserve.server.errors import error_response, install_error_handlers
from pagedserve.server.metrics import ServerMetrics
from pagedserve.server.middleware import BodyLimitMiddleware

__all__ = ["ServerSettings", "build_app"]

log = logging.getLogger("pagedserve.server")


def build_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    metrics = ServerMetrics(engine.engine, settings.served_model_names[0])
    ctx = ServingContext(engine, settings, metrics)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        if ctx.batches is not None:
            ctx.batches.start()  # resumes what a previous process left unfinished
        yield
        if ctx.batches is not None:
            await ctx.batches.stop()
        log.info("shutting down: engine loop stops")
        engine.shutdown()

    app = FastAPI(title="pagedserve", version=__version__, lifespan=lifespan)
    # An upload to /v1/files may be as large as a batch input file (plus its multipart framing).
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_body_bytes,
                       paths={"/v1/files": settings.batch_limits.max_file_bytes + (64 << 10)})
    app.state.engine = engine
    app.state.metrics = metrics
    if settings.batch_dir is not None:
        # Batch lines go through this same app in-process: the same checks and responses as HTTP.
        executor = AppExecutor(app, settings.batch_limits.priority, settings.api_key)
        ctx.batches = BatchManager(BatchStore(settings.batch_dir), executor, settings.served_model_names,
                                   settings.batch_limits, metrics)
    app.state.batches = ctx.batches

    # -- errors ----------------------------------------------------------------------------
    install_error_handlers(app, log)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = "; ".join(
            f"{'.'.join(str(x) for x in err.get('loc', ()) if x != 'body') or 'body'}: {err.get('msg')}" for err in errs[:5]
        )
        return error_response(400, msg or "invalid request body", ".".join(loc) or None, "invalid_request")

    @app.exception_handler(ValueError)
    async def _value(_, e: ValueError):
        return error_response(400, str(e), code="invalid_request")

    @app.exception_handler(EngineDeadError)
    async def _dead(_, e: EngineDeadError):
        return error_response(503, str(e) if isinstance(e, ShuttingDownError) else f"the engine is not running: {e}")

    # -- plain routes ----------------------------------------------------------------------
    @app.get("/health")
    async def health():
        ok, why = engine.health()
        return Response(status_code=200) if ok else error_response(503, why)

    @app.get("/ping")
    async def ping():
        return await health()

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def prom():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    for module in (serving_models, serving_completion, serving_chat, serving_files, serving_batches):
        app.include_router(module.router(ctx))
    return app
