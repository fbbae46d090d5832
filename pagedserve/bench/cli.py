"""`pagedserve bench`: stream the seeded synthetic workload to any OpenAI-compatible server.

At fixed concurrency levels (--concurrency 1 16 64) or a Poisson request rate (--request-rate),
it measures output tokens/s, requests/s, TTFT, inter-token and end-to-end latency (p50/p90/p99)
and errors; prints a table, writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from pagedserve.bench.workload import BenchRequest, synthetic_workload


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's OpenAI base URL")
    p.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY' (default: none)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64], help="concurrency levels to run")
    p.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second instead of fixed concurrency")
    p.add_argument("--num-requests", type=int, default=128, help="requests per concurrency level (or rate run)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=[32, 512], metavar=("MIN", "MAX"),
                   help="prompt lengths in tokens, drawn uniformly between MIN and MAX")
    p.add_argument("--output-len", type=int, nargs=2, default=[32, 256], metavar=("MIN", "MAX"),
                   help="output lengths in tokens (max_tokens with ignore_eos), drawn uniformly")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic workload: same seed, same requests")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--label", default="server", help="name of this server in the results")
    p.add_argument("--out", default="bench-results.json", help="JSON results; the plot goes next to it (.png)")


@dataclass
class RequestResult:
    ok: bool
    output_tokens: int = 0
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    e2e: float = 0.0
    error: str | None = None


async def one_request(client, url, model, req: BenchRequest, timeout) -> RequestResult:
    body = {"model": model, "prompt": req.prompt_token_ids, "max_tokens": req.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    res = RequestResult(ok=False)
    last = None
    chunks = 0
    try:
        async with client.stream("POST", url, json=body, timeout=timeout) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    res.error = str(msg["error"])[:200]
                    return res
                if msg.get("usage"):
                    res.output_tokens = msg["usage"].get("completion_tokens", 0)
                if msg.get("choices") and msg["choices"][0].get("text"):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itls.append(now - last)
                    last = now
                    chunks += 1
        res.output_tokens = res.output_tokens or chunks
        res.ok = True
    except Exception as e:  # connection refused, timeout, broken stream
        res.error = f"{type(e).__name__}: {e}"[:200]
    finally:
        res.e2e = time.perf_counter() - t0
    return res


def pct(xs, q):
    import numpy as np

    return float(np.percentile(xs, q)) if len(xs) else None


async def run_level(client, url, model, reqs, concurrency, rate, timeout, seed, desc):
    from tqdm import tqdm

    bar = tqdm(total=len(reqs), desc=desc, unit="req")
    sem = asyncio.Semaphore(concurrency or len(reqs))
    rng = random.Random(seed)

    async def guarded(r):
        async with sem:
            out = await one_request(client, url, model, r, timeout)
            bar.update(1)
            return out

    t0 = time.perf_counter()
    tasks = []
    for r in reqs:
        tasks.append(asyncio.ensure_future(guarded(r)))
        if rate:
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    dur = time.perf_counter() - t0
    bar.close()
    ok = [r for r in results if r.ok]
    itls = [x for r in ok for x in r.itls]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    e2es = [r.e2e for r in ok]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "concurrency": concurrency, "request_rate": rate, "requests": len(reqs), "ok": len(ok),
        "errors": len(results) - len(ok), "error_samples": [r.error for r in results if not r.ok][:3],
        "duration_s": dur, "output_tokens": out_tokens, "output_tok_s": out_tokens / dur, "req_s": len(ok) / dur,
        **{f"ttft_p{q}": pct(ttfts, q) for q in (50, 90, 99)},
        **{f"itl_p{q}": pct(itls, q) for q in (50, 90, 99)},
        **{f"e2e_p{q}": pct(e2es, q) for q in (50, 90, 99)},
    }


async def bench(args) -> list[dict]:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=args.timeout) as client:
        base = args.base_url.rstrip("/")
        model = args.model
        if model is None:
            r = await client.get(f"{base}/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        url = f"{base}/completions"
        levels = [None] if args.request_rate else args.concurrency
        out = []
        for i, c in enumerate(levels):
            # Each level gets its own prompts (seed + level index): reusing them would let the
            # server's prefix cache skip prefills the earlier levels already ran.
            seed = args.seed + i
            reqs = synthetic_workload(args.num_requests, tuple(args.prompt_len), tuple(args.output_len), seed=seed)
            desc = f"{args.label} rate={args.request_rate}/s" if c is None else f"{args.label} c={c}"
            level = await run_level(client, url, model, reqs, c, args.request_rate, args.timeout, seed, desc)
            level["seed"] = seed
            out.append(level)
        return out


def print_table(label: str, levels: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"pagedserve bench: {label}")
    cols = ["load", "out tok/s", "req/s", "TTFT p50/p90/p99 (ms)", "ITL p50/p90/p99 (ms)", "E2E p50/p99 (s)", "errors"]
    for c in cols:
        t.add_column(c)

    def ms(*xs):
        return "/".join("-" if x is None else f"{x * 1000:.0f}" for x in xs)

    for lv in levels:
        load = f"c={lv['concurrency']}" if lv["concurrency"] else f"{lv['request_rate']}/s"
        t.add_row(load, f"{lv['output_tok_s']:.1f}", f"{lv['req_s']:.2f}",
                  ms(lv["ttft_p50"], lv["ttft_p90"], lv["ttft_p99"]), ms(lv["itl_p50"], lv["itl_p90"], lv["itl_p99"]),
                  "/".join("-" if x is None else f"{x:.1f}" for x in (lv["e2e_p50"], lv["e2e_p99"])), str(lv["errors"]))
    Console().print(t)


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for label, levels in results.items():
        xs = [lv["concurrency"] or lv["request_rate"] for lv in levels]
        a.plot(xs, [lv["output_tok_s"] for lv in levels], marker="o", label=label)
        b.plot(xs, [(lv["ttft_p50"] or 0) * 1000 for lv in levels], marker="o", label=label)
    a.set(xlabel="concurrency", ylabel="output tokens/s", title="Throughput")
    b.set(xlabel="concurrency", ylabel="TTFT p50 (ms)", title="Time to first token")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_bench(args) -> int:
    levels = asyncio.run(bench(args))
    print_table(args.label, levels)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"label": args.label, "base_url": args.base_url, "date": time.strftime("%Y-%m-%d %H:%M"),
               "workload": {"num_requests": args.num_requests, "prompt_len": args.prompt_len,
                            "output_len": args.output_len, "seed": args.seed},
               "levels": levels}
    out.write_text(json.dumps(payload, indent=2))
    plot({args.label: levels}, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 1 if any(lv["errors"] for lv in levels) else 0


__all__ = ["add_bench_args", "run_bench", "bench", "RequestResult"]
