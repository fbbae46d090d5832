"""/v1/files: upload a batch input file, list, read, download, delete (OpenAI's shapes). On when the
server has a --batch-dir (where files and batch state persist)."""

from __future__ import annotations

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import FileResponse

from pagedserve.batch.manager import BatchError, BatchManager, file_object
from pagedserve.server.context import ServingContext
from pagedserve.server.errors import APIError

OFF = "the Files and Batches API is off: start the server with --batch-dir DIR (where files and batch state persist)"


def manager(ctx: ServingContext) -> BatchManager:
    if ctx.batches is None:
        raise APIError(404, OFF, code="batch_api_off")
    return ctx.batches


def api_error(e: BatchError) -> APIError:
    return APIError(e.status, e.message, e.param, e.code)


def router(ctx: ServingContext) -> APIRouter:
    r = APIRouter(dependencies=ctx.auth)

    @r.post("/v1/files")
    async def upload(file: UploadFile = File(...), purpose: str = Form(...)):
        m = manager(ctx)
        limit = m.limits.max_file_bytes
        data = await file.read(limit + 1)
        try:
            return m.create_file(None, file.filename or "", purpose, data)
        except BatchError as e:
            raise api_error(e)

    @r.get("/v1/files")
    async def list_files(purpose: str | None = None, limit: int = Query(10000, ge=1, le=10000),
                         after: str | None = None):
        rows = manager(ctx).store.list_files(None, purpose, limit + 1, after)
        data = [file_object(x) for x in rows[:limit]]
        return {"object": "list", "data": data, "has_more": len(rows) > limit,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

    @r.get("/v1/files/{file_id}")
    async def get_file(file_id: str):
        try:
            return file_object(manager(ctx).get_file(None, file_id))
        except BatchError as e:
            raise api_error(e)

    @r.get("/v1/files/{file_id}/content")
    async def content(file_id: str):
        m = manager(ctx)
        try:
            row = m.get_file(None, file_id)
        except BatchError as e:
            raise api_error(e)
        return FileResponse(m.store.path(file_id), media_type="application/jsonl", filename=row["filename"])

    @r.delete("/v1/files/{file_id}")
    async def delete(file_id: str):
        try:
            return manager(ctx).delete_file(None, file_id)
        except BatchError as e:
            raise api_error(e)

    return r
