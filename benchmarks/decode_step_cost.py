"""What one more sequence costs a decode step (issue 26's mixed-load ceiling): the default model
offline, n requests of 200-token prompts; once every one has its first token, the median time of
the next decode-only engine steps (each step: one token for each of the n), and n / that as out
tokens/s. Background work beside interactive decoding can only buy
throughput at this curve's slope. Measured for each --activation-dtype in one run (float: the
quantized GEMMs in bf16 above 4 rows; int8: one-pass int8 activations on the wide VNNI tile).

    python benchmarks/decode_step_cost.py [--sizes 1,4,8,12,16,24,32,48] [--activation-dtypes float,int8]

Writes results/decode_step_cost.json and .png.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bench_common import finish, machine, pyplot

OUT = Path(__file__).parent / "results" / "decode_step_cost.json"
STEPS = 60


def measure(sizes: list[int], activation_dtype: str) -> dict:
    import gc
    import statistics

    from pagedserve import LLM, SamplingParams

    print(f"== --activation-dtype {activation_dtype}", flush=True)
    llm = LLM(None, max_model_len=2048, kv_cache_memory=1 << 30, enable_prefix_caching=False,
              activation_dtype=activation_dtype)
    engine = llm.engine
    params = SamplingParams(max_tokens=STEPS + 20, temperature=0, ignore_eos=True)
    llm.generate([[100 + i for i in range(300)]] * 2, params, use_tqdm=False)  # warm-up
    rows = {}
    for n in sizes:
        for i in range(n):
            engine.add_request(f"{n}-{i}", [100 + (i * 7 + j) % 1000 for j in range(200)], params)
        while any(r.num_output_tokens == 0 for r in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()  # prefill (and the first decodes of early prompts)
        times = []
        for _ in range(STEPS):
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
        while engine.has_unfinished_requests():
            engine.step()
        step = statistics.median(times)
        rows[n] = {"ms_per_step": 1e3 * step, "out_tok_s": n / step}
        print(f"  {n:3d} sequences: {rows[n]['ms_per_step']:.2f} ms a decode step, {rows[n]['out_tok_s']:.0f} out tok/s",
              flush=True)
    del llm, engine
    gc.collect()
    return {str(k): v for k, v in rows.items()}


def report(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"decode step cost, default model ({res['machine']}, {res['date']}, load {res['load']})")
    t.add_column("sequences", justify="right")
    for a in res["variants"]:
        t.add_column(f"ms per step ({a})", justify="right")
        t.add_column(f"out tok/s ({a})", justify="right")
    for n in next(iter(res["variants"].values())):
        t.add_row(n, *(f"{v[n][k]:{f}}" for v in res["variants"].values()
                       for k, f in (("ms_per_step", ".2f"), ("out_tok_s", ".0f"))))
    Console().print(t)


def plot(res: dict):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax2 = ax.twinx()
    for i, (a, rows) in enumerate(res["variants"].items()):
        ns = [int(n) for n in rows]
        ax.plot(ns, [r["ms_per_step"] for r in rows.values()], "o-", color=f"C{2 * i}", label=f"ms per step ({a})")
        ax2.plot(ns, [r["out_tok_s"] for r in rows.values()], "s--", color=f"C{2 * i + 1}", label=f"out tok/s ({a})")
    ax.set(xlabel="sequences in the step", ylabel="ms per decode step", title=res["machine"])
    ax2.set_ylabel("out tok/s")
    fig.legend(loc="upper left")
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4,8,12,16,24,32,48")
    ap.add_argument("--activation-dtypes", default="float,int8")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    res = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "load": f"{os.getloadavg()[0]:.1f}",
           "variants": {a: measure(sizes, a) for a in args.activation_dtypes.split(",")}}
    finish(res, OUT, report, plot)


if __name__ == "__main__":
    main()
