"""The packed float GEMMs' L2 prefetch (csrc/prefetch.h, session 24) on and off, side by side in one
process: decode step time of the default model (SmolLM2-135M from its converted float32 folder)
in float32 and, where the CPU has AVX512_BF16, bf16, at decode batches 1-48 (prompts of 64
tokens), and an OLMoE-shaped MoE layer at batch 64 (benchmarks/moe_layer.py's). Each point is the
median of ROUNDS windows of STEPS steps, the two settings alternating window by window, so the
box's drift hits both alike.

    python benchmarks/gemm_prefetch.py [--rounds 5]

Writes results/gemm_prefetch.json and .png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from bench_common import finish, machine, on_off_plot

OUT = Path(__file__).parent / "results" / "gemm_prefetch.json"
BATCHES = (1, 4, 8, 16, 32, 48)
STEPS = 8
ON = 4096


def decode_rows(dtype: str, rounds: int) -> list[dict]:
    from pagedserve import LLM
    from pagedserve.bench.decoding import decode_window, start_decoding, stop_decoding
    from pagedserve.model import cpu_kernels
    from pagedserve.model.loader import resolve_model

    k = cpu_kernels.load()
    llm = LLM(str(resolve_model(None)), dtype=dtype, kv_cache_memory=1 << 30, max_model_len=1024)
    eng = llm.engine
    rows = []
    for b in BATCHES:
        ids = start_decoding(eng, b, 64)
        times = {0: [], ON: []}
        for _ in range(rounds):
            for ahead in (0, ON):
                k.set_gemm_prefetch(ahead)
                times[ahead].append(decode_window(eng, STEPS)[0] * 1e3)
        k.set_gemm_prefetch(ON)
        off, on = statistics.median(times[0]), statistics.median(times[ON])
        rows.append({"what": f"decode {dtype}", "batch": b, "off_ms": off, "on_ms": on, "on_over_off": on / off})
        print(f"decode {dtype:8s} batch {b:3d}: {off:7.2f} -> {on:7.2f} ms per step ({on / off:.2f}x)", flush=True)
        stop_decoding(eng, ids)
    return rows


def moe_rows(rounds: int, dtypes: list[str]) -> list[dict]:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from moe_layer import SHAPES, _layers, _median_time

    from pagedserve.model import cpu_kernels

    k = cpu_kernels.load()
    rows = []
    for weights in dtypes:
        moe, dense = _layers(*SHAPES["olmoe-like"], weights)
        x = torch.randn(64, SHAPES["olmoe-like"][0])
        t = {(w, a): [] for w in ("moe", "dense") for a in (0, ON)}
        with torch.inference_mode():
            for _ in range(rounds):
                for ahead in (0, ON):
                    k.set_gemm_prefetch(ahead)
                    t[("moe", ahead)].append(_median_time(lambda: moe(x), 10) * 1e3)
                    t[("dense", ahead)].append(_median_time(lambda: dense(x), 10) * 1e3)
        k.set_gemm_prefetch(ON)
        m = {key: statistics.median(v) for key, v in t.items()}
        rows.append({"what": f"olmoe-like MoE {weights}", "batch": 64, "off_ms": m[("moe", 0)], "on_ms": m[("moe", ON)],
                     "on_over_off": m[("moe", ON)] / m[("moe", 0)], "dense_off_ms": m[("dense", 0)],
                     "dense_on_ms": m[("dense", ON)], "moe_over_dense_off": m[("moe", 0)] / m[("dense", 0)],
                     "moe_over_dense_on": m[("moe", ON)] / m[("dense", ON)]})
        r = rows[-1]
        print(f"OLMoE-like {weights}: {r['off_ms']:.2f} -> {r['on_ms']:.2f} ms; MoE / dense {r['moe_over_dense_off']:.2f} "
              f"-> {r['moe_over_dense_on']:.2f} (target <= 1.5)", flush=True)
    return rows


def report(res: dict) -> None:
    print(f"\n{res['machine']}; prefetch {ON} bytes ahead into L2 against none, same process, alternating")
    print(f"{'what':28s} {'batch':>5s} {'off ms':>8s} {'on ms':>8s} {'on/off':>7s}")
    for r in res["rows"]:
        print(f"{r['what']:28s} {r['batch']:5d} {r['off_ms']:8.2f} {r['on_ms']:8.2f} {r['on_over_off']:7.2f}")


def plot(res: dict):
    return on_off_plot(res["rows"], "step time, prefetch on / off", "L2 prefetch in the packed float GEMMs")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from pagedserve.model import cpu_kernels

    dtypes = ["float32"] + (["bfloat16"] if cpu_kernels.bf16_gemm() is not None else [])
    rows = []
    for dtype in dtypes:
        rows += decode_rows(dtype, args.rounds)
    rows += moe_rows(args.rounds, dtypes)
    res = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "prefetch_bytes": ON, "rows": rows}
    finish(res, OUT, report, plot)


if __name__ == "__main__":
    main()
