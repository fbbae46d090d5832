"""/v1/files: upload a batch input file, list, read, download, delete (OpenAI's shapes). On when the
server has a --batch-dir (where files and batch state persist). The gateway mounts the same routes
with each virtual key as the owner: a key sees only its own files."""

from __future__ import annotations

from typing import TYPE_CHECKING

from collections.abc import Callable

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from pagedserve.batch.manager import BatchManager, file_object
from pagedserve.server.errors import APIError

if TYPE_CHECKING:  # the gateway mounts these routes without the engine (and torch) imported
    from pagedserve.server.context import ServingContext

OFF = "the Files and Batches API is off: start the server with --batch-dir DIR (where files and batch state persist)"

Owner = Callable[[Request], "str | None"]  # whose files a request sees (None: a plain server's one tenant)
GetManager = Callable[[], BatchManager]


async def upload_form(request: Request, m: BatchManager, owner: str | None) -> dict:
    """POST /v1/files (multipart: file, purpose), read by hand once the caller is known: a keyless
    client must not make the gateway spool a file."""
    form = await request.form(max_files=1, max_fields=4)
    file, purpose = form.get("file"), form.get("purpose")
    if not hasattr(file, "read") or not isinstance(purpose, str):
        raise APIError(400, "send multipart/form-data with a 'file' and a 'purpose' field", "file")
    try:
        return m.create_file(owner, file.filename or "", purpose, await file.read(m.limits.max_file_bytes + 1))
    finally:
        await form.close()


def files_router(manager: GetManager, owner: Owner, dependencies: list | None = None) -> APIRouter:
    r = APIRouter(dependencies=dependencies or [])

    @r.post("/v1/files")
    async def upload(request: Request):
        who = owner(request)  # first: the gateway authenticates here, before any of the body is read
        return await upload_form(request, manager(), who)

    @r.get("/v1/files")
    async def list_files(request: Request, purpose: str | None = None, limit: int = Query(10000, ge=1, le=10000),
                         after: str | None = None):
        rows = manager().store.list_files(owner(request), purpose, limit + 1, after)
        data = [file_object(x) for x in rows[:limit]]
        return {"object": "list", "data": data, "has_more": len(rows) > limit,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

    @r.get("/v1/files/{file_id}")
    async def get_file(request: Request, file_id: str):
        return file_object(manager().get_file(owner(request), file_id))

    @r.get("/v1/files/{file_id}/content")
    async def content(request: Request, file_id: str):
        m = manager()
        row = m.get_file(owner(request), file_id)
        return FileResponse(m.store.path(file_id), media_type="application/jsonl", filename=row["filename"])

    @r.delete("/v1/files/{file_id}")
    async def delete(request: Request, file_id: str):
        return manager().delete_file(owner(request), file_id)

    return r


def server_manager(ctx: ServingContext) -> GetManager:
    def get() -> BatchManager:
        if ctx.batches is None:
            raise APIError(404, OFF, code="batch_api_off")
        return ctx.batches
    return get


def router(ctx: ServingContext) -> APIRouter:
    return files_router(server_manager(ctx), lambda _: None, ctx.auth)
