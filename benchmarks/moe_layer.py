"""A Mixture-of-Experts MLP against a dense MLP with the same *active* parameters (issue 28):
time per call at a batch of tokens, on this CPU's kernels (packed GEMMs, float32 and, where the CPU
has AVX512_BF16, bf16; int4 weights in groups of 32 with int8 activations where it has
AVX512_VNNI: the GGUF serving default), random weights. The MoE runs its experts both ways side by
side: all of a projection's experts in one C++ call (moe_cpu.cpp, the default) and one call per
expert (as before session 23).

  mixtral-like  hidden 1024, 8 experts of 1408, top-2  (active MLP width 2816)  vs dense 2816
  olmoe-like    hidden 1024, 64 experts of 256, top-8  (active width 2048)      vs dense 2048
Target: the MoE layer at batch 64 within 1.5x of the dense one. The MoE time includes routing
(router GEMM, softmax, top-k, sort) and the combine.

    python benchmarks/moe_layer.py [--batches 1,16,64,256] [--reps 30] [--rounds 5]

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


def _layers(hidden, experts, width, top_k, weights):
    import torch

    from pagedserve.model import cpu_kernels
    from pagedserve.model.arch import ModelArch, MoEFields
    from pagedserve.model.llama import MLP, Linear, use_cpu_kernels
    from pagedserve.model.moe import SparseMoE
    from pagedserve.model.quantization.quantize import symmetric

    arch = ModelArch("MixtralForCausalLM", 100, hidden, width * top_k, 1, 8, 8, hidden // 8, 1e-6, 1e4, None, 64,
                     False, False, None, None, [], moe=MoEFields(experts, top_k, width, 0, True), moe_layers=(0,))
    torch.manual_seed(0)
    moe, dense = SparseMoE(arch).eval(), MLP(arch).eval()
    for p in list(moe.parameters()) + list(dense.parameters()):
        p.data.normal_(0, 0.02)
    kernels = cpu_kernels.load()
    int4 = weights == "int4 (int8 act.)"
    for layer in (moe, dense):
        if int4:  # every projection but the router, as `pagedserve quantize --method int4-rtn` writes them
            for name, m in layer.named_modules():
                if isinstance(m, Linear) and name != "gate":
                    m.set_quantized(symmetric(m.weight.data, 4, 32))
        if kernels is not None:
            use_cpu_kernels(layer, kernels, weight_dtype=torch.bfloat16 if weights != "float32" else torch.float32,
                            int8_activation_rows=1 if int4 else 0)
    return moe, dense


def _median_time(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(batches, reps, rounds=5) -> dict:
    import torch

    from pagedserve.model import cpu_kernels

    from pagedserve.model.moe import SparseMoE

    kernels = cpu_kernels.load()
    variants = (["float32"] + (["bfloat16"] if cpu_kernels.bf16_gemm() is not None else [])
                + (["int4 (int8 act.)"] if kernels is not None and kernels.quant_linear_vnni_supported() else []))
    rows = []

    def per_expert(moe, x):
        SparseMoE.grouped_kernel = False
        try:
            return moe(x)
        finally:
            SparseMoE.grouped_kernel = True

    with torch.inference_mode():
        for name, (hidden, experts, width, top_k) in SHAPES.items():
            for weights in variants:
                moe, dense = _layers(hidden, experts, width, top_k, weights)
                for b in batches:
                    x = torch.randn(b, hidden)
                    # Rounds alternate the three, and the ratios are taken within a round: this
                    # box's speed drifts by ±30% between seconds, which a dense-then-MoE pair of
                    # long runs read as a ratio (OLMoE float32 read 1.18-1.72x that way).
                    r = max(3, reps // rounds)
                    t = {"dense": [], "moe": [], "loop": []}
                    for _ in range(rounds):
                        t["dense"].append(_median_time(lambda: dense(x), r))
                        t["moe"].append(_median_time(lambda: moe(x), r))
                        t["loop"].append(_median_time(lambda: per_expert(moe, x), r))
                    med = {k: statistics.median(v) for k, v in t.items()}
                    t_dense, t_moe, t_loop = med["dense"], med["moe"], med["loop"]
                    ratios = [m / d for m, d in zip(t["moe"], t["dense"])]
                    rows.append({"shape": name, "weights": weights, "batch": b, "moe_ms": 1e3 * t_moe,
                                 "moe_per_expert_ms": 1e3 * t_loop, "dense_ms": 1e3 * t_dense,
                                 "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                                 "ratio_per_expert": statistics.median(lo / d for lo, d in zip(t["loop"], t["dense"]))})
                    row = rows[-1]
                    print(f"  {name:>12} {weights:>16} batch {b:4d}: MoE {1e3 * t_moe:7.2f} ms (per expert "
                          f"{1e3 * t_loop:7.2f}), dense {1e3 * t_dense:7.2f} ms, {row['ratio']:.2f}x "
                          f"(rounds {row['ratio_min']:.2f}-{row['ratio_max']:.2f}; per expert "
                          f"{row['ratio_per_expert']:.2f}x)", flush=True)
    return {"rows": rows}


def report(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"MoE vs dense MLP of equal active parameters ({res['machine']}, {res['date']}, load {res['load']})")
    for c in ("shape", "weights", "batch", "MoE ms", "dense ms", "MoE / dense", "one call per expert"):
        t.add_column(c, justify="right")
    for r in res["rows"]:
        t.add_row(r["shape"], r["weights"], str(r["batch"]), f"{r['moe_ms']:.2f}", f"{r['dense_ms']:.2f}",
                  f"{r['ratio']:.2f}x" + (" (target <= 1.5)" if r["batch"] == 64 else ""),
                  f"{r['moe_per_expert_ms']:.2f} ms, {r['ratio_per_expert']:.2f}x" if "ratio_per_expert" in r else "-")
    Console().print(t)


def plot(res: dict):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in sorted({(r["shape"], r["weights"]) for r in res["rows"]}):
        rs = [r for r in res["rows"] if (r["shape"], r["weights"]) == key]
        line, = ax.plot([r["batch"] for r in rs], [r["ratio"] for r in rs], "o-", label=" ".join(key))
        if all("ratio_per_expert" in r for r in rs):
            ax.plot([r["batch"] for r in rs], [r["ratio_per_expert"] for r in rs], ":", color=line.get_color(),
                    label=" ".join(key) + ", one call per expert")
    ax.axhline(1.5, color="k", ls="--", label="target at batch 64")
    ax.set(xscale="log", xlabel="tokens in the batch", ylabel="MoE time / dense time", title=res["machine"])
    ax.legend(fontsize=7)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--reps", type=int, default=30, help="timed calls per layer and batch, over all rounds")
    ap.add_argument("--rounds", type=int, default=5, help="rounds alternating dense, MoE and per-expert MoE")
    args = ap.parse_args()
    res = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "load": f"{os.getloadavg()[0]:.1f}",
           "rounds": args.rounds, **measure([int(b) for b in args.batches.split(",")], args.reps, args.rounds)}
    finish(res, OUT, report, plot)


if __name__ == "__main__":
    main()
