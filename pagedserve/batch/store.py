"""Durable state of the Files and Batches API: file bytes in a directory, everything else in one
SQLite database beside them (SQLAlchemy Core).

What makes a batch survive `kill -9`: every finished line is one row (batch id, line number) in
`batch_lines`, committed as it finishes; a restarted server runs only the lines without a row and
builds the output file from the rows, in input order. The primary key makes a line impossible to
record twice. SQLite runs in WAL mode with synchronous=NORMAL: a killed process loses nothing
committed (only an OS crash could lose the last commits, which are then redone, not duplicated).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from sqlalchemy import (Boolean, Column, Integer, MetaData, String, Table, Text, and_, create_engine, delete,
                        event, func, insert, select, update)

metadata = MetaData()

files = Table(
    "files", metadata,
    Column("id", String(40), primary_key=True),
    Column("owner", String(64), nullable=True, index=True),  # a gateway key id; None on a plain server
    Column("purpose", String(20), nullable=False),
    Column("filename", String(256), nullable=False),
    Column("bytes", Integer, nullable=False),
    Column("created_at", Integer, nullable=False),
)

batches = Table(
    "batches", metadata,
    Column("id", String(40), primary_key=True),
    Column("owner", String(64), nullable=True, index=True),
    Column("status", String(16), nullable=False, index=True),
    Column("endpoint", String(40), nullable=False),
    Column("input_file_id", String(40), nullable=False),
    Column("completion_window", String(8), nullable=False),
    Column("metadata", Text, nullable=True),                # JSON object of up to 16 string pairs
    Column("created_at", Integer, nullable=False),
    Column("expires_at", Integer, nullable=False),
    Column("times", Text, nullable=False, default="{}"),    # JSON: in_progress_at, completed_at, ...
    Column("total", Integer, nullable=False, default=0),
    Column("output_file_id", String(40), nullable=True),
    Column("error_file_id", String(40), nullable=True),
    Column("errors", Text, nullable=True),                  # JSON list of validation errors
)

batch_lines = Table(
    "batch_lines", metadata,
    Column("batch_id", String(40), primary_key=True),
    Column("line", Integer, primary_key=True),              # 0-based index among the batch's requests
    Column("ok", Boolean, nullable=False),
    Column("result", Text, nullable=False),                 # the output line, JSON
)


class BatchStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.file_dir = self.root / "files"
        self.file_dir.mkdir(parents=True, exist_ok=True)
        # Used from the event loop and from worker threads (parsing, output files).
        self.db = create_engine(f"sqlite:///{self.root / 'batches.db'}",
                                connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(self.db, "connect")
        def _pragmas(conn, _):
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        metadata.create_all(self.db)

    # -- files -----------------------------------------------------------------------------
    def path(self, file_id: str) -> Path:
        return self.file_dir / file_id

    def add_file(self, file_id: str, owner: str | None, purpose: str, filename: str, data: bytes) -> dict:
        tmp = self.path(file_id).with_suffix(".part")
        with open(tmp, "wb") as f:  # whole or not at all: a kill mid-write leaves no half file
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path(file_id))
        row = dict(id=file_id, owner=owner, purpose=purpose, filename=filename, bytes=len(data),
                   created_at=int(time.time()))
        with self.db.begin() as c:
            c.execute(insert(files).values(**row))
        return row

    def get_file(self, file_id: str, owner: str | None) -> dict | None:
        with self.db.connect() as c:
            r = c.execute(select(files).where(and_(files.c.id == file_id, _owned(files, owner)))).mappings().first()
        return dict(r) if r else None

    def list_files(self, owner: str | None, purpose: str | None, limit: int, after: str | None) -> list[dict]:
        q = select(files).where(_owned(files, owner))
        if purpose:
            q = q.where(files.c.purpose == purpose)
        return self._page(q, files, limit, after)

    def delete_file(self, file_id: str) -> None:
        with self.db.begin() as c:
            c.execute(delete(files).where(files.c.id == file_id))
        self.path(file_id).unlink(missing_ok=True)

    # -- batches ---------------------------------------------------------------------------
    def add_batch(self, row: dict) -> None:
        with self.db.begin() as c:
            c.execute(insert(batches).values(**row))

    def get_batch(self, batch_id: str, owner: str | None = None, any_owner: bool = False) -> dict | None:
        cond = batches.c.id == batch_id if any_owner else and_(batches.c.id == batch_id, _owned(batches, owner))
        with self.db.connect() as c:
            r = c.execute(select(batches).where(cond)).mappings().first()
        return dict(r) if r else None

    def list_batches(self, owner: str | None, limit: int, after: str | None) -> list[dict]:
        return self._page(select(batches).where(_owned(batches, owner)), batches, limit, after)

    def unfinished(self) -> list[dict]:
        with self.db.connect() as c:
            rows = c.execute(select(batches).where(
                batches.c.status.in_(("validating", "in_progress", "finalizing", "cancelling")))).mappings().all()
        return [dict(r) for r in rows]

    def set_status(self, batch_id: str, status: str, **values) -> None:
        """Move a batch to `status`, stamping `<status>_at` in its times (kept if already set)."""
        with self.db.begin() as c:
            times = json.loads(c.execute(select(batches.c.times).where(batches.c.id == batch_id)).scalar_one())
            times.setdefault(f"{status}_at", int(time.time()))
            c.execute(update(batches).where(batches.c.id == batch_id).values(status=status, times=json.dumps(times),
                                                                              **values))

    # -- lines -----------------------------------------------------------------------------
    def add_result(self, batch_id: str, line: int, ok: bool, result: dict) -> None:
        with self.db.begin() as c:
            c.execute(insert(batch_lines).values(batch_id=batch_id, line=line, ok=ok, result=json.dumps(result)))

    def done_lines(self, batch_id: str) -> set[int]:
        with self.db.connect() as c:
            return set(c.execute(select(batch_lines.c.line).where(batch_lines.c.batch_id == batch_id)).scalars())

    def counts(self, batch_id: str) -> tuple[int, int]:
        """(completed, failed) lines so far."""
        with self.db.connect() as c:
            rows = c.execute(select(batch_lines.c.ok, func.count()).where(batch_lines.c.batch_id == batch_id)
                             .group_by(batch_lines.c.ok)).all()
        by = {bool(ok): n for ok, n in rows}
        return by.get(True, 0), by.get(False, 0)

    def results(self, batch_id: str, ok: bool):
        """The output lines (JSON text) of finished lines, in input order."""
        with self.db.connect() as c:
            for (text,) in c.execute(select(batch_lines.c.result).where(
                    and_(batch_lines.c.batch_id == batch_id, batch_lines.c.ok == ok)).order_by(batch_lines.c.line)):
                yield text

    # -- helpers ---------------------------------------------------------------------------
    def _page(self, q, table, limit: int, after: str | None) -> list[dict]:
        """Newest first, `limit` rows after the row `after` (OpenAI's cursor pagination)."""
        with self.db.connect() as c:
            if after:
                ref = c.execute(select(table.c.created_at).where(table.c.id == after)).scalar()
                if ref is not None:
                    q = q.where((table.c.created_at < ref) | ((table.c.created_at == ref) & (table.c.id < after)))
            rows = c.execute(q.order_by(table.c.created_at.desc(), table.c.id.desc()).limit(limit)).mappings().all()
        return [dict(r) for r in rows]


def _owned(table, owner: str | None):
    return table.c.owner.is_(None) if owner is None else table.c.owner == owner
