"""Virtual API keys: departments, allowed models, rate limits and monthly budgets.

Secrets are random 32-byte tokens shown once at creation; only their SHA-256 is stored (a slow
password hash buys nothing for keys with 256 bits of entropy, and lookups stay O(1)).
The gateway keeps the key table in memory and re-reads it every `auth.refresh_s` seconds, so
`keys revoke` takes effect on a running gateway within that time. Rate windows and month-to-date
spend are kept in memory per gateway process (spend is re-read from the audit log at start).
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine

from pagedserve.gateway.store import api_keys, audit_log, month_start, utcnow

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


class RateLimiter:
    """Sliding 60-second windows of requests and tokens per key."""

    WINDOW = 60.0

    def __init__(self):
        self.requests: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.tokens: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.token_sum: dict[str, int] = collections.defaultdict(int)  # tokens in the window, kept current

    def _trim(self, q: collections.deque, now: float) -> int:
        """Drop entries older than the window; returns the amount dropped."""
        dropped = 0
        while q and q[0][0] <= now - self.WINDOW:
            dropped += q.popleft()[1]
        return dropped

    def check(self, key: KeyInfo, now: float | None = None) -> tuple[str, float] | None:
        """None if the request may go ahead (and it is counted); else (which limit, retry-after seconds)."""
        now = time.monotonic() if now is None else now
        rq, tq = self.requests[key.id], self.tokens[key.id]
        self._trim(rq, now)
        self.token_sum[key.id] -= self._trim(tq, now)
        if key.rpm is not None and len(rq) >= key.rpm:
            return f"{key.rpm} requests per minute", rq[0][0] + self.WINDOW - now
        if key.tpm is not None and self.token_sum[key.id] >= key.tpm:
            return f"{key.tpm} tokens per minute", tq[0][0] + self.WINDOW - now
        rq.append((now, 1))
        return None

    def add_tokens(self, key_id: str, n: int, now: float | None = None) -> None:
        if n:
            self.tokens[key_id].append((time.monotonic() if now is None else now, n))
            self.token_sum[key_id] += n


class BudgetTracker:
    """Month-to-date spend per key: loaded from the audit log at start, then kept up to date."""

    def __init__(self, db: Engine):
        self.month = month_start()
        with db.connect() as conn:
            self.spent = {k: float(v or 0) for k, v in conn.execute(
                select(audit_log.c.key_id, func.sum(audit_log.c.cost)).where(audit_log.c.ts >= self.month)
                .group_by(audit_log.c.key_id)).all()}

    def _roll(self) -> None:
        m = month_start()
        if m != self.month:
            self.month, self.spent = m, {}

    def over(self, key: KeyInfo) -> float | None:
        """The spend if the key is at or over its budget, else None."""
        self._roll()
        s = self.spent.get(key.id, 0.0)
        return s if key.monthly_budget is not None and s >= key.monthly_budget else None

    def add(self, key_id: str, cost: float) -> None:
        self._roll()
        self.spent[key_id] = self.spent.get(key_id, 0.0) + cost
