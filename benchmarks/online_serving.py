"""Online serving: start `pagedserve serve` (default model), time process start -> 200 on /health
(warm cache), then run `pagedserve bench` at concurrency 1, 16 and 64 with the seeded workload
(128 requests, prompts 32-512, outputs 32-256, ignore_eos). Prints tables, writes JSON + PNG.

    python benchmarks/online_serving.py [--num-requests 128] [--concurrency 1 16 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))


def start_server(port: int, extra: list[str], log_path: Path) -> tuple[subprocess.Popen, float]:
    from server_utils import wait_ready

    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pagedserve.cli", "serve", "--port", str(port), *extra],
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    wait_ready(proc, f"http://127.0.0.1:{port}", log_path, timeout=300, poll=0.05)
    return proc, time.monotonic() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=128)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--startup-runs", type=int, default=3)
    ap.add_argument("--requests-at-1", type=int, default=16, help="requests for the concurrency-1 level (it is slow)")
    args = ap.parse_args()
    from server_utils import free_port

    from pagedserve.bench import cli as bench

    RESULTS.mkdir(exist_ok=True)
    port = free_port()
    server_args = ["--kv-cache-memory", "4GiB", "--max-model-len", "4096"]
    startups = []
    for _ in range(args.startup_runs):  # warm cache: the model was converted and the kernel built at setup
        proc, dt = start_server(port, server_args, RESULTS / "online_server.log")
        startups.append(dt)
        proc.terminate()
        proc.wait(30)
    print(f"process start -> 200 on /health: {', '.join(f'{s:.2f}s' for s in startups)} (min {min(startups):.2f}s)")
    proc, _ = start_server(port, server_args, RESULTS / "online_server.log")
    try:
        ns = argparse.Namespace(base_url=f"http://127.0.0.1:{port}/v1", model=None, api_key=None,
                                concurrency=args.concurrency, request_rate=None, num_requests=args.num_requests,
                                prompt_len=[32, 512], output_len=[32, 256], seed=0, timeout=1800.0,
                                label="pagedserve", out=str(RESULTS / "online_serving.json"))
        import asyncio

        levels = []
        for i, c in enumerate(args.concurrency):
            ns.concurrency = [c]
            ns.seed = 100 + i  # fresh prompts per level: no prefix-cache hits from earlier levels
            ns.num_requests = args.requests_at_1 if c == 1 else args.num_requests
            levels += asyncio.run(bench.bench(ns))
    finally:
        proc.terminate()
        rc = proc.wait(60)
    bench.print_table("pagedserve (SmolLM2-135M fp32, CPU)", levels)
    out = RESULTS / "online_serving.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "startup_s": startups,
                               "server_args": server_args, "levels": levels, "server_exit_code": rc}, indent=2))
    bench.plot({"pagedserve": levels}, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
