"""`pagedserve gateway --config gateway.yaml` and its admin commands: `keys create|list|revoke`, `report`."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import logging
import re
import signal
import sys

log = logging.getLogger("pagedserve.gateway")

GROUPS = ("department", "model", "backend", "pool", "route", "key_id", "status", "batch_id")


def add_gateway_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="gateway YAML (see examples/gateway.yaml)")
    p.add_argument("--host", default=None, help="bind address (default: server.host in the config)")
    p.add_argument("--port", type=int, default=None, help="port (default: server.port in the config)")
    p.add_argument("--uvicorn-log-level", default="warning", choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's own log level (default: warning; the gateway logs at INFO)")
    sub = p.add_subparsers(dest="gateway_command")

    def db_args(q):
        q.add_argument("--config", dest="sub_config", help="read the database URL from this gateway config")
        q.add_argument("--db", help="database URL (sqlite:///file.db, postgresql://user:pw@host/db)")

    k = sub.add_parser("keys", help="manage virtual API keys")
    ks = k.add_subparsers(dest="keys_command", required=True)
    c = ks.add_parser("create", help="create a key (the secret is printed once)")
    db_args(c)
    c.add_argument("--department", required=True)
    c.add_argument("--name", default="")
    c.add_argument("--models", default=None, help="comma-separated public model names (default: all)")
    c.add_argument("--rpm", type=int, default=None, help="requests per minute")
    c.add_argument("--tpm", type=int, default=None, help="tokens (prompt + completion) per minute")
    c.add_argument("--budget", type=float, default=None, help="monthly budget in the price table's currency")
    ls = ks.add_parser("list", help="list keys with month-to-date spend")
    db_args(ls)
    rv = ks.add_parser("revoke", help="revoke a key by id")
    db_args(rv)
    rv.add_argument("key_id")

    r = sub.add_parser("report", help="requests, tokens, cost and latency from the audit log")
    db_args(r)
    r.add_argument("--by", default="department", choices=GROUPS)
    r.add_argument("--since", default=None, help="e.g. 24h, 7d, 30m, or a date 2026-11-01 (UTC)")
    r.add_argument("--csv", default=None, help="also write the table to this CSV file")


def parse_since(s: str | None, now: dt.datetime | None = None) -> dt.datetime | None:
    from pagedserve.gateway.store import utcnow

    if not s:
        return None
    now = now or utcnow()
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", s)
    if m:
        secs = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
        return now - dt.timedelta(seconds=secs)
    try:
        t = dt.datetime.fromisoformat(s)
    except ValueError:
        raise ValueError(f"--since {s!r}: use a duration like 24h / 7d / 30m or an ISO date like 2026-11-01") from None
    return t.astimezone(dt.timezone.utc).replace(tzinfo=None) if t.tzinfo else t


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)  # pipes and CI logs get whole columns


def _db_url(args) -> str:
    if getattr(args, "db", None):
        return args.db
    path = getattr(args, "sub_config", None) or getattr(args, "config", None)
    if path:
        from pagedserve.gateway.config import load_config

        return load_config(path, check_env=False).database.url
    raise ValueError("say which database: --db URL or --config gateway.yaml")


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[i]


def report_rows(db, by: str, since: dt.datetime | None, cost_per_hour: dict[str, float] | None = None) -> list[dict]:
    """One dict per group: requests, errors, tokens, cost, p50/p99 latency (seconds), and with
    `cost_per_hour` (self-hosted pools) `hosting_cost`: each pool's hourly price over the window,
    shared out by the tokens each group sent through that pool."""
    from sqlalchemy import select

    from pagedserve.gateway.store import audit_log as t, utcnow

    q = select(getattr(t.c, by), t.c.status, t.c.prompt_tokens, t.c.completion_tokens, t.c.cost, t.c.latency_s,
               t.c.pool, t.c.ts, t.c.batch_id)
    if since is not None:
        q = q.where(t.c.ts >= since)
    groups: dict = {}
    pool_tokens: dict[str, int] = {}
    first = None
    with db.connect() as conn:
        for g, status, pt, ct, cost, lat, pool, ts, batch in conn.execute(q):
            a = groups.setdefault("" if g is None else str(g), dict(requests=0, errors=0, prompt_tokens=0,
                                                                   completion_tokens=0, cost=0.0, batch_requests=0,
                                                                   batch_cost=0.0, lat=[], pools={}))
            a["requests"] += 1
            if batch is not None:  # batch lines: counted in the totals too, and shown apart
                a["batch_requests"] += 1
                a["batch_cost"] += cost
            a["errors"] += status >= 400
            a["prompt_tokens"] += pt
            a["completion_tokens"] += ct
            a["cost"] += cost
            a["lat"].append(lat)
            if pool:
                a["pools"][pool] = a["pools"].get(pool, 0) + pt + ct
                pool_tokens[pool] = pool_tokens.get(pool, 0) + pt + ct
            first = ts if first is None or ts < first else first
    hours = max((utcnow() - (since or first or utcnow())).total_seconds(), 1.0) / 3600
    out = []
    for g, a in sorted(groups.items(), key=lambda kv: -kv[1]["requests"]):
        lat, pools = a.pop("lat"), a.pop("pools")
        row = {by: g, **a, "p50_latency_s": _percentile(lat, 50), "p99_latency_s": _percentile(lat, 99)}
        if cost_per_hour:
            row["hosting_cost"] = sum(cost_per_hour[p] * hours * n / pool_tokens[p]
                                      for p, n in pools.items() if p in cost_per_hour and pool_tokens[p])
        out.append(row)
    return out


def run_report(args) -> int:
    from rich.table import Table

    from pagedserve.gateway.store import open_db

    since = parse_since(args.since)
    cph = None
    if getattr(args, "sub_config", None):
        from pagedserve.gateway.config import load_config

        cph = {p.name: p.cost_per_hour for p in load_config(args.sub_config, check_env=False).pools if p.cost_per_hour}
    rows = report_rows(open_db(_db_url(args)), args.by, since, cph)
    table = Table(title=f"gateway audit by {args.by}" + (f" since {since:%Y-%m-%d %H:%M} UTC" if since else ""))
    cols = [args.by, "requests", "errors", "prompt_tokens", "completion_tokens", "cost", "batch_requests",
            "batch_cost", "p50_latency_s", "p99_latency_s"] + (["hosting_cost"] if cph else [])
    for c in cols:
        table.add_column(c, justify="left" if c == args.by else "right")
    for r in rows:
        table.add_row(*(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    _console().print(table)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {args.csv}")
    return 0


def run_keys(args) -> int:
    from rich.table import Table

    from pagedserve.gateway.keys import create_key, list_keys, revoke_key
    from pagedserve.gateway.store import open_db

    db = open_db(_db_url(args))
    if args.keys_command == "create":
        models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
        secret, info = create_key(db, args.department, args.name, models, args.rpm, args.tpm, args.budget)
        print(f"id: {info.id}\nkey: {secret}\n(store the key now; only its hash is kept)")
        return 0
    if args.keys_command == "revoke":
        if not revoke_key(db, args.key_id):
            print(f"no active key with id {args.key_id}", file=sys.stderr)
            return 1
        print(f"revoked {args.key_id}")
        return 0
    table = Table(title="gateway keys")
    for c in ("id", "name", "department", "models", "rpm", "tpm", "budget/month", "spent this month", "status"):
        table.add_column(c)
    for k, spent, created in list_keys(db):
        table.add_row(k.id, k.name, k.department, ",".join(k.models), str(k.rpm or "-"), str(k.tpm or "-"),
                      f"{k.monthly_budget:.2f}" if k.monthly_budget else "-", f"{spent:.4f}",
                      "revoked" if k.revoked else "active")
    _console().print(table)
    return 0


def run_gateway(args) -> int:
    if args.gateway_command == "keys":
        return run_keys(args)
    if args.gateway_command == "report":
        return run_report(args)
    if not args.config:
        raise ValueError("pagedserve gateway needs --config gateway.yaml (see examples/gateway.yaml)")
    from pagedserve.gateway.config import load_config

    cfg = load_config(args.config)  # a config mistake is reported before anything heavy is imported
    import uvicorn

    from pagedserve.gateway.app import Gateway, build_gateway_app

    host, port = args.host or cfg.server.host, args.port or cfg.server.port
    gw = Gateway(cfg)
    app = build_gateway_app(gw)
    config = uvicorn.Config(app, host=host, port=port, log_level=args.uvicorn_log_level, access_log=False,
                            timeout_graceful_shutdown=30)
    server = uvicorn.Server(config)
    orig_startup = server.startup

    async def startup(sockets=None):
        await orig_startup(sockets)
        if server.started:
            log.info("gateway ready url=http://%s:%d models=%s pools=%s db=%s", host, port, ",".join(gw.routes),
                     ",".join(f"{p.name}({len(p.backends)})" for p in gw.pools.values()),
                     cfg.database.url.split("@")[-1])

    server.startup = startup
    signal.signal(signal.SIGTERM, lambda *_: None)  # see serve(): exit 0 after a graceful drain
    server.run()
    log.info("gateway stopped cleanly")
    return 0
