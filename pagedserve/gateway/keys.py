"""Virtual API keys: departments, allowed models, rate limits and monthly budgets.

Secrets are random 32-byte tokens shown once at creation; only their SHA-256 is stored (a slow
password hash buys nothing for keys with 256 bits of entropy, and lookups stay O(1)).
The gateway keeps the key table in memory and re-reads it every `auth.refresh_s` seconds, so
`keys revoke` takes effect on a running gateway within that time. Rate windows are kept in memory
per gateway process (with worst-case tokens reserved while requests run); monthly budgets live in
the database (BudgetLedger), so every gateway sharing it enforces one budget.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from pagedserve.gateway.store import api_keys, audit_log, budget_reservations, key_spend, month_start, utcnow

KEY_PREFIX = "psk-"


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class KeyInfo:
    id: str
    name: str
    department: str
    models: tuple[str, ...]  # ("*",) = all
    rpm: int | None
    tpm: int | None
    monthly_budget: float | None
    revoked: bool = False

    def allows(self, model: str) -> bool:
        return "*" in self.models or model in self.models


def _row_to_info(r) -> KeyInfo:
    return KeyInfo(r.id, r.name, r.department, tuple(m.strip() for m in r.models.split(",") if m.strip()),
                   r.rpm, r.tpm, r.monthly_budget, r.revoked_at is not None)


def create_key(db: Engine, department: str, name: str = "", models: list[str] | None = None, rpm: int | None = None,
               tpm: int | None = None, monthly_budget: float | None = None) -> tuple[str, KeyInfo]:
    """Create a key; returns (secret, info). The secret is not recoverable afterwards."""
    if not department.strip():
        raise ValueError("a key needs a department")
    for label, v in (("rpm", rpm), ("tpm", tpm), ("monthly_budget", monthly_budget)):
        if v is not None and v <= 0:
            raise ValueError(f"{label} must be > 0 (leave it out for no limit)")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key_id = secrets.token_hex(4)
    row = dict(id=key_id, key_hash=hash_key(secret), name=name, department=department.strip(),
               models=",".join(models) if models else "*", rpm=rpm, tpm=tpm, monthly_budget=monthly_budget,
               created_at=utcnow(), revoked_at=None)
    with db.begin() as conn:
        conn.execute(api_keys.insert().values(**row))
    return secret, KeyInfo(key_id, name, row["department"], tuple(models or ("*",)), rpm, tpm, monthly_budget)


def list_keys(db: Engine) -> list[tuple[KeyInfo, float, dt.datetime]]:
    """(key, month-to-date spend, created_at) for every key."""
    with db.connect() as conn:
        rows = conn.execute(select(api_keys).order_by(api_keys.c.created_at)).all()
        spend = dict(conn.execute(select(audit_log.c.key_id, func.sum(audit_log.c.cost))
                                  .where(audit_log.c.ts >= month_start()).group_by(audit_log.c.key_id)).all())
    return [(_row_to_info(r), float(spend.get(r.id) or 0.0), r.created_at) for r in rows]


def revoke_key(db: Engine, key_id: str) -> bool:
    with db.begin() as conn:
        n = conn.execute(update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                         .values(revoked_at=utcnow())).rowcount
    return n == 1


class KeyCache:
    """hash -> KeyInfo, re-read from the database periodically (the request path never queries)."""

    def __init__(self, db: Engine):
        self.db = db
        self.by_hash: dict[str, KeyInfo] = {}

    def refresh(self) -> None:
        with self.db.connect() as conn:
            rows = conn.execute(select(api_keys)).all()
        self.by_hash = {r.key_hash: _row_to_info(r) for r in rows}

    def lookup(self, secret: str) -> KeyInfo | None:
        return self.by_hash.get(hash_key(secret))

    def by_id(self, key_id: str) -> KeyInfo | None:
        """A key by its public id (a batch's lines run as the key that created the batch)."""
        return next((k for k in self.by_hash.values() if k.id == key_id), None)


class RateLimiter:
    """Sliding 60-second windows of requests and tokens per key."""

    WINDOW = 60.0

    def __init__(self):
        self.requests: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.tokens: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.token_sum: dict[str, int] = collections.defaultdict(int)  # tokens in the window, kept current
        self.reserved: dict[str, int] = collections.defaultdict(int)  # worst-case tokens of requests in flight

    def _trim(self, q: collections.deque, now: float) -> int:
        """Drop entries older than the window; returns the amount dropped."""
        dropped = 0
        while q and q[0][0] <= now - self.WINDOW:
            dropped += q.popleft()[1]
        return dropped

    def check(self, key: KeyInfo, worst_tokens: int = 0, now: float | None = None) -> tuple[str, float] | None:
        """None if the request may go ahead: it is counted, and its worst-case tokens reserved
        until `add_tokens` settles them (so concurrent requests cannot all pass a window that
        has room for one); else (which limit, retry-after seconds)."""
        now = time.monotonic() if now is None else now
        rq, tq = self.requests[key.id], self.tokens[key.id]
        self._trim(rq, now)
        self.token_sum[key.id] -= self._trim(tq, now)
        if key.rpm is not None and len(rq) >= key.rpm:
            return f"{key.rpm} requests per minute", rq[0][0] + self.WINDOW - now
        if key.tpm is not None:
            used = self.token_sum[key.id] + self.reserved[key.id]
            if used + worst_tokens > key.tpm and (used > 0 or worst_tokens > key.tpm):
                if worst_tokens > key.tpm and used == 0:
                    return (f"{key.tpm} tokens per minute (this request may use up to {worst_tokens}: lower "
                            "max_tokens)", self.WINDOW)
                retry = tq[0][0] + self.WINDOW - now if tq else 1.0
                return f"{key.tpm} tokens per minute", retry
            self.reserved[key.id] += worst_tokens
        rq.append((now, 1))
        return None

    def add_tokens(self, key_id: str, n: int, reserved: int = 0, now: float | None = None) -> None:
        """Count a finished request's actual tokens and release what it had reserved."""
        if reserved:
            self.reserved[key_id] = max(0, self.reserved[key_id] - reserved)
        if n:
            self.tokens[key_id].append((time.monotonic() if now is None else now, n))
            self.token_sum[key_id] += n


@dataclass(frozen=True)
class Reservation:
    id: str
    key_id: str
    month: dt.datetime
    amount: float


class BudgetExceeded(Exception):
    def __init__(self, spent: float, reserved: float, worst: float):
        super().__init__(f"spent {spent}, reserved {reserved}, request's worst case {worst}")
        self.spent, self.reserved, self.worst = spent, reserved, worst


class BudgetLedger:
    """Monthly budgets that hold under concurrency, across every gateway sharing the database.

    Admission reserves the request's worst-case cost in one transaction that first locks the
    key's spend row (an UPDATE: a row lock in PostgreSQL, the write lock in SQLite), then checks
    spent + reservations in flight + this request <= budget. Completion replaces the reservation
    by the actual cost. So spend never passes the budget by more than an estimate's error, and a
    crashed gateway's reservations lapse at `expires_at` instead of holding the budget forever.
    Blocking calls: run them on a thread."""

    def __init__(self, db: Engine, hold_s: float):
        self.db, self.hold_s = db, hold_s

    def _create_row(self, key_id: str, month: dt.datetime) -> None:
        """The key's first request this month: its row, carrying over what the audit log already
        has (from gateways before budgets lived here)."""
        with self.db.connect() as conn:
            spent = conn.execute(select(func.coalesce(func.sum(audit_log.c.cost), 0.0)).where(
                audit_log.c.key_id == key_id, audit_log.c.ts >= month)).scalar()
        try:
            with self.db.begin() as conn:
                conn.execute(insert(key_spend).values(key_id=key_id, month=month, spent=float(spent), version=0))
        except sa_exc.IntegrityError:  # another gateway made it first
            pass

    def reserve(self, key: KeyInfo, worst: float) -> Reservation:
        """The reservation, or BudgetExceeded."""
        month, now = month_start(), utcnow()
        rid = secrets.token_hex(16)
        where = (key_spend.c.key_id == key.id) & (key_spend.c.month == month)
        for _ in range(2):
            with self.db.begin() as conn:
                # The lock (a row lock in PostgreSQL, the write lock in SQLite); 0 rows: no row yet.
                if conn.execute(update(key_spend).where(where).values(version=key_spend.c.version + 1)).rowcount:
                    spent = conn.execute(select(key_spend.c.spent).where(where)).scalar()
                    held = conn.execute(select(func.coalesce(func.sum(budget_reservations.c.amount), 0.0)).where(
                        budget_reservations.c.key_id == key.id, budget_reservations.c.expires_at > now)).scalar()
                    if spent + held + worst > key.monthly_budget:
                        raise BudgetExceeded(spent, held, worst)
                    conn.execute(insert(budget_reservations).values(
                        id=rid, key_id=key.id, amount=worst, expires_at=now + dt.timedelta(seconds=self.hold_s)))
                    return Reservation(rid, key.id, month, worst)
            self._create_row(key.id, month)
        raise RuntimeError(f"budget row for key {key.id} could not be created")

    def settle(self, r: Reservation, cost: float) -> None:
        """Replace the reservation by the actual cost (charged to the month it was admitted in)."""
        with self.db.begin() as conn:
            conn.execute(delete(budget_reservations).where(budget_reservations.c.id == r.id))
            if cost:
                conn.execute(update(key_spend).where(key_spend.c.key_id == r.key_id, key_spend.c.month == r.month)
                             .values(spent=key_spend.c.spent + cost))
            # Lapsed reservations of gateways that died: tidy up now and then.
            conn.execute(delete(budget_reservations).where(budget_reservations.c.expires_at < utcnow()
                                                           - dt.timedelta(hours=1)))
