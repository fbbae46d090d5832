"""A Mixture-of-Experts MLP against a dense MLP with the same *active* parameters (issue 28):
time per call at a batch of tokens, on this CPU's kernels (packed GEMMs, float32 and, where the CPU
has AVX512_BF16, bf16), random weights.

  mixtral-like  hidden 1024, 8 experts of 1408, top-2  (active MLP width 2816)  vs dense 2816
  olmoe-like    hidden 1024, 64 experts of 256, top-8  (active width 2048)      vs dense 2048
Target: the MoE layer at batch 64 within 1.5x of the dense one. The MoE time includes routing
(router GEMM, softmax, top-k, sort) and the combine.

    python benchmarks/moe_layer.py [--batches 1,16,64,256] [--reps 30]

Writes results/moe_layer.json and .png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from bench_common import finish, machine, pyplot

OUT = Path(__file__).parent / "results" / "moe_layer.json"
SHAPES = {"mixtral-like": (1024, 8, 1408, 2), "olmoe-like": (1024, 64, 256, 8)}


def _layers(hidden, experts, width, top_k, dtype):
    import torch

    from pagedserve.model import cpu_kernels
    from pagedserve.model.arch import ModelArch, MoEFields
    from pagedserve.model.llama import MLP, use_cpu_kernels
    from pagedserve.model.moe import SparseMoE

    arch = ModelArch("MixtralForCausalLM", 100, hidden, width * top_k, 1, 8, 8, hidden // 8, 1e-6, 1e4, None, 64,
                     False, False, None, None, [], moe=MoEFields(experts, top_k, width, 0, True), moe_layers=(0,))
    torch.manual_seed(0)
    moe, dense = SparseMoE(arch).eval(), MLP(arch).eval()
    for p in list(moe.parameters()) + list(dense.parameters()):
        p.data.normal_(0, 0.02)
    kernels = cpu_kernels.load()
    if kernels is not None:
        use_cpu_kernels(moe, kernels, weight_dtype=dtype)
        use_cpu_kernels(dense, kernels, weight_dtype=dtype)
    return moe, dense


def _median_time(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(batches, reps) -> dict:
    import torch

    from pagedserve.model import cpu_kernels

    dtypes = [torch.float32] + ([torch.bfloat16] if cpu_kernels.bf16_gemm() is not None else [])
    rows = []
    with torch.inference_mode():
        for name, (hidden, experts, width, top_k) in SHAPES.items():
            for dtype in dtypes:
                moe, dense = _layers(hidden, experts, width, top_k, dtype)
                for b in batches:
                    x = torch.randn(b, hidden)
                    t_moe, t_dense = _median_time(lambda: moe(x), reps), _median_time(lambda: dense(x), reps)
                    rows.append({"shape": name, "weights": str(dtype).removeprefix("torch."), "batch": b,
                                 "moe_ms": 1e3 * t_moe, "dense_ms": 1e3 * t_dense, "ratio": t_moe / t_dense})
                    print(f"  {name:>12} {rows[-1]['weights']:>8} batch {b:4d}: MoE {1e3 * t_moe:7.2f} ms, dense "
                          f"{1e3 * t_dense:7.2f} ms, {t_moe / t_dense:.2f}x", flush=True)
    return {"rows": rows}


def report(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"MoE vs dense MLP of equal active parameters ({res['machine']}, {res['date']}, load {res['load']})")
    for c in ("shape", "weights", "batch", "MoE ms", "dense ms", "MoE / dense"):
        t.add_column(c, justify="right")
    for r in res["rows"]:
        t.add_row(r["shape"], r["weights"], str(r["batch"]), f"{r['moe_ms']:.2f}", f"{r['dense_ms']:.2f}",
                  f"{r['ratio']:.2f}x" + (" (target <= 1.5)" if r["batch"] == 64 else ""))
    Console().print(t)


def plot(res: dict):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in sorted({(r["shape"], r["weights"]) for r in res["rows"]}):
        rs = [r for r in res["rows"] if (r["shape"], r["weights"]) == key]
        ax.plot([r["batch"] for r in rs], [r["ratio"] for r in rs], "o-", label=" ".join(key))
    ax.axhline(1.5, color="k", ls="--", label="target at batch 64")
    ax.set(xscale="log", xlabel="tokens in the batch", ylabel="MoE time / dense time", title=res["machine"])
    ax.legend(fontsize=8)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    res = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "load": f"{os.getloadavg()[0]:.1f}",
           **measure([int(b) for b in args.batches.split(",")], args.reps)}
    finish(res, OUT, report, plot)


if __name__ == "__main__":
    main()
