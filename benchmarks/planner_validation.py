"""Planner vs engine: predicted decode tokens/s (from `plan --measure` figures of this machine)
against what the engine measures on the default model at decode batches 1, 8, 32, 64, 128.

    python benchmarks/planner_validation.py     # table, results/planner_validation.json + .png

Pass criterion (issue 5): every batch within +-25%. Per batch, engine windows and fresh
measurements of the planner's batch-dependent figures alternate (ROUNDS times); medians compared.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from pagedserve import LLM
from pagedserve.bench.decoding import decode_window, start_decoding, stop_decoding
from pagedserve.model.loader import resolve_model
from pagedserve.planner.plan import Plan, PlanInputs, Workload
from pagedserve.planner.specs import MachineProbe, load_model_spec, measure_this_machine

RESULTS = Path(__file__).parent / "results"
BATCHES = [1, 8, 32, 64, 128]
PROMPT = 128
STEPS = 6
ROUNDS = 5


def with_points(hw, batch: int, lin_s_per_byte: float, elementwise_s: float):
    """hw with its measured curves' points at `batch` replaced by a fresh measurement."""
    m = dict(hw.measured)
    m["linear_curve"] = [(b, lin_s_per_byte if b == batch else v) for b, v in m["linear_curve"]]
    m["layer_elementwise_curve"] = [(b, elementwise_s if b == batch else v) for b, v in m["layer_elementwise_curve"]]
    return replace(hw, measured=m)


def main():
    spec = load_model_spec("default")
    hw = measure_this_machine(spec)
    print(f"measured: matmul {hw.bf16_tflops * 1000:.0f} GFLOP/s, weight streaming {hw.bandwidth_gbs:.1f} GB/s")
    # The float32 weights the planner is asked about (weight_dtype fp32 below): the converted folder,
    # since the default spec now serves the GGUF kept quantized (sessions 19-22), which this
    # comparison measured by mistake from then on.
    llm = LLM(str(resolve_model(None)), dtype="float32", max_model_len=1024, kv_cache_memory=2 << 30, max_num_seqs=256,
              max_num_batched_tokens=2048)
    # The machine's speed drifts by 10-30% over minutes (other tenants): measuring the planner's
    # figures once and the engine minutes later compared two different machines. So, per batch,
    # engine windows alternate with fresh measurements of the planner's batch-dependent figures,
    # ROUNDS times, and the medians are compared.
    probe = MachineProbe(spec)
    rows = []
    for b in BATCHES:
        ids = start_decoding(llm.engine, b, PROMPT)
        measured, predicted, ctxs = [], [], []
        for _ in range(ROUNDS):
            step_s, ctx = decode_window(llm.engine, STEPS)
            tok_s = b / step_s
            fresh = with_points(hw, b, probe.linear_s_per_byte(b), probe.layer_elementwise_s(b))
            plan = Plan(PlanInputs(model=spec, hw=fresh, weight_dtype="fp32", max_model_len=1024,
                                   workload=Workload(input_tokens=PROMPT, output_tokens=16)))
            measured.append(tok_s)
            predicted.append(plan.step_time(b, context=ctx)["tokens_per_s"])
            ctxs.append(ctx)
        stop_decoding(llm.engine, ids)
        meas, pred = statistics.median(measured), statistics.median(predicted)
        err = pred / meas - 1
        rows.append({"batch": b, "context": statistics.mean(ctxs), "measured_tok_s": meas, "predicted_tok_s": pred,
                     "error": err, "rounds_measured": measured, "rounds_predicted": predicted})
        print(f"batch {b:4d}: measured {meas:8.1f} tok/s, predicted {pred:8.1f}, error {err * 100:+.1f}% "
              f"(median of {ROUNDS} alternating rounds; measured {min(measured):.0f}-{max(measured):.0f})")
    ok = all(abs(r["error"]) <= 0.25 for r in rows)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "planner_validation.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "hardware": hw.measured,
                               "rows": rows, "within_25pct": ok}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(BATCHES, [r["measured_tok_s"] for r in rows], "o-", label="engine (measured)")
    ax.loglog(BATCHES, [r["predicted_tok_s"] for r in rows], "s--", label="planner (predicted)")
    ax.set(xlabel="decode batch", ylabel="decode tokens/s", title="Planner vs engine, SmolLM2-135M fp32, this CPU")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(("PASS" if ok else "FAIL") + f": all within +-25%: {ok}; wrote {out}")


if __name__ == "__main__":
    main()
