"""Sharing the CPU: offline throughput quiet and with a busy loop pinned to CPU 0, for the thread
settings an engine could choose: what pagedserve did before (each kernel's work in fixed per-thread
shares), passive waits (OMP_WAIT_POLICY=PASSIVE), shares that a thread's idle peers take from the
back of (csrc/parallel.h), that with a short spin (GOMP_SPINCOUNT=1000), that with the engine's
1-or-N thread tuner (engine/thread_tuner.py; the default), and one thread.

Each configuration runs in its own process (libgomp reads its wait policy once, at load);
--requests requests (64), prompts 32-128 tokens, 64 output tokens each, default dtype.

  python benchmarks/cpu_contention.py [--repeat 2] [--requests 64]
  python benchmarks/cpu_contention.py --from-json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_common import finish, machine, pyplot

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "cpu_contention.json"
CONFIGS = {  # name -> extra environment
    "before: libgomp spin, fixed split": {"GOMP_SPINCOUNT": "300000", "BENCH_FIXED_SPLIT": "1",
                                          "BENCH_ADAPTIVE": "0"},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE", "BENCH_ADAPTIVE": "0"},
    "shares with stealing": {"BENCH_ADAPTIVE": "0"},
    "GOMP_SPINCOUNT=1000 + stealing": {"GOMP_SPINCOUNT": "1000", "BENCH_ADAPTIVE": "0"},
    "default: stealing + 1-or-N tuner": {},
    "1 thread": {"BENCH_THREADS": "1"},
}

RUN = r'''
import os, time
from pagedserve import LLM, SamplingParams
from pagedserve.bench.workload import synthetic_workload
n = int(os.environ.get("BENCH_THREADS", "0")) or None
llm = LLM(None, max_model_len=2048, kv_cache_memory=1 << 30, num_threads=n,
          adaptive_threads=os.environ.get("BENCH_ADAPTIVE") != "0")
if os.environ.get("BENCH_FIXED_SPLIT"):
    llm.engine.runner.kernels.set_dynamic_split(False)
reqs = synthetic_workload(num_requests=int(os.environ["BENCH_REQUESTS"]), prompt_len=(32, 128), output_len=(64, 64))
p = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in reqs]
llm.generate([r.prompt_token_ids for r in reqs[:4]], p[:4], use_tqdm=False)  # first-run costs, off the clock
t = time.perf_counter()
outs = llm.generate([r.prompt_token_ids for r in reqs], p, use_tqdm=False)
dt = time.perf_counter() - t
print("RESULT", sum(len(o.outputs[0].token_ids) for o in outs) / dt)
'''


def run(env: dict, busy: bool, requests: int) -> float:
    neighbour = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        out = subprocess.run([sys.executable, "-c", RUN], env={**os.environ, **env, "BENCH_REQUESTS": str(requests)}, capture_output=True, text=True,
                             check=True).stdout
    finally:
        if neighbour:
            neighbour.kill()
            neighbour.wait()
    return float(next(line for line in out.splitlines() if line.startswith("RESULT")).split()[1])


def report(res: dict) -> None:
    print(f"\n{res['machine']}  ({res['date']}; out tok/s per run)")
    print(f"  {'':38} {'quiet':>16} {'busy loop on CPU 0':>22}")
    for name, r in res["configs"].items():
        q = ", ".join(f"{x:.0f}" for x in r["quiet"])
        b = ", ".join(f"{x:.0f}" for x in r["busy"])
        print(f"  {name:38} {q:>16} {b:>22}")


def plot(res: dict):
    plt = pyplot()

    names = list(res["configs"])
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (k, col) in enumerate((("quiet", "#999999"), ("busy", "#dd8452"))):
        vals = [sum(res["configs"][n][k]) / len(res["configs"][n][k]) for n in names]
        ax.bar([x + i * 0.38 for x in range(len(names))], vals, width=0.36, color=col,
               label="quiet" if k == "quiet" else "busy loop on CPU 0")
    ax.set_xticks([x + 0.19 for x in range(len(names))], names, fontsize=8)
    ax.set_ylabel("out tok/s (mean of runs)")
    ax.set_title(f"thread settings, quiet and contended — {res['machine']}")
    ax.legend()
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--from-json", action="store_true")
    args = ap.parse_args()
    if args.from_json:
        return finish(json.loads(OUT.read_text()), OUT, report, plot, save=False)
    res = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "requests": args.requests, "configs": {}}
    for r in range(args.repeat):  # configurations interleaved, so drift hits them alike
        for name, env in CONFIGS.items():
            slot = res["configs"].setdefault(name, {"quiet": [], "busy": []})
            for busy in (False, True):
                v = run(env, busy, args.requests)
                slot["busy" if busy else "quiet"].append(v)
                print(f"  run {r + 1} {name}, {'busy' if busy else 'quiet'}: {v:.1f} tok/s", flush=True)
    finish(res, OUT, report, plot)


if __name__ == "__main__":
    main()
