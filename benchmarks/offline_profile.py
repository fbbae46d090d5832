"""Where offline time goes: `LLM.generate` on the first N workload requests under torch.profiler,
every C++ kernel labelled (step_overhead.instrument_cpp_kernels), self time per operator.

    python benchmarks/offline_profile.py [--num-requests 64] [--kv-cache-dtype auto|float16|bfloat16] \
        [--model default|float]    # default: the Q4_1 GGUF kept quantized; float: its float32 copy

Prefix caching is off (the random prompts share nothing; a second run would hit the cache).
Prints a table and writes results/offline_profile[_<kv dtype>].json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity, profile

from pagedserve import LLM, SamplingParams
from pagedserve.bench.workload import synthetic_workload
from pagedserve.model.loader import resolve_model
from step_overhead import instrument_cpp_kernels

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--model", choices=("default", "float"), default="default")
    args = ap.parse_args()
    model = None if args.model == "default" else str(resolve_model(None))
    llm = LLM(model, max_model_len=2048, kv_cache_memory=2 << 30, enable_prefix_caching=False,
              kv_cache_dtype=args.kv_cache_dtype)
    instrument_cpp_kernels(llm.engine.runner.model)
    reqs = synthetic_workload(seed=0)[: args.num_requests]
    params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in reqs]
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        outs = llm.generate([r.prompt_token_ids for r in reqs], params)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    ops = sorted(((e.key, e.self_cpu_time_total / 1e6) for e in prof.key_averages()), key=lambda kv: -kv[1])
    in_ops = sum(s for _, s in ops)
    table = Table(title=f"offline, {len(reqs)} requests, KV {args.kv_cache_dtype}: {tokens / wall:.1f} out tok/s, {wall:.1f} s")
    for col in ("operator", "self s", "% of wall"):
        table.add_column(col, justify="left" if col == "operator" else "right")
    for name, s in ops[: args.top]:
        table.add_row(name, f"{s:.2f}", f"{100 * s / wall:.1f}")
    table.add_row("(outside operators: Python, scheduling, profiler)", f"{wall - in_ops:.2f}", f"{100 * (wall - in_ops) / wall:.1f}")
    Console().print(table)
    suffix = ("" if args.kv_cache_dtype == "auto" else f"_{args.kv_cache_dtype}") + (
        "" if args.model == "default" else "_float")
    out = RESULTS / f"offline_profile{suffix}.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "requests": len(reqs),
                               "kv_cache_dtype": args.kv_cache_dtype, "model": args.model, "output_tokens": tokens, "wall_s": wall,
                               "output_tok_s": tokens / wall, "self_seconds": dict(ops[:40])}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
