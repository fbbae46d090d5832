"""/v1/batches: create, list, retrieve and cancel batches of requests (OpenAI's Batch API). On a
server the lines run in its engine at --batch-priority, behind interactive requests; the gateway
mounts the same routes and runs each line through its own routing (batch/manager.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict

from pagedserve.server.serving_files import GetManager, Owner, server_manager

if TYPE_CHECKING:  # the gateway mounts these routes without the engine (and torch) imported
    from pagedserve.server.context import ServingContext


class CreateBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict | None = None


def batches_router(manager: GetManager, owner: Owner, dependencies: list | None = None) -> APIRouter:
    r = APIRouter(dependencies=dependencies or [])

    @r.post("/v1/batches")
    async def create(request: Request, body: CreateBatchRequest):
        return manager().create_batch(owner(request), body.input_file_id, body.endpoint, body.completion_window,
                                      body.metadata)

    @r.get("/v1/batches")
    async def list_batches(request: Request, limit: int = Query(20, ge=1, le=100), after: str | None = None):
        return manager().list_batches(owner(request), limit, after)

    @r.get("/v1/batches/{batch_id}")
    async def get(request: Request, batch_id: str):
        return manager().get_batch(owner(request), batch_id)

    @r.post("/v1/batches/{batch_id}/cancel")
    async def cancel(request: Request, batch_id: str):
        return manager().cancel_batch(owner(request), batch_id)

    return r


def router(ctx: ServingContext) -> APIRouter:
    return batches_router(server_manager(ctx), lambda _: None, ctx.auth)
