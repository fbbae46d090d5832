"""The Triton paged attention kernels on a GPU against the HBM roofline (issue 27): needs CUDA.

  decode   batch x context (default 64 x 2048, and 1 x 8192, 256 x 1024) on the Llama-3.1-8B
           attention shape (32 query heads, 8 KV heads, head_dim 128, 16-token blocks, blocks
           scattered at random), bf16 / int8 / fp8 caches: the K/V bytes one decode step reads
           (values + scales) / kernel time, against the device-to-device copy rate measured in the
           same run (a 2 GiB tensor copied: read + write bytes / time). Target: >= 80% at 64 x 2k.
  prefill  a 2048-token step of 4 chunks of 512 over 1536-token cached prefixes: TFLOP/s.
  The PyTorch backend's time on the same inputs beside each (the speedup the kernels buy).

    python benchmarks/gpu_attention.py [--reps 20]

Writes results/gpu_attention.json and .png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_common import finish, pyplot

OUT = Path(__file__).parent / "results" / "gpu_attention.json"
H, KVH, D, BS = 32, 8, 128, 16


def _time(fn, reps: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def copy_rate(reps: int) -> float:
    import torch

    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / _time(lambda: b.copy_(a), reps)


def _cache(kv_dtype, num_blocks):
    import torch

    from pagedserve.model.attention import ScaledKV, quantize_kv

    x = torch.randn((2, num_blocks, KVH, BS, D), device="cuda", dtype=torch.bfloat16)
    if kv_dtype in (torch.int8, torch.float8_e4m3fn):
        data, scales = quantize_kv(x, kv_dtype)
        return ScaledKV(data, scales)
    return x.to(kv_dtype)


def decode(batch: int, context: int, kv_dtype, reps: int) -> dict:
    import torch

    from pagedserve.model.attention import AttentionMetadata, ScaledKV, TorchPagedAttention
    from pagedserve.model.triton_attention import TritonPagedAttention

    per_seq = -(-context // BS)
    cache = _cache(kv_dtype, batch * per_seq + 1)
    tables = torch.randperm(batch * per_seq, device="cuda").view(batch, per_seq)
    lens = torch.full((batch,), context, dtype=torch.int64, device="cuda")
    q = torch.randn(batch, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, KVH, D, device="cuda", dtype=torch.bfloat16)
    last = tables[:, -1]
    meta = AttentionMetadata(last, lens - 1 - (per_seq - 1) * BS, batch, tables, lens, context, [], BS)
    tri = TritonPagedAttention()
    t_tri = _time(lambda: tri.decode(q, cache[0], cache[1], meta, D ** -0.5, torch.empty_like(q)), reps)
    t_torch = _time(lambda: TorchPagedAttention._decode(q, cache[0], cache[1], meta, D ** -0.5), max(3, reps // 4))
    ref = TorchPagedAttention._decode(q, cache[0], cache[1], meta, D ** -0.5)
    out = torch.empty_like(q)
    tri.decode(q, cache[0], cache[1], meta, D ** -0.5, out)
    err = (out.float() - ref.float()).abs().max().item()
    del k
    elem = torch.empty((), dtype=kv_dtype).element_size()
    nbytes = 2 * batch * context * KVH * (D * elem + (4 if isinstance(cache, ScaledKV) else 0))
    return {"batch": batch, "context": context, "kv_dtype": str(kv_dtype).removeprefix("torch."), "bytes": nbytes,
            "triton_s": t_tri, "torch_s": t_torch, "triton_gbs": nbytes / t_tri / 1e9, "max_abs_err": err}


def prefill(reps: int) -> dict:
    import torch

    from pagedserve.model.attention import AttentionMetadata, PrefillChunk, TorchPagedAttention
    from pagedserve.model.triton_attention import TritonPagedAttention

    chunks, n, prefix = 4, 512, 1536
    per_seq = (prefix + n) // BS
    cache = _cache(torch.bfloat16, chunks * per_seq + 1)
    tables = torch.randperm(chunks * per_seq, device="cuda").view(chunks, per_seq)
    t = chunks * n
    q = torch.randn(t, H, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(t, KVH, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    pos = torch.arange(prefix, prefix + n, device="cuda")
    blocks = torch.cat([tables[c][pos // BS] for c in range(chunks)])
    offsets = (pos % BS).repeat(chunks)
    meta = AttentionMetadata(blocks, offsets, 0, None, None, 0,
                             [PrefillChunk(c * n, n, prefix + n, tables[c]) for c in range(chunks)], BS)
    tri = TritonPagedAttention()
    t_tri = _time(lambda: tri.forward(q, k, v, cache, meta, D ** -0.5), reps)
    t_torch = _time(lambda: TorchPagedAttention().forward(q, k, v, cache, meta, D ** -0.5), max(3, reps // 4))
    # causal over the chunk, full over the prefix: 2 matmuls x 2 flops
    flops = chunks * H * 4 * D * (n * prefix + n * (n + 1) / 2)
    return {"tokens": t, "chunks": chunks, "prefix": prefix, "triton_s": t_tri, "torch_s": t_torch,
            "triton_tflops": flops / t_tri / 1e12}


def report(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"paged decode attention, {res['device']} (copy rate {res['copy_gbs']:.0f} GB/s), {res['date']}")
    for c in ("batch x context", "KV", "MB read", "triton us", "GB/s", "% of copy rate", "torch us", "speedup", "max err"):
        t.add_column(c, justify="right")
    for r in res["decode"]:
        t.add_row(f"{r['batch']} x {r['context']}", r["kv_dtype"], f"{r['bytes'] / 1e6:.0f}", f"{r['triton_s'] * 1e6:.0f}",
                  f"{r['triton_gbs']:.0f}", f"{100 * r['triton_gbs'] / res['copy_gbs']:.0f}%",
                  f"{r['torch_s'] * 1e6:.0f}", f"{r['torch_s'] / r['triton_s']:.1f}x", f"{r['max_abs_err']:.1e}")
    Console().print(t)
    p = res["prefill"]
    print(f"prefill: {p['chunks']} chunks of {p['tokens'] // p['chunks']} over {p['prefix']}-token prefixes: triton "
          f"{p['triton_s'] * 1e3:.2f} ms ({p['triton_tflops']:.0f} TFLOP/s), torch {p['torch_s'] * 1e3:.2f} ms")


def plot(res: dict):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['batch']}x{r['context']}\n{r['kv_dtype']}" for r in res["decode"]]
    ax.bar(labels, [100 * r["triton_gbs"] / res["copy_gbs"] for r in res["decode"]])
    ax.axhline(80, color="k", ls="--", label="target 80%")
    ax.set(ylabel="% of device copy rate", title=f"Triton paged decode, {res['device']}")
    ax.legend()
    return fig


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (the kernels' correctness runs in CI: tests/test_triton_attention.py)")
    res = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d %H:%M"),
           "copy_gbs": copy_rate(args.reps) / 1e9, "decode": []}
    for batch, context in ((64, 2048), (1, 8192), (256, 1024)):
        for kv in (torch.bfloat16, torch.int8, torch.float8_e4m3fn):
            res["decode"].append(decode(batch, context, kv, args.reps))
            print(json.dumps(res["decode"][-1]), flush=True)
    res["prefill"] = prefill(args.reps)
    finish(res, OUT, report, plot)


if __name__ == "__main__":
    main()
