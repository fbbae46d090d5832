"""The gateway's database (SQLAlchemy Core): virtual keys and the audit log.

SQLite file by default; PostgreSQL (or anything SQLAlchemy speaks) by URL. `postgresql://` URLs
use the psycopg 3 driver. Tables are created on first use.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (Boolean, Column, DateTime, Float, Integer, MetaData, String, Table, Text, create_engine,
                        event)
from sqlalchemy.engine import Engine

metadata = MetaData()

api_keys = Table(
    "gateway_keys", metadata,
    Column("id", String(16), primary_key=True),           # public id: shown in lists and audit rows
    Column("key_hash", String(64), nullable=False, unique=True),  # sha256 of the secret; the secret is never stored
    Column("name", String(200), nullable=False, default=""),
    Column("department", String(200), nullable=False),
    Column("models", Text, nullable=False, default="*"),  # comma-separated public model names, or *
    Column("rpm", Integer, nullable=True),                # requests per minute; NULL = unlimited
    Column("tpm", Integer, nullable=True),                # tokens per minute
    Column("monthly_budget", Float, nullable=True),       # currency per calendar month (UTC)
    Column("created_at", DateTime, nullable=False),
    Column("revoked_at", DateTime, nullable=True),
)

audit_log = Table(
    "gateway_audit", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts", DateTime, nullable=False, index=True),   # UTC, when the request arrived
    Column("key_id", String(16), nullable=True, index=True),
    Column("department", String(200), nullable=True),
    Column("model", String(200), nullable=True),          # the public model name
    Column("endpoint", String(40), nullable=False),
    Column("route", String(200), nullable=True),          # semantic route or split target
    Column("pool", String(200), nullable=True),
    Column("backend", String(300), nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("fallback", Boolean, nullable=False, default=False),
    Column("stream", Boolean, nullable=False, default=False),
    Column("prompt_tokens", Integer, nullable=False, default=0),
    Column("completion_tokens", Integer, nullable=False, default=0),
    Column("cost", Float, nullable=False, default=0.0),
    Column("ttft_s", Float, nullable=True),
    Column("latency_s", Float, nullable=False),
    Column("status", Integer, nullable=False),
    Column("error", Text, nullable=True),
    Column("prompt", Text, nullable=True),                # only with database.log_prompts
    Column("truncated", Boolean, nullable=True),          # a value was cut or escaped to fit (audit.storable)
    Column("batch_id", String(40), nullable=True, index=True),  # a batch line: its batch (priced at batch_prices)
)


# Budgets that hold under concurrency and across gateway replicas (keys.BudgetLedger): each key's
# month-to-date spend, and the worst-case cost of its requests in flight.
key_spend = Table(
    "gateway_key_spend", metadata,
    Column("key_id", String(16), primary_key=True),
    Column("month", DateTime, primary_key=True),          # UTC month start
    Column("spent", Float, nullable=False),
    Column("version", Integer, nullable=False),           # bumped to lock the row while admitting
)

budget_reservations = Table(
    "gateway_budget_reservations", metadata,
    Column("id", String(32), primary_key=True),
    Column("key_id", String(16), nullable=False, index=True),
    Column("amount", Float, nullable=False),              # the request's worst-case cost
    Column("expires_at", DateTime, nullable=False),       # a crashed gateway's reservations lapse
)


def normalize_url(url: str) -> str:
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def open_db(url: str) -> Engine:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _wal(conn, _):  # readers (report, keys list) never block the writer
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
    else:
        engine = create_engine(url, pool_pre_ping=True)
    metadata.create_all(engine)
    _add_missing_columns(engine)
    return engine


def _add_missing_columns(engine: Engine) -> None:
    """Columns added since a database was created (nullable, so old rows stay valid)."""
    from sqlalchemy import inspect, text

    for table in (audit_log,):
        have = {c["name"] for c in inspect(engine).get_columns(table.name)}
        for col in table.columns:
            if col.name not in have and col.nullable:
                with engine.begin() as conn:
                    conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN {col.name} '
                                      f'{col.type.compile(dialect=engine.dialect)}'))


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def month_start(now: dt.datetime | None = None) -> dt.datetime:
    now = now or utcnow()
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
