"""The GPU math: memory, KV cache, roofline, capacity and cost, each step with its formula.

Everything here is plain arithmetic over ModelSpec and HardwareSpec; `Plan.explain` records every
formula with its numbers, which `pagedserve plan --explain` prints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from pagedserve.config import (DEFAULT_MAX_NUM_BATCHED_TOKENS, DTYPES, LOADABLE_QUANTIZATION, RUNTIME_RESERVE_FRACTION,
                               SCALED_KV_DTYPES)
from pagedserve.planner.specs import KV_BYTES, WEIGHT_BITS, HardwareSpec, ModelSpec

GB = 1e9
OPS_PER_LAYER = 45  # torch ops our decoder layer issues per step (norms, projections, rope, attention)
OPS_PER_STEP = 60  # embedding, final norm, head, sampler


def _interp_loglog(curve: list, x: float, extrapolate: bool = True) -> float:
    """Interpolate a measured (batch, value) curve in log-log space, clamped below the first point
    and (extrapolate) growing linearly in x past the last one."""
    xs = [c[0] for c in curve]
    if x <= xs[0]:
        return curve[0][1]
    if x >= xs[-1]:
        return curve[-1][1] * (x / xs[-1] if extrapolate else 1.0)
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            f = math.log(x / x0) / math.log(x1 / x0)
            return math.exp(math.log(y0) + f * (math.log(y1) - math.log(y0)))
    return curve[-1][1]
HOURS_PER_MONTH = 730
TP_DEGREES = (1, 2, 4, 8)


@dataclass
class Workload:
    kind: str = "chat"  # chat: latency-bound; batch: throughput-bound
    daily_users: float = 1000
    requests_per_user: float = 10
    input_tokens: int = 500
    output_tokens: int = 200
    peak_factor: float = 3.0
    ttft_target_s: float = 1.0
    itl_target_s: float = 0.05

    def validate(self) -> None:
        if self.kind not in ("chat", "batch"):
            raise ValueError(f"workload must be 'chat' or 'batch', got {self.kind!r}")
        for name in ("daily_users", "requests_per_user", "peak_factor", "ttft_target_s", "itl_target_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):  # nan and inf fail here too
                raise ValueError(f"{name} must be a finite number > 0, got {v}")
        if self.input_tokens < 1 or self.output_tokens < 1:
            raise ValueError("input and output tokens per request must be >= 1")
        if self.peak_factor < 1:
            raise ValueError(f"peak_factor is peak / average traffic and must be >= 1, got {self.peak_factor}")


@dataclass
class PlanInputs:
    model: ModelSpec
    hw: HardwareSpec
    weight_dtype: str = "bf16"
    kv_dtype: str | None = None  # None: same as weights (16-bit for quantized weights)
    max_model_len: int = 8192
    gpu_memory_utilization: float = 0.9
    tp: int | None = None  # None: the smallest that fits
    workload: Workload = field(default_factory=Workload)
    gpu_hourly_price: float | None = None
    api_prices: dict[str, dict[str, float]] = field(default_factory=dict)
    ops_fte: float = 0.0
    fte_annual_usd: float = 200_000
    max_num_seqs_cap: int = 512
    # the engine's step budget on a GPU (--max-num-batched-tokens): prompts are prefilled in
    # steps of this many tokens, several prompts sharing a step's weight read
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS["cuda"]

    def validate(self) -> None:
        if self.weight_dtype not in WEIGHT_BITS:
            raise ValueError(f"weight dtype must be one of {sorted(WEIGHT_BITS)}, got {self.weight_dtype!r}")
        if self.kv_dtype is not None and self.kv_dtype not in KV_BYTES:
            raise ValueError(f"KV cache dtype must be one of {sorted(KV_BYTES)}, got {self.kv_dtype!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.tp is not None and self.tp not in TP_DEGREES:
            raise ValueError(f"tensor-parallel degree must be one of {TP_DEGREES}, got {self.tp}")
        if self.workload.input_tokens + self.workload.output_tokens > self.max_model_len:
            raise ValueError(f"input + output tokens ({self.workload.input_tokens + self.workload.output_tokens}) "
                             f"exceed max_model_len ({self.max_model_len})")
        for name in ("ops_fte", "fte_annual_usd", "gpu_hourly_price"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        for api, prices in self.api_prices.items():
            for k in ("input", "output"):
                v = prices.get(k) if isinstance(prices, dict) else None
                if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                    raise ValueError(f"API price {api}.{k} ($ per million tokens) must be a finite number >= 0, got {v!r}")
        self.workload.validate()


class Plan:
    def __init__(self, inp: PlanInputs):
        inp.validate()
        self.inp = inp
        self.explain: list[tuple[str, str]] = []  # (section, formula with numbers)
        m, hw = inp.model, inp.hw
        self.kv_dtype = inp.kv_dtype or ("fp32" if inp.weight_dtype == "fp32" else "bf16")
        self.memory = self._memory(m, hw)
        self.tp = self.memory["tp"]
        self.roofline = self._roofline(m, hw)
        self.capacity = self._capacity()
        self.cost = self._cost()
        self.flags = self._flags()

    def _note(self, section: str, text: str) -> None:
        self.explain.append((section, text))

    # -- memory ----------------------------------------------------------------------------
    def _memory(self, m: ModelSpec, hw: HardwareSpec) -> dict:
        inp = self.inp
        wbytes = m.weight_bytes(inp.weight_dtype)
        kv_tok = m.kv_bytes_per_token(self.kv_dtype)
        self._note("memory", f"weights = layers' params x {WEIGHT_BITS[inp.weight_dtype]} bits/8 + embeddings x 2 B "
                             f"= {m.layer_params / 1e9:.2f}B x {WEIGHT_BITS[inp.weight_dtype] / 8:g} + "
                             f"{(m.embedding_params + m.hidden) / 1e9:.2f}B x {4 if inp.weight_dtype == 'fp32' else 2} "
                             f"= {wbytes / GB:.2f} GB")
        dev = hw.memory_bytes  # as the device reports it (hardware.yaml memory_mib), else the datasheet's GB
        self._note("memory", f"device memory = {dev / GB:.2f} GB (" + (
            f"{hw.memory_mib:,.0f} MiB as the device reports it: {hw.memory_source}" if hw.memory_mib else
            f"the datasheet's {hw.memory_gb:g} GB; the device reports somewhat more") + ")")
        self._note("memory", f"KV per token = 2 x layers x kv_heads x head_dim x bytes = 2 x {m.layers} x "
                             f"{m.kv_heads} x {m.head_dim} x {KV_BYTES[self.kv_dtype]} = {kv_tok / 1024:.1f} KiB")

        def budget(tp: int) -> float:
            usable = dev * inp.gpu_memory_utilization
            reserve = dev * RUNTIME_RESERVE_FRACTION
            return tp * (usable - wbytes / tp - reserve)

        seq = kv_tok * inp.max_model_len
        fitting = [tp for tp in TP_DEGREES if budget(tp) >= seq]
        min_tp = fitting[0] if fitting else None
        tp = inp.tp or min_tp or TP_DEGREES[-1]
        kv_budget = budget(tp)
        fits = kv_budget >= seq
        avg_len = inp.workload.input_tokens + inp.workload.output_tokens
        self._note("memory", f"KV budget = TP x (memory x utilization - weights/TP - {RUNTIME_RESERVE_FRACTION:.0%} "
                             f"reserve) = {tp} x ({dev / GB:.2f} x {inp.gpu_memory_utilization:g} - "
                             f"{wbytes / GB / tp:.2f} - {dev / GB * RUNTIME_RESERVE_FRACTION:.2f}) GB "
                             f"= {kv_budget / GB:.2f} GB")
        max_seqs_full = max(0, int(kv_budget // seq))
        max_seqs_avg = max(0, int(kv_budget // (kv_tok * avg_len)))
        self._note("memory", f"max sequences = KV budget / (KV per token x length): at max_model_len "
                             f"{inp.max_model_len}: {max_seqs_full}; at the workload's {avg_len} tokens: {max_seqs_avg}")
        return {"weight_bytes": wbytes, "kv_bytes_per_token": kv_tok, "kv_bytes_per_block": kv_tok * 16,
                "kv_budget_bytes": kv_budget, "fits": fits, "min_tp": min_tp, "tp": tp,
                "max_seqs_at_max_model_len": max_seqs_full, "max_seqs_at_avg_len": max_seqs_avg,
                "device_memory_bytes": dev}

    # -- roofline --------------------------------------------------------------------------
    def step_time(self, batch: int, context: float | None = None) -> dict:
        """One decode step at `batch` sequences of average `context` tokens."""
        m, hw, inp = self.inp.model, self.inp.hw, self.inp
        ctx = context if context is not None else inp.workload.input_tokens + inp.workload.output_tokens / 2
        tp = self.memory["tp"]
        flops = 2 * m.active_params * batch + 4 * m.layers * m.heads * m.head_dim * ctx * batch
        weights = self._weights_read(batch)
        kv = batch * ctx * self.memory["kv_bytes_per_token"]
        peak = hw.peak_flops(inp.weight_dtype) * hw.compute_efficiency * tp
        bw = hw.bandwidth_gbs * GB * hw.bandwidth_efficiency * tp
        t_compute, t_memory = flops / peak, (weights + kv) / bw
        t_comm = self._tp_comm_s(batch)
        t = max(t_compute, t_memory) + t_comm + hw.step_overhead_s
        curve = hw.measured.get("linear_curve")
        if curve:  # measured machine: linear layers from the measured curve, attention on top
            attn_flops = 4 * m.layers * m.heads * m.head_dim * ctx * batch
            t_lin = weights * _interp_loglog(curve, batch) / tp
            t_compute = t_lin + attn_flops / peak
            t_memory = kv / bw
            other = hw.measured.get("layer_elementwise_curve")
            if other:  # measured per-layer elementwise work at this batch
                t_other = m.layers * _interp_loglog(other, batch, extrapolate=False) + OPS_PER_STEP * hw.measured["op_dispatch_s"]
                host = hw.measured.get("layer_host_s")
                if host is not None:  # each layer's host cost at one token, plus what batch adds to its elementwise work
                    t_other += m.layers * (host - other[0][1])
                # Sampling reads every sequence's logits once.
                t_other += batch * m.vocab * 4 / (hw.bandwidth_gbs * GB)
            else:
                t_other = (OPS_PER_LAYER * m.layers + OPS_PER_STEP) * hw.measured.get("op_dispatch_s", 0.0)
            kv_bw = hw.measured.get("kv_read_gbs", hw.bandwidth_gbs) * GB * tp
            t_memory = kv / kv_bw
            t = t_lin + max(attn_flops / peak, t_memory) + t_other
        return {"batch": batch, "flops": flops, "bytes": weights + kv, "intensity": flops / (weights + kv),
                "t_compute": t_compute, "t_memory": t_memory, "t_comm": t_comm, "t_step": t, "tokens_per_s": batch / t,
                "bound": "compute" if t_compute > t_memory else "memory"}

    def _tp_comm_s(self, tokens: int) -> float:
        """Tensor parallelism's all-reduces for `tokens` rows: two per layer (after attention's
        output projection and after the MLP), each of tokens x hidden x 2 bytes of activations."""
        m, tp = self.inp.model, self.memory["tp"]
        return 2 * m.layers * self.inp.hw.allreduce_s(tokens * m.hidden * 2, tp)

    def _weights_read(self, batch: int) -> float:
        """Bytes of weights one step reads. The input embedding is a gather of B rows, not a read
        of its table (a tied table is read whole anyway, as the output head). MoE: only the experts
        some token in the batch routes to, in expectation E x (1 - (1 - k/E)^B)."""
        m, dtype = self.inp.model, self.inp.weight_dtype
        total = m.weight_bytes(dtype)
        if not m.tied_embeddings:
            emb_bytes = 4 if dtype == "fp32" else 2
            total -= (m.vocab - min(batch, m.vocab)) * m.hidden * emb_bytes
        if not m.experts:
            return total
        per_expert = m.layers * 3 * m.hidden * m.expert_intermediate * WEIGHT_BITS[dtype] / 8
        touched = m.experts * (1 - (1 - m.experts_per_token / m.experts) ** batch)
        return total - (m.experts - touched) * per_expert

    def _prefill_step(self, tokens: int) -> float:
        """One step carrying `tokens` prompt tokens: max(GEMM FLOPs / peak, weights read / bandwidth)
        plus tensor parallel's all-reduces (attention's quadratic part: _attention_prefill)."""
        m, hw = self.inp.model, self.inp.hw
        peak = hw.peak_flops(self.inp.weight_dtype) * hw.compute_efficiency * self.memory["tp"]
        return (max(2 * m.active_params * tokens / peak,
                    self._weights_read(tokens) / (hw.bandwidth_gbs * GB * hw.bandwidth_efficiency * self.memory["tp"]))
                + self._tp_comm_s(tokens))

    def _attention_prefill(self, tokens: int) -> float:
        m, hw = self.inp.model, self.inp.hw
        peak = hw.peak_flops(self.inp.weight_dtype) * hw.compute_efficiency * self.memory["tp"]
        return 2 * m.layers * m.heads * m.head_dim * tokens**2 / peak

    def _prefill_time(self, tokens: int) -> float:
        """A prompt's prefill alone (its TTFT without queueing): chunks of the step budget, each its
        own step."""
        budget = self.inp.max_num_batched_tokens
        full, rest = divmod(tokens, budget)
        return full * self._prefill_step(budget) + (self._prefill_step(rest) if rest else 0) + self._attention_prefill(tokens)

    def _prefill_share(self, tokens: int) -> float:
        """A prompt's share of engine time under load, as the engine schedules prefill: prompts fill
        steps of max_num_batched_tokens together, so one step's weight read serves budget / tokens
        prompts; the GEMM FLOPs and each prompt's own attention are not shared."""
        budget = self.inp.max_num_batched_tokens
        return tokens / budget * self._prefill_step(budget) + self._attention_prefill(tokens)

    def _roofline(self, m: ModelSpec, hw: HardwareSpec) -> dict:
        inp = self.inp
        peak = hw.peak_flops(inp.weight_dtype) * hw.compute_efficiency
        bw = hw.bandwidth_gbs * GB * hw.bandwidth_efficiency
        ridge = peak / bw
        self._note("roofline", f"ops:byte of the hardware = peak / bandwidth = {hw.peak_flops(inp.weight_dtype) / 1e12:.1f} "
                               f"TFLOP/s / {hw.bandwidth_gbs:g} GB/s = {hw.peak_flops(inp.weight_dtype) / (hw.bandwidth_gbs * GB):.0f} FLOP/B "
                               f"(achievable: x{hw.compute_efficiency:g} compute, x{hw.bandwidth_efficiency:g} bandwidth -> {ridge:.0f})")
        batches = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512})
        curve = [self.step_time(b) for b in batches]
        # Decode turns compute-bound where 2 P B / peak = (W + B ctx kv) / bw.
        ctx = inp.workload.input_tokens + inp.workload.output_tokens / 2
        kv = self.memory["kv_bytes_per_token"]
        denom = 2 * m.active_params / peak - ctx * kv / bw
        crossover = (m.weight_bytes(inp.weight_dtype) / bw) / denom if denom > 0 else math.inf
        self._note("roofline", f"decode intensity at batch B = 2 x active params x B / (weights + B x context x KV/token); "
                               f"active params {m.active_params / 1e9:.2f}B, context {ctx:.0f}")
        self._note("roofline", "compute-bound from batch B* = (weights / bw) / (2 P / peak - ctx x kv / bw) = "
                               + (f"{crossover:.0f}" if math.isfinite(crossover) else "never (KV traffic grows as fast as compute)"))
        if hw.measured.get("linear_curve"):
            self._note("roofline", "measured machine: decode step = weights x linear time per byte at B (measured curve) "
                                   "+ max(attention FLOPs / peak, B x context x KV/token / measured KV read rate) "
                                   "+ layers x (elementwise at B + host cost of a layer at 1 token - elementwise at 1) "
                                   "+ B x vocab x 4 bytes of logits / bandwidth")
        if self.memory["tp"] > 1:
            self._note("roofline", f"tensor parallel {self.memory['tp']}: + 2 all-reduces per layer of B x hidden x 2 "
                                   f"bytes, each {hw.allreduce_latency_s * 1e6:.0f} us + 2 (tp - 1) / tp x bytes / "
                                   f"(interconnect {hw.interconnect_gbs or 64:g} GB/s / 2): "
                                   f"{self._tp_comm_s(1) * 1e3:.2f} ms per step at batch 1, "
                                   f"{self._tp_comm_s(256) * 1e3:.2f} ms at 256")
        ttft = self._prefill_time(inp.workload.input_tokens)
        self._note("roofline", f"prefill of {inp.workload.input_tokens} tokens alone = per step of at most "
                               f"{inp.max_num_batched_tokens} tokens max(2 P n / peak, weights / bw) + attention "
                               f"2 L H d n^2 / peak = {ttft * 1000:.1f} ms (TTFT without queueing)")
        return {"ops_per_byte": hw.peak_flops(inp.weight_dtype) / (hw.bandwidth_gbs * GB), "achievable_ridge": ridge,
                "compute_bound_from_batch": crossover, "curve": curve, "prefill_s": ttft}

    # -- capacity --------------------------------------------------------------------------
    def _capacity(self) -> dict:
        inp, w = self.inp, self.inp.workload
        kv_cap = min(self.memory["max_seqs_at_avg_len"], inp.max_num_seqs_cap)
        if kv_cap < 1:
            return {"batch": 0, "feasible": False, "reason": "not even one sequence fits the KV cache"}
        if w.kind == "batch":
            batch = kv_cap
        else:
            batch = 0
            for b in range(1, kv_cap + 1):
                if self.step_time(b)["t_step"] <= w.itl_target_s:
                    batch = b
                else:
                    break
        feasible = batch >= 1 and (w.kind == "batch" or self.roofline["prefill_s"] <= w.ttft_target_s)
        if batch == 0:
            st = self.step_time(1)
            return {"batch": 0, "feasible": False,
                    "reason": f"even batch 1 takes {st['t_step'] * 1000:.1f} ms per token, over the "
                              f"{w.itl_target_s * 1000:.0f} ms inter-token target"}
        st = self.step_time(batch)
        t_prefill = self._prefill_share(w.input_tokens)  # engine time per request, prompts batched
        ttft = self._prefill_time(w.input_tokens)
        # Each second, prefill takes r x t_prefill, decode steps the rest: r O = (1 - r t_prefill) B / t_step.
        dec_rate = batch / st["t_step"]
        req_rate = dec_rate / (w.output_tokens + t_prefill * dec_rate)
        avg_rps = w.daily_users * w.requests_per_user / 86400
        peak_rps = avg_rps * w.peak_factor
        replicas = max(1, math.ceil(peak_rps / req_rate))
        self._note("capacity", f"batch = largest B with step time <= ITL target {w.itl_target_s * 1000:.0f} ms "
                               f"(and <= KV capacity {kv_cap}): {batch}, step {st['t_step'] * 1000:.1f} ms"
                   if w.kind == "chat" else f"batch = KV capacity at the workload's length = {batch}")
        self._note("capacity", f"t_prefill = a prompt's share of engine time with prompts batched in steps of "
                               f"{inp.max_num_batched_tokens} tokens = tokens / budget x step(budget) + its attention = "
                               f"{t_prefill * 1000:.2f} ms (alone: {ttft * 1000:.2f} ms)")
        self._note("capacity", f"requests/s per replica = (B/t_step) / (output + t_prefill x B/t_step) = "
                               f"{dec_rate:.0f} / ({w.output_tokens} + {t_prefill:.3f} x {dec_rate:.0f}) = {req_rate:.2f}")
        self._note("capacity", f"peak requests/s = users x requests/user / 86400 x peak factor = {w.daily_users:g} x "
                               f"{w.requests_per_user:g} / 86400 x {w.peak_factor:g} = {peak_rps:.2f}; "
                               f"replicas = ceil({peak_rps:.2f} / {req_rate:.2f}) = {replicas}")
        return {"batch": batch, "feasible": feasible, "step_s": st["t_step"], "itl_s": st["t_step"],
                "ttft_s": ttft, "prefill_share_s": t_prefill, "output_tok_s_per_replica": req_rate * w.output_tokens,
                "requests_per_s_per_replica": req_rate, "avg_rps": avg_rps, "peak_rps": peak_rps,
                "replicas": replicas, "gpus": replicas * self.memory["tp"],
                "reason": None if feasible else f"prefill alone takes {ttft:.2f}s, over the TTFT target"}

    # -- cost ------------------------------------------------------------------------------
    def _monthly_self_host(self, daily_users: float) -> float:
        cap = self.capacity
        if not cap.get("batch"):
            return math.inf
        w = self.inp.workload
        peak_rps = daily_users * w.requests_per_user / 86400 * w.peak_factor
        replicas = max(1, math.ceil(peak_rps / cap["requests_per_s_per_replica"]))
        price = self.inp.gpu_hourly_price if self.inp.gpu_hourly_price is not None else self.inp.hw.usd_per_hour
        ops = self.inp.ops_fte * self.inp.fte_annual_usd / 12
        return replicas * self.memory["tp"] * price * HOURS_PER_MONTH + ops

    def _monthly_api(self, daily_users: float, prices: dict[str, float]) -> float:
        w = self.inp.workload
        reqs = daily_users * w.requests_per_user * 30.4
        return reqs * (w.input_tokens * prices["input"] + w.output_tokens * prices["output"]) / 1e6

    def _cost(self) -> dict:
        w, cap = self.inp.workload, self.capacity
        price = self.inp.gpu_hourly_price if self.inp.gpu_hourly_price is not None else self.inp.hw.usd_per_hour
        monthly = self._monthly_self_host(w.daily_users)
        reqs_month = w.daily_users * w.requests_per_user * 30.4
        tokens_month = reqs_month * (w.input_tokens + w.output_tokens)
        out = {"gpu_hourly_usd": price, "monthly_usd": monthly, "requests_per_month": reqs_month,
               "usd_per_million_tokens": monthly / (tokens_month / 1e6) if tokens_month else math.inf,
               "usd_per_million_output_tokens_at_capacity": (
                   price * self.memory["tp"] / 3600 / cap["output_tok_s_per_replica"] * 1e6
                   if cap.get("batch") else math.inf),
               "api": {}}
        self._note("cost", f"self-hosted $/month = replicas x GPUs/replica x ${price:g}/h x {HOURS_PER_MONTH} h"
                           + (f" + {self.inp.ops_fte:g} FTE x ${self.inp.fte_annual_usd:,.0f}/12" if self.inp.ops_fte else "")
                           + f" = ${monthly:,.0f} (provisioned for peak)")
        for name, prices in self.inp.api_prices.items():
            api_monthly = self._monthly_api(w.daily_users, prices)
            spans, total = self.cheaper_intervals(prices)
            out["api"][name] = {"monthly_usd": api_monthly, "crossover_daily_users": spans[0][0] if spans else None,
                                "cheaper_daily_users": [list(s) for s in spans], "cheaper_intervals_total": total}
        if self.inp.api_prices:
            self._note("cost", "API $/month = requests x (input tokens x $in + output tokens x $out) / 1e6, a line "
                               "through zero in daily users; self-hosted $/month is constant between replica steps "
                               "(one more replica each time the users one replica serves at peak are exceeded), so on "
                               "step r self-hosting costs no more than the API from (r x replica $ + ops $) / (API $ "
                               "per user) to the step's end: crossover = the first such point, and every such interval "
                               "is listed")
        return out

    MAX_LISTED_INTERVALS = 20

    def cheaper_intervals(self, prices: dict[str, float]) -> tuple[list[tuple[float, float | None]], int]:
        """Every daily-user interval where self-hosting costs no more than the API, in order (an
        upper end of None: from there on), at most MAX_LISTED_INTERVALS of them, and how many there
        are. Exact, not searched: replica r serves users in ((r - 1) U, r U] (U: the users one
        replica serves at peak), where self-hosting costs S_r = r C + O (C: a replica's $/month, O:
        operations) against the API's a x users; S_r <= a u from u = S_r / a."""
        cap, w = self.capacity, self.inp.workload
        a = self._monthly_api(1.0, prices)
        if not cap.get("batch") or a <= 0:
            return [], 0
        U = cap["requests_per_s_per_replica"] * 86400 / (w.requests_per_user * w.peak_factor)
        price = self.inp.gpu_hourly_price if self.inp.gpu_hourly_price is not None else self.inp.hw.usd_per_hour
        C = self.memory["tp"] * price * HOURS_PER_MONTH
        O = self.inp.ops_fte * self.inp.fte_annual_usd / 12
        slope = a * U - C  # how much more the API charges than a replica costs, per replica's worth of users
        if slope <= 0:  # each replica's users pay the API less than the replica costs: never cheaper
            return [], 0
        r0 = max(1, math.ceil(O / slope))  # the first step where self-hosting gets cheaper before its end
        r1 = max(r0, math.ceil((C + O) / slope))  # from here the next step starts cheaper too: no more gaps

        def start(r: int) -> float:
            return max((r - 1) * U, (r * C + O) / a)

        spans: list[tuple[float, float | None]] = [(start(r), r * U) for r in range(r0, min(r1, r0 + self.MAX_LISTED_INTERVALS - 1))]
        spans.append((start(r1), None))
        return spans, r1 - r0 + 1

    # -- recommendations -------------------------------------------------------------------
    # The planner's dtype names as the server spells them: config.DTYPES knows fp32/bf16/fp16, and
    # the 1-byte KV caches are the server's scaled int8 and fp8 (e4m3), spelled the same.
    SERVER_KV_DTYPES = {**DTYPES, **{d: d for d in SCALED_KV_DTYPES}}
    # The planner's quantized weight formats as checkpoints' methods (config.QUANTIZATION_METHODS):
    # a plan recommends `--quantization` only for a method the server loads (LOADABLE_QUANTIZATION).
    WEIGHT_QUANTIZATION = {"awq": "awq", "gptq": "gptq", "fp8": "fp8", "int8": "compressed-tensors",
                           "int4": "compressed-tensors"}

    def _flags(self) -> dict:
        """Flags of `pagedserve serve` for this plan: only ones the server accepts (tested by
        parsing them with its CLI); what the plan needs and the server cannot do yet goes into
        `not_servable` instead, so a plan never recommends a flag the server refuses."""
        inp = self.inp
        self.not_servable: list[str] = []
        f = {"--max-model-len": inp.max_model_len, "--gpu-memory-utilization": inp.gpu_memory_utilization,
             "--max-num-seqs": max(1, self.capacity.get("batch") or 1)}
        if inp.max_num_batched_tokens != DEFAULT_MAX_NUM_BATCHED_TOKENS["cuda"]:
            f["--max-num-batched-tokens"] = inp.max_num_batched_tokens
        if self.memory["tp"] > 1:
            f["--tensor-parallel-size"] = self.memory["tp"]
        if inp.weight_dtype in DTYPES:
            if inp.weight_dtype != "fp32":
                f["--dtype"] = DTYPES[inp.weight_dtype]
        else:  # the plan counts quantized bytes; the GPU path has no such kernels
            self.not_servable.append(f"{inp.weight_dtype} weights kept quantized on GPUs: pagedserve keeps quantized "
                                     "weights quantized on CPUs only; on a GPU it dequantizes them to bf16 at load, "
                                     "more memory than this plan counts")
            if (method := self.WEIGHT_QUANTIZATION[inp.weight_dtype]) in LOADABLE_QUANTIZATION:
                f["--quantization"] = method
            else:
                self.not_servable.append(f"{inp.weight_dtype} weights (--quantization {method}): pagedserve cannot "
                                         f"load them yet; it loads {', '.join(LOADABLE_QUANTIZATION)} checkpoints and "
                                         "float32/bfloat16/float16 weights")
        auto_kv = "fp32" if inp.weight_dtype == "fp32" else "bf16"
        if self.kv_dtype != auto_kv:
            if self.kv_dtype in self.SERVER_KV_DTYPES:
                f["--kv-cache-dtype"] = self.SERVER_KV_DTYPES[self.kv_dtype]
            else:
                self.not_servable.append(f"{self.kv_dtype} KV cache: pagedserve's KV cache is float32, float16, "
                                         "bfloat16, int8 or fp8 so far")
        for why in self.not_servable:
            self._note("flags", f"not servable by pagedserve yet: {why}")
        return f

    def helm_values(self, model_ref: str, served_name: str | None = None) -> dict:
        """Values for deploy/helm/pagedserve: one model entry with this plan's replicas, GPUs and
        engine flags (the chart renders them as the server's flags)."""
        import re

        name = re.sub(r"[^a-z0-9-]+", "-", Path(model_ref).name.lower()).strip("-")[:40] or "model"
        local = model_ref.startswith(("/", ".", "~")) or model_ref.count("/") != 1
        source = ({"type": "pvc", "claimName": "models", "path": Path(model_ref).name} if local
                  else {"type": "hub", "repo": model_ref, "storage": f"{max(10, int(self.memory['weight_bytes'] / 1e9 * 1.2))}Gi"})
        replicas = max(1, self.capacity.get("replicas", 1))
        entry = {"name": name, "servedModelName": served_name or Path(model_ref).name, "source": source,
                 "replicas": replicas, "gpu": {"count": self.memory["tp"], "resource": "nvidia.com/gpu"},
                 "engineArgs": {k.removeprefix("--"): v for k, v in self.flags.items()},
                 "autoscaling": {"mode": "hpa", "minReplicas": 1, "maxReplicas": replicas, "targetWaitingRequests": 4}}
        values = {"image": {"tag": "cuda"}, "models": [entry]}
        if self.not_servable:
            values["notServable"] = self.not_servable
        return values

    # Why a figure can be infinite, for the JSON's `nulls` (JSON has no Infinity).
    NULL_REASONS = {
        "compute_bound_from_batch": "never compute-bound: the KV reads grow as fast as the compute with the batch",
        "monthly_usd": "no replica can serve the workload (capacity.reason)",
        "usd_per_million_tokens": "no replica can serve the workload (capacity.reason)",
        "usd_per_million_output_tokens_at_capacity": "no replica can serve the workload (capacity.reason)",
    }

    def to_json(self) -> dict:
        """to_dict with every infinite or NaN figure as null, and `nulls`: each such field's path
        and why (valid JSON, plan.schema.json)."""
        nulls: dict[str, str] = {}

        def clean(x, path: str):
            if isinstance(x, float) and not math.isfinite(x):
                leaf = path.rsplit(".", 1)[-1]
                nulls[path] = self.NULL_REASONS.get(leaf, "infinite" if math.isinf(x) else "undefined")
                return None
            if isinstance(x, dict):
                return {k: clean(v, f"{path}.{k}" if path else str(k)) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [clean(v, f"{path}[{i}]") for i, v in enumerate(x)]
            return x

        out = clean(self.to_dict(), "")
        out["nulls"] = nulls
        return out

    def to_dict(self) -> dict:
        m = self.inp.model
        return {"model": {"name": m.name, "total_params": m.total_params, "active_params": m.active_params},
                "hardware": self.inp.hw.name, "weight_dtype": self.inp.weight_dtype, "kv_dtype": self.kv_dtype,
                "memory": self.memory, "roofline": self.roofline, "capacity": self.capacity, "cost": self.cost,
                "flags": self.flags, "not_servable": self.not_servable, "explain": [{"section": s, "formula": t} for s, t in self.explain]}
