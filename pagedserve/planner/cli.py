"""`pagedserve plan`: size hardware for a model and a workload, and show the math."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import yaml

from pagedserve.config import DEFAULT_MAX_NUM_BATCHED_TOKENS
from pagedserve.planner.plan import Plan, PlanInputs, Workload
from pagedserve.planner.specs import (HERE, custom_hardware, get_hardware, load_catalog, load_model_spec,
                                      measure_this_machine)


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="config.json, model folder, .gguf, hub id, or a known name (e.g. llama-3-8b)")
    p.add_argument("--gpu", default="H100-SXM", help="hardware from the catalog: " + ", ".join(load_catalog()))
    p.add_argument("--hw-custom", default=None, help="custom figures: memory_gb=.. (or memory_mib=.., as nvidia-smi reports it),bandwidth_gbs=..,bf16_tflops=..[,usd_per_hour=..]")
    p.add_argument("--measure", action="store_true", help="measure this machine's matmul rate and bandwidth and plan for it")
    p.add_argument("--dtype", default="bf16", help="weights: fp32, bf16, fp16, fp8, int8, awq, gptq")
    p.add_argument("--kv-cache-dtype", default=None, help="KV cache: same as weights (default), fp8, int8, bf16, fp32")
    p.add_argument("--max-model-len", type=int, default=8192, help="context length each sequence may reach (prompt + output)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of each GPU's memory for weights + KV cache, as the server's flag")
    p.add_argument("--tensor-parallel-size", "--tp", type=int, default=None, help="default: the smallest that fits")
    p.add_argument("--max-num-batched-tokens", type=int, default=DEFAULT_MAX_NUM_BATCHED_TOKENS["cuda"],
                   help="the engine's step token budget: prompts are prefilled together in steps of this many tokens")
    p.add_argument("--workload", choices=["chat", "batch"], default="chat", help="chat: latency-bound; batch: throughput-bound")
    p.add_argument("--daily-users", type=float, default=1000, help="people using it on a typical day")
    p.add_argument("--requests-per-user", type=float, default=10, help="requests each of them sends per day")
    p.add_argument("--input-tokens", type=int, default=500, help="prompt tokens per request, on average")
    p.add_argument("--output-tokens", type=int, default=200, help="generated tokens per request, on average")
    p.add_argument("--peak-factor", type=float, default=3.0, help="peak / average traffic")
    p.add_argument("--ttft-target", type=float, default=1.0, help="seconds")
    p.add_argument("--itl-target", type=float, default=0.05, help="seconds between tokens")
    p.add_argument("--gpu-hourly-price", type=float, default=None, help="override the catalog's $/hour per GPU")
    p.add_argument("--price-table", default=None, help="YAML of API prices per million tokens (default: built-in)")
    p.add_argument("--ops-fte", type=float, default=0.0, help="engineer time to run it, as a fraction of an FTE")
    p.add_argument("--fte-annual-usd", type=float, default=200_000, help="yearly cost of one engineer (for --ops-fte)")
    p.add_argument("--explain", action="store_true", help="print every formula with its numbers")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--plot", default=None, help="write a roofline PNG here")
    p.add_argument("--helm-values", default=None, help="write a Helm values file here")


def build_plan(args) -> Plan:
    model = load_model_spec(args.model)
    if args.measure:
        hw = measure_this_machine(model)
    elif args.hw_custom:
        hw = custom_hardware(args.hw_custom)
    else:
        hw = get_hardware(args.gpu)
    prices_path = Path(args.price_table) if args.price_table else HERE / "prices.yaml"
    if not prices_path.exists():
        raise ValueError(f"price table {prices_path} does not exist")
    prices = yaml.safe_load(prices_path.read_text()) or {}
    for name, p in prices.items():
        if not isinstance(p, dict) or not {"input", "output"} <= set(p):
            raise ValueError(f"price table entry {name!r} needs input and output ($ per million tokens)")
    w = Workload(kind=args.workload, daily_users=args.daily_users, requests_per_user=args.requests_per_user,
                 input_tokens=args.input_tokens, output_tokens=args.output_tokens, peak_factor=args.peak_factor,
                 ttft_target_s=args.ttft_target, itl_target_s=args.itl_target)
    inp = PlanInputs(model=model, hw=hw, weight_dtype=args.dtype, kv_dtype=args.kv_cache_dtype,
                     max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
                     tp=args.tensor_parallel_size, workload=w, gpu_hourly_price=args.gpu_hourly_price,
                     api_prices=prices, ops_fte=args.ops_fte, fte_annual_usd=args.fte_annual_usd,
                     max_num_batched_tokens=args.max_num_batched_tokens)
    return Plan(inp)


def print_report(plan: Plan, explain: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    m, mem, cap, cost, roof = plan.inp.model, plan.memory, plan.capacity, plan.cost, plan.roofline
    hw = plan.inp.hw
    t = Table(title=f"{m.name} on {hw.name} ({plan.inp.weight_dtype} weights, {plan.kv_dtype} KV)")
    t.add_column("")
    t.add_column("value")
    rows = [
        ("parameters (total / active per token)", f"{m.total_params / 1e9:.2f}B / {m.active_params / 1e9:.2f}B"),
        ("weights", f"{mem['weight_bytes'] / 1e9:.2f} GB"),
        ("KV per token / per 16-token block", f"{mem['kv_bytes_per_token'] / 1024:.1f} KiB / {mem['kv_bytes_per_block'] / 2**20:.2f} MiB"),
        ("fits", ("yes" if mem["fits"] else "NO") + f" (smallest tensor-parallel degree that fits: {mem['min_tp'] or 'none up to 8'})"),
        ("tensor-parallel degree used", str(mem["tp"])),
        ("KV budget", f"{mem['kv_budget_bytes'] / 1e9:.2f} GB"),
        ("max sequences at max_model_len / at workload length", f"{mem['max_seqs_at_max_model_len']} / {mem['max_seqs_at_avg_len']}"),
        ("hardware ops:byte", f"{roof['ops_per_byte']:.0f} FLOP/B"),
        ("decode turns compute-bound at batch", f"{roof['compute_bound_from_batch']:.0f}" if math.isfinite(roof["compute_bound_from_batch"]) else "never"),
        ("TTFT (prefill of the average prompt)", f"{roof['prefill_s'] * 1000:.0f} ms"),
    ]
    if cap.get("batch"):
        rows += [
            ("operating batch (max-num-seqs)", str(cap["batch"])),
            ("inter-token latency at that batch", f"{cap['itl_s'] * 1000:.1f} ms"),
            ("output tokens/s per replica", f"{cap['output_tok_s_per_replica']:.0f}"),
            ("peak requests/s -> replicas (GPUs)", f"{cap['peak_rps']:.2f} -> {cap['replicas']} ({cap['gpus']})"),
            ("self-hosted $/month (peak provisioned)", f"${cost['monthly_usd']:,.0f}"),
            ("$ per million tokens (actual traffic / at capacity, output)",
             f"${cost['usd_per_million_tokens']:.3f} / ${cost['usd_per_million_output_tokens_at_capacity']:.3f}"),
        ]
    if cap.get("reason"):
        rows.append(("NOT FEASIBLE", cap["reason"]))
    for r in rows:
        t.add_row(*r)
    c.print(t)
    r = Table(title="Decode vs batch (roofline prediction per replica)")
    for col in ("batch", "FLOP/byte", "bound", "step = inter-token latency (ms)", "tokens/s"):
        r.add_column(col)
    for p in roof["curve"]:
        r.add_row(str(p["batch"]), f"{p['intensity']:.1f}", p["bound"], f"{p['t_step'] * 1000:.1f}", f"{p['tokens_per_s']:.0f}")
    c.print(r)
    if cost["api"]:
        a = Table(title="Same traffic on API models")
        for col in ("API model", "$/month", "self-hosted $/month", "self-hosting no dearer at (daily users)"):
            a.add_column(col)
        for name, v in cost["api"].items():
            spans = [f"{lo:,.0f} up" if hi is None else f"{lo:,.0f}–{hi:,.0f}" for lo, hi in v["cheaper_daily_users"]]
            n = v["cheaper_intervals_total"]
            if n > 4:  # the first steps, then where it stays cheaper (--json lists more)
                spans = spans[:3] + [f"… {n - 4} more …", spans[-1]]
            a.add_row(name, f"${v['monthly_usd']:,.0f}", f"${cost['monthly_usd']:,.0f}", ", ".join(spans) or "never")
        c.print(a)
    c.print("Recommended flags: " + " ".join(f"{k} {v}" for k, v in plan.flags.items()))
    for why in plan.not_servable:
        c.print(f"[yellow]Not servable by pagedserve yet:[/yellow] {why}")
    if explain:
        e = Table(title="How it was computed")
        e.add_column("step")
        e.add_column("formula")
        for s, f in plan.explain:
            e.add_row(s, f)
        c.print(e)


def plot_roofline(plan: Plan, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = plan.roofline["curve"]
    bs = [p["batch"] for p in curve]
    hw, inp, m = plan.inp.hw, plan.inp, plan.inp.model
    tp = plan.memory["tp"]
    peak = hw.peak_flops(inp.weight_dtype) * hw.compute_efficiency * tp
    bw = hw.bandwidth_gbs * 1e9 * hw.bandwidth_efficiency * tp
    mem_line = [b / (plan._weights_read(b) / bw) for b in bs]
    comp_line = [peak / (2 * m.active_params) for _ in bs]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.loglog(bs, [p["tokens_per_s"] for p in curve], "o-", label="predicted decode tokens/s")
    ax.loglog(bs, mem_line, "--", label="memory-bound (weights only)")
    ax.loglog(bs, comp_line, ":", label="compute-bound")
    if plan.capacity.get("batch"):
        b = plan.capacity["batch"]
        ax.plot([b], [plan.step_time(b)["tokens_per_s"]], "r*", markersize=14, label=f"operating point (B={b})")
    ax.set(xlabel="decode batch", ylabel="tokens/s per replica", title=f"{m.name} on {hw.name} ({inp.weight_dtype})")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_plan(args) -> int:
    plan = build_plan(args)
    if args.json:
        print(json.dumps(plan.to_json(), indent=2, allow_nan=False, default=str))
    else:
        print_report(plan, args.explain)
    if args.plot:
        plot_roofline(plan, args.plot)
    if args.helm_values:
        Path(args.helm_values).write_text(yaml.safe_dump(plan.helm_values(args.model), sort_keys=False))
    return 0 if plan.memory["fits"] else 3
