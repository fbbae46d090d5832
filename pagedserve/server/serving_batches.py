"""/v1/batches: create, list, retrieve and cancel batches of requests (OpenAI's Batch API). The lines
run in this server's engine at --batch-priority, behind interactive requests (batch/manager.py)."""

from __future__ import annotations

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict

from pagedserve.batch.manager import BatchError
from pagedserve.server.context import ServingContext
from pagedserve.server.serving_files import api_error, manager


class CreateBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict | None = None


def router(ctx: ServingContext) -> APIRouter:
    r = APIRouter(dependencies=ctx.auth)

    @r.post("/v1/batches")
    async def create(body: CreateBatchRequest):
        try:
            return manager(ctx).create_batch(None, body.input_file_id, body.endpoint, body.completion_window,
                                             body.metadata)
        except BatchError as e:
            raise api_error(e)

    @r.get("/v1/batches")
    async def list_batches(limit: int = Query(20, ge=1, le=100), after: str | None = None):
        return manager(ctx).list_batches(None, limit, after)

    @r.get("/v1/batches/{batch_id}")
    async def get(batch_id: str):
        try:
            return manager(ctx).get_batch(None, batch_id)
        except BatchError as e:
            raise api_error(e)

    @r.post("/v1/batches/{batch_id}/cancel")
    async def cancel(batch_id: str):
        try:
            return manager(ctx).cancel_batch(None, batch_id)
        except BatchError as e:
            raise api_error(e)

    return r
