"""Packed weights on transparent huge pages (engine/cpu_memory.py HugePageArena) against where
packing leaves them (4 KiB pages), side by side in one process: decode step time of the default
model served from its Q4_1 GGUF (int4 kept quantized), from its converted float32 folder, and in
bf16 where the CPU has AVX512_BF16, at decode batches 1-32 (prompts of 64 tokens); and
benchmarks/moe_layer.py's OLMoE-shaped MoE layer at batch 64 (200 MB of float32 experts) with its
dense equal. Two engines (two layers) are built, one per setting; each point is the median of
ROUNDS windows, the two alternating window by window, so the box's drift hits both alike. The
huge pages the OS granted under each engine's weights are read from /proc/self/smaps.

    python benchmarks/huge_pages.py [--rounds 7]

Writes results/huge_pages.json and .png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from bench_common import finish, machine, on_off_plot

OUT = Path(__file__).parent / "results" / "huge_pages.json"
BATCHES = (1, 4, 8, 16, 32)
STEPS = 8


def huge_kib_under(ptr: int) -> int:
    """AnonHugePages (KiB) of the mapping that holds address `ptr`."""
    from pagedserve.engine.cpu_memory import mapping_kib

    return mapping_kib(ptr, "AnonHugePages")


def _first_packed(model):
    from pagedserve.model.llama import Linear

    lin = next(m for m in model.modules() if isinstance(m, Linear) and m.packed is not None)
    return lin.quant.pack()[0] if lin.quant is not None else lin.weight


def _build(on: bool, make):
    from pagedserve.model import llama

    llama.WEIGHTS_ON_HUGE_PAGES = on
    try:
        return make()
    finally:
        llama.WEIGHTS_ON_HUGE_PAGES = True


def decode_rows(kind: str, rounds: int) -> list[dict]:
    from pagedserve import LLM
    from pagedserve.bench.decoding import decode_window, start_decoding, stop_decoding
    from pagedserve.model.loader import resolve_model

    def make():
        kw = dict(kv_cache_memory=512 << 20, max_model_len=1024)
        if kind == "int4 (GGUF)":
            return LLM(None, **kw)
        return LLM(str(resolve_model(None)), dtype=kind, **kw)

    engines = {on: _build(on, make).engine for on in (False, True)}
    huge = {on: huge_kib_under(_first_packed(e.runner.model).data_ptr()) for on, e in engines.items()}
    rows = []
    for b in BATCHES:
        ids = {on: start_decoding(e, b, 64) for on, e in engines.items()}
        times = {False: [], True: []}
        for _ in range(rounds):
            for on, e in engines.items():
                times[on].append(decode_window(e, STEPS)[0] * 1e3)
        for on, e in engines.items():
            stop_decoding(e, ids[on])
        off, on = statistics.median(times[False]), statistics.median(times[True])
        rows.append({"what": f"decode {kind}", "batch": b, "off_ms": off, "on_ms": on, "on_over_off": on / off,
                     "weight_bytes": engines[True].runner.weight_bytes, "huge_kib_on": huge[True],
                     "huge_kib_off": huge[False]})
        print(f"decode {kind:12s} batch {b:3d}: {off:7.2f} -> {on:7.2f} ms per step ({on / off:.3f}x)", flush=True)
    return rows


def moe_rows(rounds: int) -> list[dict]:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from moe_layer import SHAPES, _layers, _median_time

    layers = {on: _build(on, lambda: _layers(*SHAPES["olmoe-like"], "float32")) for on in (False, True)}
    x = torch.randn(64, SHAPES["olmoe-like"][0])
    t = {(w, on): [] for w in ("moe", "dense") for on in (False, True)}
    with torch.inference_mode():
        for _ in range(rounds):
            for on, (moe, dense) in layers.items():
                t[("moe", on)].append(_median_time(lambda: moe(x), 10) * 1e3)
                t[("dense", on)].append(_median_time(lambda: dense(x), 10) * 1e3)
    m = {key: statistics.median(v) for key, v in t.items()}
    row = {"what": "olmoe-like MoE float32", "batch": 64, "off_ms": m[("moe", False)], "on_ms": m[("moe", True)],
           "on_over_off": m[("moe", True)] / m[("moe", False)], "dense_off_ms": m[("dense", False)],
           "dense_on_ms": m[("dense", True)], "moe_over_dense_off": m[("moe", False)] / m[("dense", False)],
           "moe_over_dense_on": m[("moe", True)] / m[("dense", True)],
           "huge_kib_on": huge_kib_under(_first_packed(layers[True][0]).data_ptr())}
    print(f"OLMoE-like float32: {row['off_ms']:.2f} -> {row['on_ms']:.2f} ms; MoE / dense "
          f"{row['moe_over_dense_off']:.2f} -> {row['moe_over_dense_on']:.2f} (issue 28's target <= 1.5)", flush=True)
    return [row]


def report(res: dict) -> None:
    print(f"\n{res['machine']}; load average before: {res['load_before']}; packed weights in one huge-page "
          "buffer (on) against where packing left them (off), same process, alternating")
    print(f"{'what':26s} {'batch':>5s} {'off ms':>8s} {'on ms':>8s} {'on/off':>7s} {'huge MiB on':>12s}")
    for r in res["rows"]:
        print(f"{r['what']:26s} {r['batch']:5d} {r['off_ms']:8.2f} {r['on_ms']:8.2f} {r['on_over_off']:7.3f} "
              f"{r['huge_kib_on'] / 1024:12.0f}")


def plot(res: dict):
    return on_off_plot(res["rows"], "step time, huge pages / 4 KiB pages", "Packed weights on transparent huge pages")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    from pagedserve.model import cpu_kernels

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    kinds = ["int4 (GGUF)", "float32"] + (["bfloat16"] if cpu_kernels.bf16_gemm() is not None else [])
    load = os.getloadavg()
    rows = []
    for kind in kinds:
        rows += decode_rows(kind, args.rounds)
    rows += moe_rows(args.rounds)
    res = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "load_before": [round(v, 2) for v in load],
           "transparent_hugepage": thp.read_text().strip() if thp.exists() else None, "rows": rows}
    finish(res, OUT, report, plot)


if __name__ == "__main__":
    main()
