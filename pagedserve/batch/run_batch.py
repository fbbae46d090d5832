"""`pagedserve run-batch -i IN.jsonl -o OUT.jsonl [engine flags]`: vLLM's run-batch.

Loads the model once and runs every line through the server's own app in-process (the engine at
offline speed, the responses byte for byte what `pagedserve serve` answers), or with `--url` sends
the lines to a running server or gateway instead. A bad input line becomes an error line in the
output (at its place), never a crash. `-i` and `-o` take a path, `-` (stdin / stdout) or an
http(s) URL (GET the input, PUT the output). Output lines follow the input's order.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time

import httpx

from pagedserve.batch import lines as L
from pagedserve.batch.runner import run_lines

log = logging.getLogger("pagedserve.batch")


def add_run_batch_args(p: argparse.ArgumentParser) -> None:
    from pagedserve.cli import add_serve_args

    p.add_argument("-i", "--input-file", required=True,
                   help="the requests, one JSON line each: a path, - for stdin, or an http(s) URL")
    p.add_argument("-o", "--output-file", required=True,
                   help="where the results go: a path, - for stdout, or an http(s) URL (PUT)")
    p.add_argument("--url", default=None,
                   help="send the lines to this running server or gateway (its root or /v1 URL) instead of "
                        "loading a model; --api-key is then the key sent")
    p.add_argument("--concurrency", type=int, default=512,
                   help="lines in flight at once (the engine schedules them; more than --max-num-seqs keeps "
                        "its batch full)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_serve_args(p)  # the engine's flags, as vLLM's run-batch takes them


def read_input(where: str) -> bytes:
    if where == "-":
        return sys.stdin.buffer.read()
    if where.startswith(("http://", "https://")):
        r = httpx.get(where, timeout=600, follow_redirects=True)
        r.raise_for_status()
        return r.content
    with open(where, "rb") as f:
        return f.read()


def write_output(where: str, text: str) -> None:
    if where == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    elif where.startswith(("http://", "https://")):
        httpx.put(where, content=text.encode(), timeout=600).raise_for_status()
    else:
        with open(where, "w", encoding="utf-8") as f:
            f.write(text)


class _Progress:
    """done/total, output tokens/s and ETA on stderr (rich), as lines finish."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.tokens, self.t0 = total, 0, 0, time.monotonic()
        self.bar = None
        if enabled and total:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("run-batch"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("lines", total=total, rate="")
            self.bar.start()

    def update(self, result: dict) -> None:
        self.done += 1
        body = (result.get("response") or {}).get("body")
        usage = body.get("usage") if isinstance(body, dict) else None
        if isinstance(usage, dict):
            self.tokens += int(usage.get("completion_tokens") or 0)
        if self.bar is not None:
            rate = self.tokens / max(1e-9, time.monotonic() - self.t0)
            self.bar.update(self.task, completed=self.done, rate=f"{rate:,.0f} out tok/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


async def execute_all(lines: list[L.BatchLine], executor, concurrency: int, progress: _Progress) -> dict[int, dict]:
    results: dict[int, dict] = {}

    def record(line, ok, result):
        results[line.index] = result
        progress.update(result)

    try:
        await run_lines(lines, executor.run, concurrency, record)
    finally:
        await executor.close()
        progress.close()
    return results


def run_batch(args: argparse.Namespace) -> int:
    if args.concurrency < 1:
        raise ValueError("--concurrency must be at least 1")
    data = read_input(args.input_file)
    todo, bad = L.parse(data, endpoint=None, models=None, max_lines=10**9, max_errors=10**9)
    if bad and bad[0].code in ("invalid_file", "empty_file"):
        raise ValueError(f"{args.input_file}: {bad[0].message}")
    # Output in input order: each request's result, and an error line where a line was bad.
    order = _input_order(data, todo, bad)
    progress = _Progress(len(todo), not args.no_progress)  # its clock starts once the model is loaded
    if args.url:
        from pagedserve.batch.executor import HTTPExecutor

        progress.t0 = time.monotonic()
        results = asyncio.run(execute_all(todo, HTTPExecutor(args.url, 0, args.api_key), args.concurrency, progress))
    else:
        results = _run_local(args, todo, progress)
    wall = time.monotonic() - progress.t0
    out = []
    for kind, item in order:
        out.append(json.dumps(results[item.index]) if kind == "ok" else
                   json.dumps(L.error_line(item.custom_id, item.code, item.message)))
    write_output(args.output_file, "".join(x + "\n" for x in out))
    failed = sum(1 for r in results.values() if not L.is_success(r)) + len(bad)
    log.info("run-batch: %d lines, %d failed, %d output tokens in %.1fs (%.1f out tok/s, model load excluded) -> %s",
             len(order), failed, progress.tokens, wall, progress.tokens / max(wall, 1e-9), args.output_file)
    return 0


def _run_local(args: argparse.Namespace, todo: list[L.BatchLine], progress: _Progress) -> dict[int, dict]:
    from pagedserve.batch.executor import AppExecutor
    from pagedserve.cli import build_server_app

    if getattr(args, "node_rank", 0):
        raise ValueError("run-batch runs on node 0 (--node-rank 0); the other nodes run `pagedserve serve "
                         "--node-rank K` for their ranks")
    async_engine, settings, app = build_server_app(args)
    settings.max_waiting_requests = max(settings.max_waiting_requests, args.concurrency)
    # As LLM does: the KV cache faulted in before the clock starts (first touches of 2 GiB of pages
    # cost ~5 s of page faults, a tenth of the default workload's run, if left to the steps).
    async_engine.engine.runner.wait_kv_populated()
    async_engine.start()

    async def main() -> dict[int, dict]:
        executor = AppExecutor(app, 0, args.api_key)
        await warm_up(executor, todo)
        progress.t0 = time.monotonic()
        return await execute_all(todo, executor, args.concurrency, progress)

    try:
        return asyncio.run(main())
    finally:
        async_engine.shutdown()


async def warm_up(executor, todo: list[L.BatchLine]) -> None:
    """One request per endpoint the lines use, of one token, before the clock starts: the app's
    first calls import and build what they need (anyio's asyncio backend, the routes' validators:
    ~1-2 s of one core, measured with py-spy) and would otherwise compete with the engine's threads
    for the cores in the first seconds of the run. Their results are not kept."""
    import anyio._backends._asyncio  # noqa: F401 - imported by the first disconnect check otherwise

    seen = set()
    for line in todo:
        if line.url in seen:
            continue
        seen.add(line.url)
        body = {**line.body, "max_tokens": 1}
        body.pop("max_completion_tokens", None)
        await executor.client.post(line.url, json=body)


def _input_order(data: bytes, todo: list[L.BatchLine], bad: list[L.LineError]) -> list[tuple[str, object]]:
    """(kind, item) per non-blank input line, in file order: ("ok", BatchLine) or ("bad", LineError)."""
    by_line = {e.line: e for e in bad}
    good = iter(todo)
    order = []
    for n, row in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not row.strip():
            continue
        order.append(("bad", by_line[n]) if n in by_line else ("ok", next(good)))
    return order
