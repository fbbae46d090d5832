"""Gateway overhead: one pagedserve replica (default model) called directly and through
`pagedserve gateway`, in one run, on the same machine.

1. Idle-path latency: N interleaved pairs of tiny streaming requests (max_tokens 1), direct then
   via the gateway; reports TTFT p50 of each and the p50 of the paired difference.
2. Load: the seeded workload (128 requests, prompts 32-512, outputs 32-256, ignore_eos) at 64
   concurrent streams, direct and via the gateway (same prompts; prefix caching off so neither run
   warms the other), alternating for --rounds rounds; reports output
   tokens/s, the throughput ratio and TTFT p50/p99.

    python benchmarks/gateway_overhead.py [--rounds 1] [--pairs 200] [--num-requests 128]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    from server_utils import wait_ready

    proc = subprocess.Popen([sys.executable, "-m", "pagedserve.cli", *cmd, "--port", str(port)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    wait_ready(proc, f"http://127.0.0.1:{port}", log, timeout=300)
    return proc


async def ttft(client: httpx.AsyncClient, base: str, model: str, i: int) -> float:
    body = {"model": model, "prompt": f"Request number {i}: say hello", "max_tokens": 1, "temperature": 0,
            "stream": True}
    t0 = time.perf_counter()
    async with client.stream("POST", f"{base}/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data:") and '"text"' in line:
                return time.perf_counter() - t0
    raise RuntimeError("no token")


async def idle_pairs(direct: str, via: str, model: str, n: int) -> dict:
    d, g = [], []
    async with httpx.AsyncClient(timeout=60) as client:
        for i in range(5):  # warm both paths (connections, first-request costs)
            await ttft(client, direct, model, -i)
            await ttft(client, via, model, -i)
        for i in range(n):
            d.append(await ttft(client, direct, model, i))
            g.append(await ttft(client, via, model, i))
    diffs = [b - a for a, b in zip(d, g)]
    return {"pairs": n, "direct_ttft_p50_ms": statistics.median(d) * 1e3, "gateway_ttft_p50_ms": statistics.median(g) * 1e3,
            "added_p50_ms": statistics.median(diffs) * 1e3}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--num-requests", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()
    from server_utils import free_port

    from pagedserve.bench import cli as bench

    RESULTS.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    rport, gport = free_port(), free_port()
    replica = start(["serve", "--served-model-name", "smol", "--kv-cache-memory", "4GiB", "--max-model-len", "4096",
                     "--no-enable-prefix-caching"],  # both runs send the same prompts: no carry-over
                     rport, RESULTS / "gateway_overhead_replica.log")
    cfg = {"database": {"url": f"sqlite:///{tmp / 'audit.db'}"}, "auth": {"require_key": False},
           "backends": [{"name": "replica", "url": f"http://127.0.0.1:{rport}/v1"}],
           "pools": [{"name": "local", "backends": ["replica"], "policy": "least_outstanding", "model": "smol"}],
           "models": [{"name": "smol", "pool": "local"}]}
    (tmp / "gateway.yaml").write_text(yaml.safe_dump(cfg))
    gateway = start(["gateway", "--config", str(tmp / "gateway.yaml")], gport, RESULTS / "gateway_overhead_gateway.log")
    direct, via = f"http://127.0.0.1:{rport}/v1", f"http://127.0.0.1:{gport}/v1"
    runs = []
    try:
        idle = asyncio.run(idle_pairs(direct, via, "smol", args.pairs))
        print(f"idle path, {args.pairs} interleaved pairs: TTFT p50 direct {idle['direct_ttft_p50_ms']:.2f} ms, "
              f"via gateway {idle['gateway_ttft_p50_ms']:.2f} ms, added p50 {idle['added_p50_ms']:.2f} ms")
        for r in range(args.rounds):
            for label, base in (("direct", direct), ("gateway", via)):
                ns = argparse.Namespace(base_url=base, model="smol", api_key=None, concurrency=[args.concurrency],
                                        request_rate=None, num_requests=args.num_requests, prompt_len=[32, 512],
                                        output_len=[32, 256], seed=1000,
                                        timeout=1800.0, label=label, out=str(tmp / "x.json"))
                level = asyncio.run(bench.bench(ns))[0]
                level["label"], level["round"] = label, r
                runs.append(level)
    finally:
        gateway.terminate()
        replica.terminate()
        gateway.wait(60)
        replica.wait(60)
    for x in runs:
        print(f"round {x['round']} {x['label']:8s} out tok/s {x['output_tok_s']:6.1f}  TTFT p50/p99 "
              f"{x['ttft_p50']*1e3:7.0f}/{x['ttft_p99']*1e3:7.0f} ms  ITL p50 {x['itl_p50']*1e3:5.1f} ms  errors {x['errors']}")
    tput = {lab: statistics.mean(x["output_tok_s"] for x in runs if x["label"] == lab) for lab in ("direct", "gateway")}
    ttft50 = {lab: statistics.mean(x["ttft_p50"] for x in runs if x["label"] == lab) for lab in ("direct", "gateway")}
    errors = sum(x["errors"] for x in runs)
    ratio = tput["gateway"] / tput["direct"]
    print(f"throughput via gateway / direct: {ratio:.3f} (target >= 0.95); TTFT p50 under load direct "
          f"{ttft50['direct']*1e3:.0f} ms, gateway {ttft50['gateway']*1e3:.0f} ms; errors {errors}")
    out = RESULTS / "gateway_overhead.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "idle": idle, "load_runs": runs,
                               "throughput_ratio": ratio, "ttft_p50_under_load_s": ttft50, "errors": errors},
                              indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.bar(["direct", "gateway"], [tput["direct"], tput["gateway"]], color=["#4c72b0", "#dd8452"])
    a.set_ylabel("output tokens/s")
    a.set_title(f"c={args.concurrency}: gateway/direct = {ratio:.3f}")
    b.bar(["direct", "gateway"], [idle["direct_ttft_p50_ms"], idle["gateway_ttft_p50_ms"]], color=["#4c72b0", "#dd8452"])
    b.set_ylabel("TTFT p50 (ms), idle, max_tokens=1")
    b.set_title(f"added p50 {idle['added_p50_ms']:.2f} ms")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
