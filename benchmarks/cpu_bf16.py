"""bf16 on CPU: accuracy and speed of `--dtype bfloat16` against float32, side by side in one run.

1. accuracy: perplexity of the default model on a fixed text (benchmarks/data/eval_text.txt,
   ~1000 tokens) and teacher-forced top-1 agreement with float32 at every position;
2. GEMM: the packed float32 kernel vs the packed bf16 kernel (AVX512_BF16) on the model's shapes;
3. offline throughput: the seeded synthetic workload, float32 and bf16 engines in alternating rounds.

On a CPU without AVX512_BF16 the bf16 rows say so and `--dtype auto` keeps float32.

  python benchmarks/cpu_bf16.py [--rounds 4] [--requests 64]
  python benchmarks/cpu_bf16.py --from-json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench_common import finish, machine, pyplot

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "cpu_bf16.json"
TEXT = Path(__file__).parent / "data" / "eval_text.txt"


def accuracy(llms: dict) -> dict:
    from pagedserve.bench.accuracy import agreement_pct, prompt_stats

    tok = next(iter(llms.values())).get_tokenizer()
    ids = tok(TEXT.read_text()).input_ids
    res, top1 = {}, {}
    for name, llm in llms.items():
        ppl, top1[name] = prompt_stats(llm, ids)
        res[name] = {"tokens": len(ids) - 1, "perplexity": ppl}
    if "bfloat16" in top1:
        res["top1_agreement_pct"] = agreement_pct(top1["float32"], top1["bfloat16"])
        res["perplexity_change_pct"] = 100 * (res["bfloat16"]["perplexity"] / res["float32"]["perplexity"] - 1)
    return res


def gemm(shapes, ms, reps: int = 30) -> list[dict]:
    import torch

    from pagedserve.model import cpu_kernels

    k = cpu_kernels.load()
    bf16 = cpu_kernels.bf16_gemm() is not None
    rows = []

    def timed(f):
        f(), f()
        t = time.perf_counter()
        for _ in range(reps):
            f()
        return (time.perf_counter() - t) / reps

    for name, (N, K) in shapes.items():
        w = torch.randn(N, K) * 0.02
        w32 = k.pack_linear_weight(w)
        wb = k.pack_linear_weight_bf16(w) if bf16 else None
        for M in ms:
            x = torch.randn(M, K)
            fl = 2 * M * N * K
            r = {"shape": name, "N": N, "K": K, "M": M, "fp32_gflops": fl / timed(lambda: k.packed_linear(x, w32, None)) / 1e9}
            if bf16:
                r["bf16_gflops"] = fl / timed(lambda: k.packed_linear(x, wb, None)) / 1e9
            rows.append(r)
    return rows


def throughput(llms: dict, n: int, rounds: int) -> dict:
    from pagedserve import SamplingParams
    from pagedserve.bench.workload import synthetic_workload

    reqs = synthetic_workload(num_requests=n)
    prompts = [r.prompt_token_ids for r in reqs]
    params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in reqs]
    res = {name: [] for name in llms}
    for r in range(rounds):
        for name, llm in llms.items():
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            dt = time.perf_counter() - t0
            toks = sum(len(o.outputs[0].token_ids) for o in outs)
            res[name].append({"tok_s": toks / dt, "seconds": dt, "load1": os.getloadavg()[0]})
            print(f"  round {r + 1} {name:>9}: {toks / dt:6.1f} out tok/s ({dt:.1f}s, load {os.getloadavg()[0]:.1f})")
    return res


def report(res: dict) -> None:
    print(f"\nmachine: {res['machine']}; AVX512_BF16: {res['avx512_bf16']}")
    a = res["accuracy"]
    for name in ("float32", "bfloat16"):
        if name in a:
            print(f"  {name:>9}: perplexity {a[name]['perplexity']:.3f} over {a[name]['tokens']} tokens")
    if "top1_agreement_pct" in a:
        print(f"  bf16 vs float32: perplexity {a['perplexity_change_pct']:+.2f}%, top-1 agreement {a['top1_agreement_pct']:.1f}%")
    print("\nGEMM GFLOP/s (packed float32 / packed bf16):")
    for r in res["gemm"]:
        bf = f"{r['bf16_gflops']:6.0f}  ({r['bf16_gflops'] / r['fp32_gflops']:.2f}x)" if "bf16_gflops" in r else "  n/a"
        print(f"  {r['shape']:>8} N={r['N']:5d} K={r['K']:4d} M={r['M']:4d}: {r['fp32_gflops']:6.0f} / {bf}")
    t = res["throughput"]
    print("\noffline throughput (out tok/s), rounds:")
    for name, rounds in t.items():
        print(f"  {name:>9}: " + "  ".join(f"{x['tok_s']:.1f}" for x in rounds))
    if "bfloat16" in t:
        ratios = sorted(b["tok_s"] / f["tok_s"] for f, b in zip(t["float32"], t["bfloat16"]))
        print("  bf16 / float32 per round: " + "  ".join(f"{x:.2f}" for x in ratios) + f"  (median {ratios[len(ratios) // 2]:.2f})")


def plot(res: dict):
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    g = res["gemm"]
    labels = [f"{r['shape']}\nM={r['M']}" for r in g]
    xs = range(len(g))
    axes[0].bar([x - 0.2 for x in xs], [r["fp32_gflops"] for r in g], width=0.4, label="float32", color="#999999")
    if g and "bf16_gflops" in g[0]:
        axes[0].bar([x + 0.2 for x in xs], [r["bf16_gflops"] for r in g], width=0.4, label="bf16", color="#4c72b0")
    axes[0].set_xticks(list(xs), labels, fontsize=7)
    axes[0].set_title("packed GEMM, GFLOP/s")
    axes[0].legend()
    t = res["throughput"]
    for i, (name, col) in enumerate((("float32", "#999999"), ("bfloat16", "#4c72b0"))):
        if name in t:
            axes[1].bar([r + i * 0.4 for r in range(len(t[name]))], [x["tok_s"] for x in t[name]], width=0.38,
                        label=name, color=col)
    axes[1].set_xticks([r + 0.2 for r in range(len(t["float32"]))], [str(r + 1) for r in range(len(t["float32"]))])
    axes[1].set_xlabel("round")
    axes[1].set_title("offline throughput, out tok/s")
    axes[1].legend(loc="lower right")
    a = res["accuracy"]
    sub = (f"perplexity {a['perplexity_change_pct']:+.2f}%, top-1 agreement {a['top1_agreement_pct']:.1f}%"
           if "top1_agreement_pct" in a else "no AVX512_BF16: float32 only")
    fig.suptitle(f"bf16 vs float32 on CPU — {res['machine']} — {sub}")
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--from-json", action="store_true")
    args = ap.parse_args()
    if args.from_json:
        return finish(json.loads(OUT.read_text()), OUT, report, plot, save=False)
    from pagedserve import LLM
    from pagedserve.model import cpu_kernels
    from pagedserve.model.kernel_levels import cpu_flags

    res = {"machine": machine(), "avx512_bf16": "avx512_bf16" in cpu_flags(),
           "date": time.strftime("%Y-%m-%d")}
    dtypes = ["float32"] + (["bfloat16"] if cpu_kernels.bf16_gemm() is not None else [])
    # No prefix caching: rounds repeat the same prompts, and a bf16 cache (twice the tokens) would
    # keep more of the last round's prompts than a float32 one.
    llms = {d: LLM(None, dtype=d, max_model_len=2048, kv_cache_memory=512 << 20, enable_prefix_caching=False)
            for d in dtypes}
    print("1. accuracy")
    res["accuracy"] = accuracy(llms)
    print("2. GEMM")
    res["gemm"] = gemm({"qkv": (960, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)},
                       (1, 16, 64, 256))
    print(f"3. offline throughput: {args.requests} requests x {args.rounds} rounds")
    res["throughput"] = throughput(llms, args.requests, args.rounds)
    finish(res, OUT, report, plot)


if __name__ == "__main__":
    main()
