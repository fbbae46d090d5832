"""The Files and Batches API's state machine (OpenAI's shapes), behind the server's endpoints.

A batch moves validating -> in_progress -> finalizing -> completed, or failed (its input did not
validate: one error per bad line, in `errors` and in the error file), or cancelling -> cancelled,
or expired (not done within its completion window). Each batch runs as an asyncio task of the
server's event loop; on start the manager picks up every batch a previous process left unfinished
and runs the lines that have no recorded result (store.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from pagedserve.batch import lines as L
from pagedserve.batch.limits import BatchLimits
from pagedserve.batch.runner import run_lines
from pagedserve.batch.store import BatchStore
from pagedserve.server.errors import APIError

log = logging.getLogger("pagedserve.batch")

COMPLETION_WINDOWS = {"24h": 24 * 3600}
FILE_PURPOSES = ("batch",)  # what clients upload; outputs are "batch_output"
MAX_METADATA = 16  # pairs, as OpenAI: keys up to 64 characters, values up to 512


class BatchError(APIError):
    """A request the Files and Batches API refuses: HTTP status, message, the field to change (an
    APIError: the server's and the gateway's error handlers answer it OpenAI-style)."""


def file_object(row: dict) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "status_details": None}


class BatchManager:
    def __init__(self, store: BatchStore, executor, models: list[str], limits: BatchLimits | None = None,
                 metrics=None):
        self.store = store
        self.executor = executor  # has `async run(line, owner, batch_id)` (executor.py)
        self.models = models
        self.limits = limits or BatchLimits()
        self.metrics = metrics  # ServerMetrics or None
        self._tasks: dict[str, asyncio.Task] = {}
        self._stops: dict[str, asyncio.Event] = {}
        self._cancel: set[str] = set()
        # All batches together keep at most `concurrency` lines in flight: ten batches must not take
        # ten times the engine's share.
        self._slots = asyncio.Semaphore(self.limits.concurrency)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        for row in self.store.unfinished():
            log.info("batch %s: resuming (%s)", row["id"], row["status"])
            if row["status"] == "cancelling":
                self._cancel.add(row["id"])
            self._spawn(row["id"])

    async def stop(self) -> None:
        """Shutdown: stop every batch where it is; the next start resumes them."""
        for ev in self._stops.values():
            ev.set()
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- files -----------------------------------------------------------------------------
    def create_file(self, owner: str | None, filename: str, purpose: str, data: bytes) -> dict:
        if purpose not in FILE_PURPOSES:
            raise BatchError(400, f"purpose must be one of {list(FILE_PURPOSES)} here, got {L._short(purpose)}",
                             "purpose")
        if len(data) > self.limits.max_file_bytes:
            raise BatchError(413, f"the file is {len(data)} bytes, over the limit of {self.limits.max_file_bytes} "
                                  "(--max-batch-file-bytes)", "file")
        if not data:
            raise BatchError(400, "the file is empty", "file")
        name = (filename or "upload.jsonl")[:255]
        return file_object(self.store.add_file(L.new_id("file"), owner, purpose, name, data))

    def get_file(self, owner: str | None, file_id: str) -> dict:
        row = self.store.get_file(file_id, owner)
        if row is None:
            raise BatchError(404, f"no file with id {L._short(file_id)}", "file_id", "not_found")
        return row

    def delete_file(self, owner: str | None, file_id: str) -> dict:
        self.get_file(owner, file_id)
        self.store.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # -- batches ---------------------------------------------------------------------------
    def create_batch(self, owner: str | None, input_file_id: str, endpoint: str, completion_window: str,
                     metadata: dict | None) -> dict:
        if endpoint not in L.ENDPOINTS:
            raise BatchError(400, f"endpoint must be one of {list(L.ENDPOINTS)}, got {L._short(str(endpoint))}",
                             "endpoint")
        if completion_window not in COMPLETION_WINDOWS:
            raise BatchError(400, f"completion_window must be one of {list(COMPLETION_WINDOWS)}, got "
                                  f"{L._short(str(completion_window))}", "completion_window")
        if metadata is not None:
            if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA or not all(
                    isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                    for k, v in metadata.items()):
                raise BatchError(400, f"metadata: at most {MAX_METADATA} string pairs, keys up to 64 characters, "
                                      "values up to 512", "metadata")
        f = self.store.get_file(input_file_id, owner)
        if f is None:
            raise BatchError(404, f"no file with id {L._short(input_file_id)}", "input_file_id", "not_found")
        if f["purpose"] != "batch":
            raise BatchError(400, f"file {input_file_id} has purpose {f['purpose']}, not batch", "input_file_id")
        now = int(time.time())
        bid = L.new_id("batch")
        self.store.add_batch(dict(id=bid, owner=owner, status="validating", endpoint=endpoint,
                                  input_file_id=input_file_id, completion_window=completion_window,
                                  metadata=json.dumps(metadata) if metadata is not None else None, created_at=now,
                                  expires_at=now + COMPLETION_WINDOWS[completion_window], times="{}", total=0))
        self._spawn(bid)
        return self.batch_object(self.store.get_batch(bid, owner))

    def get_batch(self, owner: str | None, batch_id: str) -> dict:
        row = self.store.get_batch(batch_id, owner)
        if row is None:
            raise BatchError(404, f"no batch with id {L._short(batch_id)}", "batch_id", "not_found")
        return self.batch_object(row)

    def list_batches(self, owner: str | None, limit: int, after: str | None) -> dict:
        rows = self.store.list_batches(owner, limit + 1, after)
        data = [self.batch_object(r) for r in rows[:limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}

    def cancel_batch(self, owner: str | None, batch_id: str) -> dict:
        row = self.store.get_batch(batch_id, owner)
        if row is None:
            raise BatchError(404, f"no batch with id {L._short(batch_id)}", "batch_id", "not_found")
        if row["status"] in ("validating", "in_progress", "finalizing"):
            self.store.set_status(batch_id, "cancelling")
            self._cancel.add(batch_id)
            if batch_id in self._stops:
                self._stops[batch_id].set()
            if batch_id not in self._tasks:
                self._spawn(batch_id)
        elif row["status"] not in ("cancelling", "cancelled"):
            raise BatchError(409, f"batch {batch_id} is {row['status']}: only a running batch can be cancelled")
        return self.get_batch(owner, batch_id)

    def batch_object(self, row: dict) -> dict:
        times = json.loads(row["times"])
        done, failed = (self.store.counts(row["id"]) if row["status"] not in ("validating", "failed") else (0, 0))
        errors = json.loads(row["errors"]) if row["errors"] else None
        obj = {"id": row["id"], "object": "batch", "endpoint": row["endpoint"],
               "errors": {"object": "list", "data": errors} if errors else None,
               "input_file_id": row["input_file_id"], "completion_window": row["completion_window"],
               "status": row["status"], "output_file_id": row["output_file_id"],
               "error_file_id": row["error_file_id"], "created_at": row["created_at"],
               "expires_at": row["expires_at"],
               "request_counts": {"total": row["total"], "completed": done, "failed": failed},
               "metadata": json.loads(row["metadata"]) if row["metadata"] else None}
        for k in ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
                  "cancelled_at"):
            obj[k] = times.get(k)
        return obj

    # -- running ---------------------------------------------------------------------------
    def _spawn(self, batch_id: str) -> None:
        self._stops[batch_id] = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._run(batch_id))
        self._tasks[batch_id] = task
        task.add_done_callback(lambda _: (self._tasks.pop(batch_id, None), self._stops.pop(batch_id, None)))

    async def _run(self, batch_id: str) -> None:
        try:
            await self._drive(batch_id)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken batch must not take the server down
            log.exception("batch %s failed", batch_id)
            self.store.set_status(batch_id, "failed", errors=json.dumps(
                [{"code": "internal_error", "message": f"{type(e).__name__}: {str(e)[:500]}", "param": None,
                  "line": None}]))

    async def _drive(self, batch_id: str) -> None:
        row = self.store.get_batch(batch_id, any_owner=True)
        path = self.store.path(row["input_file_id"])
        if not path.exists():
            self.store.set_status(batch_id, "failed", errors=json.dumps([{
                "code": "missing_file", "message": f"the input file {row['input_file_id']} was deleted",
                "param": "input_file_id", "line": None}]))
            return
        # Reading and checking up to --max-batch-file-bytes of JSON takes seconds: off the event loop,
        # which keeps serving interactive requests meanwhile (so does writing the outputs, below).
        todo, errors = await asyncio.to_thread(lambda: L.parse(path.read_bytes(), endpoint=row["endpoint"],
                                                               models=self.models, max_lines=self.limits.max_lines))
        if errors:
            error_file = await asyncio.to_thread(
                self._write_file, row["owner"], f"{batch_id}_errors.jsonl",
                (json.dumps({**L.error_line(e.custom_id, e.code, e.message), "line": e.line}) for e in errors))
            self.store.set_status(batch_id, "failed", errors=json.dumps([e.as_dict() for e in errors]),
                                  error_file_id=error_file, total=0)
            log.info("batch %s: failed validation (%d bad lines)", batch_id, len(errors))
            return
        status = self.store.get_batch(batch_id, any_owner=True)["status"]  # now: a cancel may have come meanwhile
        self.store.set_status(batch_id, "in_progress" if status == "validating" else status, total=len(todo))
        stop = self._stops[batch_id]
        if batch_id in self._cancel:
            stop.set()
        done = self.store.done_lines(batch_id)
        left = [ln for ln in todo if ln.index not in done]
        log.info("batch %s: %d lines, %d to run", batch_id, len(todo), len(left))
        expiry = asyncio.get_running_loop().call_later(max(0.0, row["expires_at"] - time.time()), stop.set)
        gauge = self.metrics.batch_lines if self.metrics is not None else None
        states = ("queued", "running", "done")
        if gauge is not None:
            for state, n in zip(states, (len(left), 0, len(done))):
                gauge.labels(batch_id, state).set(n)

        async def execute(line):
            async with self._slots:
                if gauge is not None:
                    gauge.labels(batch_id, "queued").dec()
                    gauge.labels(batch_id, "running").inc()
                try:
                    return await self.executor.run(line, row["owner"], batch_id)
                finally:
                    if gauge is not None:
                        gauge.labels(batch_id, "running").dec()

        def record(line, ok, result):
            self.store.add_result(batch_id, line.index, ok, result)
            if gauge is not None:
                gauge.labels(batch_id, "done").inc()
                self.metrics.batch_lines_total.labels("completed" if ok else "failed").inc()

        try:
            finished = await run_lines(left, execute, self.limits.concurrency, record, stop)
        finally:
            expiry.cancel()
            if gauge is not None:
                for state in states:
                    gauge.remove(batch_id, state)
        if not finished and batch_id not in self._cancel and time.time() < row["expires_at"]:
            return  # shutdown: resumed on the next start
        final = "completed" if finished else ("cancelled" if batch_id in self._cancel else "expired")
        if final == "completed":
            self.store.set_status(batch_id, "finalizing")
        out = await asyncio.to_thread(self._write_file, row["owner"], f"{batch_id}_output.jsonl",
                                      self.store.results(batch_id, True))
        err = await asyncio.to_thread(self._write_file, row["owner"], f"{batch_id}_errors.jsonl",
                                      self.store.results(batch_id, False))
        self.store.set_status(batch_id, final, output_file_id=out, error_file_id=err)
        self._cancel.discard(batch_id)
        log.info("batch %s: %s", batch_id, final)

    def _write_file(self, owner: str | None, name: str, rows) -> str | None:
        text = "".join(r + "\n" for r in rows)
        if not text:
            return None
        return self.store.add_file(L.new_id("file"), owner, "batch_output", name, text.encode())["id"]
