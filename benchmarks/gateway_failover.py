"""Gateway under a replica's death: three replicas of the default model behind `pagedserve
gateway`, mixed streaming and non-streaming requests with hostile strings among them, and one
replica killed with SIGKILL while they run. On SQLite and on PostgreSQL (the audit log), in one run.

Reports per database: failed requests (a transport error, a 5xx, or a stream that ended with an
error event), streams continued on another replica, the longest pause a continued stream's client
saw between two events (the failure, then the continuation's prefill) against the same for
untouched streams, their duration against the untouched median (every request asks for the same
number of tokens; on two shared cores queueing dominates that), audit rows against requests
answered, and how long a row takes to be visible after its request ended (p50/p99).

    python benchmarks/gateway_failover.py [--requests 120] [--concurrency 12] [--kill-after 30]
        [--db sqlite postgresql] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def request_body(i: int, max_tokens: int) -> tuple[str, dict, str]:
    """(endpoint, body, marker): every 10th names a model that does not exist, with NUL and a lone
    surrogate in the name (404, still one audit row); every 7th has them in its prompt."""
    marker = f"req-{i:04d}"
    stream = i % 2 == 0
    if i % 10 == 9:
        return "completions", {"model": f"{marker}-\u0000\ud800" + "x" * 500, "prompt": "p", "max_tokens": 1}, marker
    text = f"{marker}: tell me about lighthouses" + (" \u0000 \ud800 '); DROP TABLE x; --" if i % 7 == 3 else "")
    common = {"model": "smol", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
    if stream:
        common["stream_options"] = {"include_usage": True}
    if i % 3 == 0:
        return "chat/completions", {**common, "messages": [{"role": "user", "content": text}]}, marker
    return "completions", {**common, "prompt": text}, marker


async def one(client: httpx.AsyncClient, base: str, key: str, i: int, max_tokens: int) -> dict:
    endpoint, body, marker = request_body(i, max_tokens)
    # json.dumps keeps the lone surrogate as an escape; httpx's json= would refuse to encode it.
    data = json.dumps(body).encode()
    h = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
    res = {"i": i, "marker": marker, "stream": body.get("stream", False), "t0": time.monotonic(), "ok": False}
    try:
        if body.get("stream"):
            lines, times = [], []
            async with client.stream("POST", f"{base}/{endpoint}", content=data, headers=h) as r:
                res["status"] = r.status_code
                async for ln in r.aiter_lines():
                    if ln.startswith("data:"):
                        lines.append(ln)
                        times.append(time.monotonic())
            res["max_gap"] = max((b - a for a, b in zip(times, times[1:])), default=0.0)
            err = any('"error"' in ln for ln in lines)
            done = bool(lines) and lines[-1] == "data: [DONE]"
            usage = [json.loads(ln[5:])["usage"] for ln in lines[:-1] if '"usage"' in ln and '"usage": null' not in ln
                     and '"usage":null' not in ln]
            res["tokens"] = usage[-1]["completion_tokens"] if usage else 0
            res["ok"] = r.status_code < 500 and (r.status_code != 200 or (done and not err and res["tokens"] == max_tokens))
        else:
            r = await client.post(f"{base}/{endpoint}", content=data, headers=h)
            res["status"] = r.status_code
            res["ok"] = r.status_code < 500 and (r.status_code != 200 or
                                                 r.json()["usage"]["completion_tokens"] == max_tokens)
    except httpx.HTTPError as e:
        res["error"] = f"{type(e).__name__}: {e}"
    res["t1"] = time.monotonic()
    return res


def start(cmd: list[str], log: Path, env: dict | None = None):
    from server_utils import ServerProcess

    return ServerProcess(cmd[1:], log, env=env, ready_timeout=300, command=cmd[0])


def watch_rows(db_url: str, seen: dict, stop: threading.Event) -> None:
    """Poll the audit table; first time each request's row (found by its marker) is visible."""
    from sqlalchemy import select

    from pagedserve.gateway.store import audit_log, open_db

    db, last = open_db(db_url), 0
    while not stop.is_set():
        with db.connect() as conn:
            got = conn.execute(select(audit_log.c.id, audit_log.c.model, audit_log.c.prompt)
                               .where(audit_log.c.id > last)).all()
        now = time.monotonic()
        for rid, model, prompt in got:
            last = max(last, rid)
            for text in (prompt or "", model or ""):
                at = text.find("req-")
                if at != -1:
                    seen.setdefault(text[at:at + 8], now)
                    break
        time.sleep(0.05)
    db.dispose()


async def drive(base: str, key: str, n: int, concurrency: int, max_tokens: int, kill_after: int, reps) -> tuple:
    sem = asyncio.Semaphore(concurrency)
    done = 0
    killed: dict = {}

    async def run(client, i):
        nonlocal done
        async with sem:
            res = await one(client, base, key, i, max_tokens)
        done += 1
        if done == kill_after and not killed:
            # the replica with the most requests in flight: streams are mid-way on it
            busy = max((r for r in reps if r.proc.poll() is None),
                       key=lambda r: r.metric("vllm:num_requests_running"))
            busy.proc.kill()
            killed["name"], killed["t"] = reps.index(busy), time.monotonic()
            say(f"killed replica r{killed['name']} (SIGKILL) after {done} requests")
        return res

    async with httpx.AsyncClient(timeout=300) as client:
        results = await asyncio.gather(*(run(client, i) for i in range(n)))
    return results, killed


def one_database(kind: str, args, tmp: Path, model_dir: str) -> dict:
    from pg_utils import PostgresServer
    from test_gateway import create_key

    pg = PostgresServer() if kind == "postgresql" else None
    db = pg.url if pg else f"sqlite:///{tmp / f'audit-{kind}.db'}"
    say(f"[{kind}] starting 3 replicas of the default model and the gateway")
    rep_args = [model_dir, "--served-model-name", "smol", "--kv-cache-memory", "512MiB", "--max-model-len", "2048"]
    reps = [start(["serve", *rep_args], tmp / f"{kind}-r{i}.log") for i in range(3)]
    cfg = {"database": {"url": db, "flush_interval_s": 0.1, "log_prompts": True}, "auth": {"refresh_s": 0.3},
           "health": {"interval_s": 0.5, "timeout_s": 1},
           "backends": [{"name": f"r{i}", "url": r.base} for i, r in enumerate(reps)],
           "pools": [{"name": "p", "backends": ["r0", "r1", "r2"], "policy": "least_outstanding", "model": "smol",
                      "failure_threshold": 1}],
           "models": [{"name": "smol", "pool": "p"}]}
    (tmp / f"gw-{kind}.yaml").write_text(yaml.safe_dump(cfg))
    gw = start(["gateway", "--config", str(tmp / f"gw-{kind}.yaml")], tmp / f"{kind}-gw.log")
    _, key = create_key(db, "bench")
    time.sleep(1.0)  # the gateway re-reads keys every 0.3 s
    seen: dict = {}
    stop = threading.Event()
    watcher = threading.Thread(target=watch_rows, args=(db, seen, stop), daemon=True)
    watcher.start()
    say(f"[{kind}] {args.requests} requests at concurrency {args.concurrency}, a replica killed after "
        f"{args.kill_after}")
    t0 = time.monotonic()
    results, killed = asyncio.run(drive(gw.base, key, args.requests, args.concurrency, args.max_tokens,
                                        args.kill_after, reps))
    wall = time.monotonic() - t0
    deadline = time.monotonic() + 30
    while len(seen) < len(results) and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    watcher.join()
    from sqlalchemy import func, select

    from pagedserve.gateway.store import audit_log, open_db

    engine = open_db(db)
    with engine.connect() as conn:
        n_rows = conn.execute(select(func.count()).select_from(audit_log)).scalar()
        continued = {}
        for b, p in conn.execute(select(audit_log.c.backend, audit_log.c.prompt)):
            at = (p or "").find("req-")
            if b and ">" in b and at != -1:
                continued[p[at:at + 8]] = b
    engine.dispose()
    gw.stop()
    for r in reps:
        r.stop()
    if pg:
        pg.stop()
    streams = [r for r in results if r["stream"] and r.get("status") == 200]
    cont = [r for r in streams if r["marker"] in continued]
    plain = [r["t1"] - r["t0"] for r in streams if r["marker"] not in continued]
    base_s = statistics.median(plain) if plain else float("nan")
    added = [r["t1"] - r["t0"] - base_s for r in cont]
    # What the client of a continued stream waits for: its longest pause between two events (the
    # failure, then the continuation's prefill on a loaded replica), against untouched streams'.
    gaps_untouched = [r["max_gap"] for r in streams if r["marker"] not in continued]
    stalls = [r["max_gap"] for r in cont]
    visible = sorted(seen[r["marker"]] - r["t1"] for r in results if r["marker"] in seen)
    answered = sum("status" in r for r in results)
    return {
        "db": kind, "requests": len(results), "wall_s": wall, "killed": f"r{killed.get('name')}",
        "failed": sum(not r["ok"] for r in results),
        "failures": [{k: r.get(k) for k in ("i", "status", "error", "tokens")} for r in results if not r["ok"]],
        "answered": answered, "audit_rows": n_rows,
        "streams": len(streams), "streams_continued": len(cont), "stream_s_p50_untouched": base_s,
        "continuation_added_s": added, "continuation_added_max_s": max(added, default=0.0),
        "max_gap_p50_untouched_s": statistics.median(gaps_untouched) if gaps_untouched else None,
        "continuation_stall_s": stalls, "continuation_stall_max_s": max(stalls, default=0.0),
        "row_visible_p50_s": statistics.median(visible) if visible else None,
        "row_visible_p99_s": visible[min(len(visible) - 1, int(0.99 * len(visible)))] if visible else None,
        "rows_seen": len(visible),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--concurrency", type=int, default=12)
    ap.add_argument("--kill-after", type=int, default=30, help="kill a replica when this many requests have ended")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--db", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    ap.add_argument("--from-json", action="store_true", help="print and plot the last saved results again")
    args = ap.parse_args()
    from pagedserve.model.loader import resolve_model

    RESULTS.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="gw-failover-"))
    model_dir = None if args.from_json else str(resolve_model(None))
    load = os.getloadavg()
    if args.from_json:
        out = json.loads((RESULTS / "gateway_failover.json").read_text())
        runs = out["runs"]
    else:
        runs = [one_database(kind, args, tmp, model_dir) for kind in args.db]
        out = {"args": vars(args), "load_avg_1m": load[0], "cpus": os.cpu_count(), "runs": runs,
               "when": time.strftime("%Y-%m-%d %H:%M")}
        (RESULTS / "gateway_failover.json").write_text(json.dumps(out, indent=1))
    print()
    print(f"{'db':<11} {'failed':>6} {'answered':>8} {'rows':>5} {'streams':>7} {'continued':>9} "
          f"{'stall s':>13} {'gap p50 s':>9} {'row p50 s':>9} {'row p99 s':>9}")
    for r in runs:
        stalls = "/".join(f"{x:.1f}" for x in r["continuation_stall_s"]) or "-"
        print(f"{r['db']:<11} {r['failed']:>6} {r['answered']:>8} {r['audit_rows']:>5} {r['streams']:>7} "
              f"{r['streams_continued']:>9} {stalls:>13} {r['max_gap_p50_untouched_s'] or 0:>9.2f} "
              f"{r['row_visible_p50_s']:>9.2f} {r['row_visible_p99_s']:>9.2f}")
    print("stall: each continued stream's longest pause between two events (the failure, then the continuation's "
          "prefill); gap p50: the same for the streams the kill did not touch (their longest pause, median)")
    print(f"load average at start: {out['load_avg_1m']:.2f}; {out['cpus']} CPUs")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k, r in enumerate(runs):
        st = r["continuation_stall_s"]
        axes[0].bar(k * 3, r["max_gap_p50_untouched_s"] or 0, color="tab:blue", label="untouched (median)" if k == 0 else None)
        axes[0].scatter([k * 3 + 1] * len(st), st, color="tab:orange", zorder=3,
                        label="continued streams" if k == 0 else None)
        axes[1].bar([k * 3, k * 3 + 1], [r["row_visible_p50_s"], r["row_visible_p99_s"]], color=["tab:green", "tab:red"])
    axes[0].set_xticks([k * 3 + 0.5 for k in range(len(runs))], [r["db"] for r in runs])
    axes[0].set_title("longest pause between two stream events (s)", fontsize=10)
    axes[0].legend(fontsize=8)
    axes[1].set_xticks([k * 3 + j for k in range(len(runs)) for j in (0, 1)],
                       [f"{r['db']}\n{lab}" for r in runs for lab in ("p50", "p99")])
    axes[1].set_title("audit row visible after request end (s)", fontsize=10)
    a = out["args"]
    fig.suptitle(f"gateway failover: {a['requests']} requests at c={a['concurrency']}, a replica killed "
                 f"(failed: {', '.join(str(r['failed']) for r in runs)}; rows = answered: "
                 f"{', '.join(str(r['audit_rows'] == r['answered']) for r in runs)})", fontsize=11)
    fig.tight_layout()
    fig.savefig(RESULTS / "gateway_failover.png", dpi=110)
    say(f"wrote {RESULTS / 'gateway_failover.json'} and .png")


if __name__ == "__main__":
    main()
