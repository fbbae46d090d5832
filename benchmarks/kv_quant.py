"""KV cache dtypes side by side in one run (issue 25): accuracy and offline throughput.

1. accuracy, float32 weights: perplexity of the default model on the fixed text
   (benchmarks/data/eval_text.txt, ~1000 tokens, in 512-token chunks, so later chunks read earlier
   ones back from the cache) and teacher-forced top-1 agreement with a float32 cache, for each
   --kv-cache-dtype; targets: int8 within +1% perplexity, fp8 (e4m3, scaled) within +2%;
2. offline throughput with the default dtype (`auto`), the seeded 128-request workload, the KV
   dtypes in alternating rounds in one process (prefix caching off: rounds repeat prompts).

  python benchmarks/kv_quant.py [--rounds 2] [--requests 128] [--kv auto int8 fp8]
  python benchmarks/kv_quant.py --from-json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

from bench_common import finish, machine, pyplot

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "kv_quant.json"
TEXT = Path(__file__).parent / "data" / "eval_text.txt"
ACCURACY_DTYPES = ["auto", "bfloat16", "float16", "int8", "fp8", "fp8_e5m2"]  # auto = float32 K/V here


def _llm(kv: str, dtype: str):
    from pagedserve import LLM
    from pagedserve.model.loader import resolve_model

    return LLM(str(resolve_model(None)), dtype=dtype, kv_cache_dtype=kv, max_model_len=2048,
               kv_cache_memory=2 << 30, enable_prefix_caching=False)


def accuracy() -> dict:
    from pagedserve.bench.accuracy import agreement_pct, prompt_stats

    res, base_top = {}, None
    for kv in ACCURACY_DTYPES:
        llm = _llm(kv, "float32")
        ids = llm.get_tokenizer()(TEXT.read_text()).input_ids
        ppl, top = prompt_stats(llm, ids)
        base_top = base_top or top
        res[kv] = {"perplexity": ppl, "tokens": len(ids) - 1, "top1_agreement_pct": agreement_pct(base_top, top),
                   "blocks_per_GiB": llm.engine.runner.num_blocks / 2}
        print(f"  {kv:>9}: perplexity {res[kv]['perplexity']:.3f}, top-1 agreement {res[kv]['top1_agreement_pct']:.1f}%",
              flush=True)
        del llm
        gc.collect()
    return res


def throughput(kvs: list[str], n: int, rounds: int) -> dict:
    from pagedserve import SamplingParams
    from pagedserve.bench.workload import synthetic_workload

    reqs = synthetic_workload(num_requests=n, seed=0)
    params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in reqs]
    res = {kv: [] for kv in kvs}
    for r in range(rounds):
        for kv in kvs if r % 2 == 0 else kvs[::-1]:
            llm = _llm(kv, "auto")
            t0 = time.perf_counter()
            outs = llm.generate([q.prompt_token_ids for q in reqs], params, use_tqdm=False)
            dt = time.perf_counter() - t0
            toks = sum(len(o.outputs[0].token_ids) for o in outs)
            res[kv].append({"tok_s": toks / dt, "seconds": dt, "load1": os.getloadavg()[0]})
            print(f"  round {r + 1} {kv:>9}: {toks / dt:6.1f} out tok/s ({dt:.1f}s, load {os.getloadavg()[0]:.1f})",
                  flush=True)
            del llm, outs
            gc.collect()
    return res


def report(res: dict) -> None:
    print(f"\nmachine: {res['machine']} ({res['date']})")
    a = res["accuracy"]
    base = a["auto"]["perplexity"]
    print("accuracy, float32 weights (auto = float32 K/V):")
    for kv, r in a.items():
        print(f"  {kv:>9}: perplexity {r['perplexity']:.3f} ({100 * (r['perplexity'] / base - 1):+.2f}%), "
              f"top-1 agreement {r['top1_agreement_pct']:.1f}%, {r['blocks_per_GiB']:.0f} blocks per GiB")
    print("offline throughput, --dtype auto (out tok/s per round):")
    for kv, rounds in res["throughput"].items():
        print(f"  {kv:>9}: " + "  ".join(f"{x['tok_s']:.1f}" for x in rounds))


def plot(res: dict):
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    a = res["accuracy"]
    base = a["auto"]["perplexity"]
    names = list(a)
    labels = ["float32" if k == "auto" else k for k in names]
    ax.bar(labels, [100 * (a[k]["perplexity"] / base - 1) for k in names], color="#4c72b0")
    ax.set_ylabel("perplexity change vs float32 K/V (%)")
    ax2 = ax.twinx()
    ax2.plot(labels, [a[k]["top1_agreement_pct"] for k in names], "o", color="#dd8452")
    ax2.set_ylabel("top-1 agreement (%)")
    ax.set_title("accuracy by --kv-cache-dtype (float32 weights)")
    t = res["throughput"]
    for i, (kv, rounds) in enumerate(t.items()):
        bx.bar([r + i * 0.8 / len(t) for r in range(len(rounds))], [x["tok_s"] for x in rounds],
               width=0.8 / len(t) * 0.95, label=kv)
    n = len(next(iter(t.values())))
    bx.set_xticks([r + 0.4 - 0.4 / len(t) for r in range(n)], [str(r + 1) for r in range(n)])
    bx.set_xlabel("round")
    bx.set_ylabel("out tok/s")
    bx.set_title("offline, --dtype auto (bf16 here; auto KV = bf16), 128 requests")
    bx.legend()
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--kv", nargs="+", default=["auto", "int8", "fp8"])
    ap.add_argument("--from-json", action="store_true")
    args = ap.parse_args()
    if args.from_json:
        return finish(json.loads(OUT.read_text()), OUT, report, plot, save=False)
    print("1. accuracy", flush=True)
    res = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "accuracy": accuracy()}
    print(f"2. offline throughput: {args.requests} requests x {args.rounds} rounds", flush=True)
    res["throughput"] = throughput(args.kv, args.requests, args.rounds)
    finish(res, OUT, report, plot)


if __name__ == "__main__":
    main()
