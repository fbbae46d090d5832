"""Planner math against hand-checked numbers, plus its CLI and errors."""

import functools
import json
from pathlib import Path
import subprocess
import sys

import pytest
import yaml

from pagedserve.config import LOADABLE_QUANTIZATION, QUANTIZATION_METHODS
from pagedserve.planner.plan import Plan, PlanInputs, Workload
from pagedserve.planner.specs import ModelSpec, custom_hardware, get_hardware, load_model_spec

GiB = 2**30


def plan(model="llama-3-8b", gpu="H100-SXM", **kw):
    w = kw.pop("workload", Workload())
    return Plan(PlanInputs(model=load_model_spec(model), hw=get_hardware(gpu), workload=w, **kw))


def test_llama3_8b_memory_by_hand():
    m = load_model_spec("llama-3-8b")
    # 32 x (4096*(4096+2*1024) + 4096*4096 + 3*4096*14336 + 2*4096) + 2*128256*4096 + 4096
    assert m.total_params == 8_030_261_248
    assert m.weight_bytes("fp16") == pytest.approx(16.06e9, rel=1e-3)  # "16 GB"
    assert m.kv_bytes_per_token("fp16") == 128 * 1024  # 2 x 32 x 8 x 128 x 2 bytes
    # fp8 KV halves it, plus the engine's float32 scale per (token, kv head) row: 2 x 32 x 8 x (128 + 4)
    assert m.kv_bytes_per_token("fp8") == m.kv_bytes_per_token("int8") == 67584
    p = plan(weight_dtype="fp16", kv_dtype="fp8")
    assert p.memory["kv_bytes_per_token"] == 67584 and p.memory["kv_bytes_per_block"] == 67584 * 16
    # KV budget on one H100, whose "80 GB" the device reports as 81,559 MiB = 85.52e9 bytes:
    # 85.52 x 0.9 - 16.06 GB weights - 5% reserve (4.28) = 56.63 GB
    dev = 81559 * 2**20
    assert p.memory["device_memory_bytes"] == dev
    assert p.memory["kv_budget_bytes"] == pytest.approx(dev * 0.9 - 16.06e9 - dev * 0.05, rel=1e-3)
    assert p.memory["max_seqs_at_max_model_len"] == int(p.memory["kv_budget_bytes"] // (67584 * 8192))


def test_device_memory_as_devices_report_it():
    """A 70B model in bf16 fits two H100s by the memory nvidia-smi reports (81,559 MiB each), with
    room for KV; by the datasheet's decimal 80 GB it would not (the plan said 4). Where the catalog
    has no reported figure the datasheet's GB stays (the smaller, safe side), and the notes say
    which was used."""
    import dataclasses

    h100 = get_hardware("H100-SXM")
    assert h100.memory_mib == 81559 and "nvidia-smi" in h100.memory_source
    p = Plan(PlanInputs(model=load_model_spec("llama-3-70b"), hw=h100, workload=Workload(), weight_dtype="bf16"))
    assert p.memory["min_tp"] == 2 and p.memory["device_memory_bytes"] == 81559 * 2**20
    tokens = p.memory["kv_budget_bytes"] / p.memory["kv_bytes_per_token"] if p.memory["tp"] == 2 else 0
    assert tokens > 8000
    datasheet = dataclasses.replace(h100, memory_mib=None)
    q = Plan(PlanInputs(model=load_model_spec("llama-3-70b"), hw=datasheet, workload=Workload(), weight_dtype="bf16"))
    assert q.memory["min_tp"] > 2 and q.memory["device_memory_bytes"] == 80e9
    assert any("81,559 MiB as the device reports it" in t for s, t in p.explain if s == "memory")
    assert any("datasheet's 80 GB" in t for s, t in q.explain if s == "memory")
    # every catalog GPU: the reported figure, where present, is at least the datasheet's
    from pagedserve.planner.specs import load_catalog

    for hw in load_catalog().values():
        assert hw.memory_mib is None or (hw.memory_bytes >= hw.memory_gb * 1e9 and hw.memory_source)
    assert custom_hardware("memory_mib=23028,bandwidth_gbs=600,bf16_tflops=125").memory_bytes == 23028 * 2**20


def test_awq_int4_8b_is_about_5_gb():
    # Linear layers at 4 bits + a 16-bit scale and zero per 128 weights; embeddings stay fp16.
    b = load_model_spec("llama-3-8b").weight_bytes("awq")
    assert 5.0e9 <= b <= 6.0e9  # 6.98B x 4.25/8 + 1.05B x 2 = 5.81 GB (published AWQ checkpoints: ~5.7 GB)


def test_a10_ops_per_byte_from_datasheet():
    a10 = get_hardware("A10")
    assert a10.ops_per_byte == pytest.approx(125e12 / 600e9)  # 208 FLOP/B
    assert plan(gpu="A10").roofline["ops_per_byte"] == pytest.approx(208.33, abs=0.01)


def test_70b_bf16_does_not_fit_one_80gb_gpu():
    p1 = plan("llama-3-70b", "H100-SXM", tp=1)
    assert not p1.memory["fits"] and p1.memory["weight_bytes"] > 140e9
    p = plan("llama-3-70b", "H100-SXM")
    assert p.memory["min_tp"] >= 2 and p.memory["fits"] and p.memory["tp"] == p.memory["min_tp"]
    # The server takes the degree as vLLM spells it (and parses it: test below).
    assert p.flags["--tensor-parallel-size"] == p.memory["tp"] and not p.not_servable
    # quantized weights are dequantized on GPUs (and to be split): said, not hidden
    for tp in (1, 2):
        assert any("dequantizes them to bf16" in w for w in plan("llama-3-70b", "H100-SXM", weight_dtype="awq",
                                                                   tp=tp).not_servable)


@pytest.mark.parametrize("weights", ["fp32", "bf16", "fp16", "fp8", "int8", "awq", "gptq"])
@pytest.mark.parametrize("kv", [None, "fp32", "bf16", "fp16", "fp8", "int8"])
def test_every_recommended_flag_is_one_the_server_takes(weights, kv):
    """Parsed by the server's own CLI parser and accepted by its config; what it cannot do is
    named in not_servable (never emitted as a flag)."""
    from pagedserve.cli import build_parser
    from pagedserve.config import EngineConfig

    p = plan("llama-3-70b", "H100-SXM", weight_dtype=weights, kv_dtype=kv)
    argv = [str(x) for k, v in p.flags.items() for x in (k, v)]
    args = build_parser().parse_args(["serve", *argv])
    EngineConfig(dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype, max_model_len=args.max_model_len,
                 gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
                 quantization=args.quantization, tensor_parallel_size=args.tensor_parallel_size)
    assert args.tensor_parallel_size == p.memory["tp"]
    if weights in ("fp8", "int8", "awq", "gptq"):  # spelled as the server (and vLLM) spell the method
        method = Plan.WEIGHT_QUANTIZATION[weights]
        assert method in QUANTIZATION_METHODS and method in LOADABLE_QUANTIZATION
        assert p.flags["--quantization"] == method and not any("--quantization" in w for w in p.not_servable)
    if kv in ("int8", "fp8"):  # the scaled 1-byte caches, spelled as the server (and vLLM) spell them
        assert p.flags["--kv-cache-dtype"] == kv and not any("KV" in w for w in p.not_servable)


def test_kv_dtype_flag_is_one_the_engine_takes():
    """A KV dtype other than the engine's default shows up as --kv-cache-dtype, spelled so that
    `pagedserve serve` accepts it (16-bit KV under fp32 weights halves the bytes per token)."""
    from pagedserve.config import EngineConfig

    p32, p16 = plan(weight_dtype="fp32"), plan(weight_dtype="fp32", kv_dtype="fp16")
    assert "--kv-cache-dtype" not in p32.flags and "--kv-cache-dtype" not in plan(weight_dtype="bf16").flags
    assert p16.flags["--kv-cache-dtype"] == "float16"
    assert p16.memory["kv_bytes_per_token"] * 2 == p32.memory["kv_bytes_per_token"]
    assert plan(weight_dtype="fp32", kv_dtype="bf16").flags["--kv-cache-dtype"] == "bfloat16"
    for flags in (p16.flags, plan(weight_dtype="fp32", kv_dtype="bf16").flags):
        EngineConfig(kv_cache_dtype=flags["--kv-cache-dtype"])  # accepted


def test_moe_active_vs_total():
    m = load_model_spec("mixtral-8x7b")
    assert 46.0e9 < m.total_params < 47.5e9  # "46.7B"
    assert 12.5e9 < m.active_params < 13.0e9  # "12.9B active" (2 of 8 experts)
    p = plan("mixtral-8x7b", "H100-SXM", tp=2)
    # A batch of one touches 2 experts per layer; a big batch touches all 8.
    assert p._weights_read(1) < 0.4 * p._weights_read(256)
    untouched_embeddings = (m.vocab - 256) * m.hidden * 2  # a gather of 256 rows
    assert p._weights_read(256) == pytest.approx(p.memory["weight_bytes"] - untouched_embeddings, rel=1e-3)


def test_roofline_memory_then_compute_bound():
    p = plan()
    curve = {c["batch"]: c for c in p.roofline["curve"]}
    assert curve[1]["bound"] == "memory"
    # Batch 1 streams all weights once but one embedding row: t ~ 15 GB / (3.35 TB/s x 0.8) + overhead.
    m = p.inp.model
    weights = m.weight_bytes("bf16") - (m.vocab - 1) * m.hidden * 2
    assert curve[1]["t_memory"] == pytest.approx((weights + 600 * 131072) / (3350e9 * 0.8), rel=1e-3)
    tps = [curve[b]["tokens_per_s"] for b in sorted(curve)]
    assert all(b >= a for a, b in zip(tps, tps[1:]))  # more batch, more throughput
    # H100: ridge ~ 989e12*0.6 / (3350e9*0.8) = 221 FLOP/B; intensity ~ 2 x B at small B.
    assert p.roofline["achievable_ridge"] == pytest.approx(989e12 * 0.6 / (3350e9 * 0.8))


def test_capacity_scales_with_users_and_latency_target():
    small = plan(workload=Workload(daily_users=1_000))
    big = plan(workload=Workload(daily_users=2_000_000))
    assert big.capacity["replicas"] > small.capacity["replicas"] >= 1
    assert big.capacity["replicas"] == -(-big.capacity["peak_rps"] // big.capacity["requests_per_s_per_replica"])
    tight = plan(workload=Workload(itl_target_s=0.012))
    loose = plan(workload=Workload(itl_target_s=0.2))
    assert tight.capacity["batch"] < loose.capacity["batch"]
    assert tight.capacity["itl_s"] <= 0.012
    hopeless = plan(gpu="T4", weight_dtype="awq", workload=Workload(itl_target_s=0.001))
    assert not hopeless.capacity["feasible"] and "inter-token" in hopeless.capacity["reason"]


def test_cost_and_crossover():
    prices = {"api": {"input": 3.0, "output": 15.0}}
    p = plan(api_prices=prices, gpu_hourly_price=2.0, workload=Workload(daily_users=10))
    cost = p.cost
    assert cost["monthly_usd"] == pytest.approx(p.capacity["replicas"] * 2.0 * 730)
    x = cost["api"]["api"]["crossover_daily_users"]
    assert x is not None
    assert p._monthly_self_host(x) <= p._monthly_api(x, prices["api"])
    assert p._monthly_self_host(x * 0.98) > p._monthly_api(x * 0.98, prices["api"])
    with_ops = plan(api_prices=prices, gpu_hourly_price=2.0, ops_fte=0.5, workload=Workload(daily_users=10))
    assert with_ops.cost["monthly_usd"] == pytest.approx(cost["monthly_usd"] + 0.5 * 200_000 / 12)
    assert with_ops.cost["api"]["api"]["crossover_daily_users"] > x


@pytest.mark.parametrize("kwargs, match", [
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
    (dict(weight_dtype="int3"), "weight dtype"),
    (dict(kv_dtype="int2"), "KV cache dtype"),
    (dict(tp=3), "tensor-parallel"),
    (dict(max_model_len=100), "max_model_len"),
    (dict(workload=Workload(daily_users=-5)), "daily_users"),
    (dict(workload=Workload(peak_factor=0.5)), "peak_factor"),
    (dict(workload=Workload(daily_users=float("inf"))), "daily_users must be a finite number"),
    (dict(workload=Workload(daily_users=float("nan"))), "daily_users must be a finite number"),
    (dict(workload=Workload(itl_target_s=float("nan"))), "itl_target_s"),
    (dict(gpu_hourly_price=float("inf")), "gpu_hourly_price"),
    (dict(ops_fte=-1), "ops_fte"),
    (dict(api_prices={"x": {"input": 1.0}}), "x.output"),
    (dict(api_prices={"x": {"input": float("nan"), "output": 1}}), "x.input"),
])
def test_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan(**kwargs)


def test_unknown_gpu_and_bad_config(tmp_path):
    with pytest.raises(ValueError, match="known: .*H100-SXM"):
        get_hardware("RTX-9090")
    with pytest.raises(ValueError, match="intermediate_size"):
        ModelSpec.from_config({"num_hidden_layers": 2, "hidden_size": 8, "num_attention_heads": 2, "vocab_size": 10})
    with pytest.raises(ValueError, match="bandwidth_gbs"):
        custom_hardware("memory_gb=24,bf16_tflops=100")
    with pytest.raises(ValueError, match="unknown key 'bandwith_gbs'"):  # a typo is an error, not ignored
        custom_hardware("memory_gb=24,bandwith_gbs=600,bf16_tflops=100")
    with pytest.raises(ValueError, match="must be a finite number"):
        custom_hardware("memory_gb=24,bandwidth_gbs=inf,bf16_tflops=100")
    with pytest.raises(ValueError, match="must be a number"):
        custom_hardware("memory_gb=lots,bandwidth_gbs=600,bf16_tflops=100")
    with pytest.raises(ValueError, match="> 0"):
        custom_hardware("memory_gb=24,bf16_tflops=100,bandwidth_gbs=-1")


def test_cli_json_plot_helm(tmp_path, tiny_dirs):
    png, values = tmp_path / "roof.png", tmp_path / "values.yaml"
    out = subprocess.run([sys.executable, "-m", "pagedserve.cli", "plan", str(tiny_dirs["qwen2"] / "config.json"),
                          "--gpu", "L4", "--json", "--plot", str(png), "--helm-values", str(values)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout)
    assert data["hardware"] == "L4" and data["memory"]["fits"] and data["capacity"]["replicas"] >= 1
    assert any("KV per token" in e["formula"] for e in data["explain"])
    assert png.stat().st_size > 10_000
    v = yaml.safe_load(values.read_text())
    (m,) = v["models"]
    assert m["gpu"]["count"] == 1 and m["engineArgs"]["max-num-seqs"] == data["flags"]["--max-num-seqs"]
    assert m["source"] == {"type": "pvc", "claimName": "models", "path": "config.json"} or m["source"]["type"] == "pvc"
    # The values render with this repo's chart, and the engine's flags parse with the server's CLI.
    import shutil

    from pagedserve.cli import build_parser

    helm = shutil.which("helm")
    assert helm, "helm comes from scripts/tools.sh (scripts/test.sh puts it on PATH)"
    chart = Path(__file__).resolve().parent.parent / "deploy/helm/pagedserve"
    r = subprocess.run([helm, "template", "plan", str(chart), "-f", str(values)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    dep = next(d for d in yaml.safe_load_all(r.stdout) if d and d["kind"] == "Deployment")
    args = build_parser().parse_args(dep["spec"]["template"]["spec"]["containers"][0]["args"])
    assert args.max_num_seqs == data["flags"]["--max-num-seqs"]
    bad = subprocess.run([sys.executable, "-m", "pagedserve.cli", "plan", "llama-3-8b", "--gpu", "nope"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown hardware" in bad.stderr
    table = subprocess.run([sys.executable, "-m", "pagedserve.cli", "plan", "llama-3-70b", "--gpu", "A10", "--tp", "1",
                            "--explain"], capture_output=True, text=True, timeout=60)
    assert table.returncode == 3 and "NO" in table.stdout and "How it was computed" in table.stdout


def test_measure_this_machine(default_model_dir):
    from pagedserve.planner.specs import measure_this_machine

    # A real model's shapes (two layers under this budget, plus its 113 MB head): a tiny model's
    # weights sit in cache, where M=1 is not bandwidth-bound and batching amortizes little.
    spec = load_model_spec(str(default_model_dir / "config.json"))
    hw = measure_this_machine(spec, budget_bytes=16 << 20)
    assert hw.bf16_tflops > 0.005 and hw.bandwidth_gbs > 0.5 and hw.memory_gb > 1
    curve = dict(hw.measured["linear_curve"])
    assert sorted(curve) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    # Batching amortizes the weights: time per row at M=512 is far below time at M=1.
    assert curve[512] / 512 < curve[1] / 2
    assert len(hw.measured["layer_elementwise_curve"]) == 10
    # One layer's host cost (Python, dispatches) at one token: above a bare op dispatch, and above
    # the elementwise kernels alone at one token, which it includes. The margin is 2x, not more:
    # with the C++ layer loop a layer is a few dispatches, and a loaded CI box once measured 4.4x.
    assert hw.measured["layer_host_s"] > 2 * hw.measured["op_dispatch_s"]
    assert hw.measured["layer_host_s"] > hw.measured["layer_elementwise_curve"][0][1]
    p = Plan(PlanInputs(model=spec, hw=hw, weight_dtype="fp32", max_model_len=2048))
    assert p.memory["fits"]
    tps = [c["tokens_per_s"] for c in p.roofline["curve"]]
    assert tps[0] > 0 and max(tps) > 4 * tps[0]


def test_measured_step_time_adds_layer_host_cost_and_logit_reads():
    """With a measured machine, a decode step = linear curve + attention + per-layer elementwise
    work + each layer's host cost at one token (layer_host_s, net of the one-token elementwise
    time it contains) + reading the logits once to sample (at the streaming bandwidth)."""
    from dataclasses import replace

    from pagedserve.planner.specs import HardwareSpec

    spec = load_model_spec("default")
    measured = {"matmul_tflops": 0.2, "weight_stream_gbs": 16.0, "op_dispatch_s": 4e-6, "kv_read_gbs": 20.0,
                "linear_curve": [(1, 4e-11), (512, 2e-12)], "layer_elementwise_curve": [(1, 1e-5), (512, 1e-3)]}
    hw = HardwareSpec(name="m", memory_gb=24, bandwidth_gbs=16.0, fp32_tflops=0.2, bf16_tflops=0.2, fp8_tflops=None,
                      int8_tops=None, usd_per_hour=0.0, source="test", compute_efficiency=1.0,
                      bandwidth_efficiency=1.0, step_overhead_s=0.0, measured=measured)

    def step(h, batch):
        plan = Plan(PlanInputs(model=spec, hw=h, weight_dtype="fp32", max_model_len=2048))
        return plan.step_time(batch, 100)["t_step"]

    with_host = replace(hw, measured={**measured, "layer_host_s": 1e-4})
    assert step(with_host, 8) - step(hw, 8) == pytest.approx(spec.layers * (1e-4 - 1e-5))
    # The logit read: halving the bandwidth doubles it (the curves set every other term here).
    slow = replace(hw, bandwidth_gbs=8.0)
    assert step(slow, 64) - step(hw, 64) == pytest.approx(64 * spec.vocab * 4 / 16e9)


@functools.cache
def _catalog_plans(dtypes=("fp32", "bf16", "fp8", "awq")) -> list:
    """Every catalog model x GPU x weight dtype x peak factor 1 and 3, with the built-in API prices
    (issue 29's sweep)."""
    from pagedserve.planner.specs import HERE, load_catalog

    prices = yaml.safe_load((HERE / "prices.yaml").read_text())
    models = list(yaml.safe_load((HERE / "known_models.yaml").read_text()))
    return [plan(m, gpu, weight_dtype=dtype, api_prices=prices, workload=Workload(peak_factor=peak))
            for m in models for gpu in load_catalog() for dtype in dtypes for peak in (1.0, 3.0)]


def test_cheaper_intervals_are_exact_against_a_brute_force_scan():
    """Self-hosting rises in replica steps, the API bill in a line: it can be cheaper, dearer, and
    cheaper again. Every interval the plan reports agrees, at 600 user counts from 1 to 10^8, with
    comparing the two monthly costs directly; the crossover is where it first gets cheaper."""
    import numpy as np

    users = np.geomspace(1, 1e8, 600)
    checked = with_gaps = 0
    for p in [p for p in _catalog_plans() if p.inp.weight_dtype in ("bf16", "awq")]:
        own = {u: p._monthly_self_host(u) for u in users}  # the same for every price row
        for name, prices in p.inp.api_prices.items():
            spans, total = p.cheaper_intervals(prices)
            if total > len(spans):  # the full list, for the check
                p.MAX_LISTED_INTERVALS = total + 1
                spans, total = p.cheaper_intervals(prices)
            assert len(spans) == total
            with_gaps += total > 1
            edges = [e for s in spans for e in s if e is not None]
            for u in users:
                if any(abs(u - e) <= 1e-9 * e for e in edges):
                    continue  # on a boundary either answer is right
                direct = own[u] <= p._monthly_api(u, prices)
                listed = any(lo <= u and (hi is None or u <= hi) for lo, hi in spans)
                assert direct == listed, (p.inp.model.name, p.inp.hw.name, name, u, spans[:3])
            x = p.cost["api"][name]["crossover_daily_users"]
            first = next((u for u in users if own[u] <= p._monthly_api(u, prices)), None)
            assert (x is None) == (not spans) and (first is None or x <= first * (1 + 1e-9))
            if x is not None:  # cheaper just after it, dearer just before (the scan may step over a narrow span)
                assert p._monthly_self_host(x * (1 + 1e-9)) <= p._monthly_api(x * (1 + 1e-9), prices)
                assert x <= 1 or p._monthly_self_host(x * (1 - 1e-9)) > p._monthly_api(x * (1 - 1e-9), prices)
            checked += 1
    assert checked > 300 and with_gaps > 0


def test_the_a10_example_crossover():
    """Issue 29's example: one A10 is cheaper than gpt-4o-mini just under one replica's capacity
    (~9–10k daily users; the old bisection landed on a flip near 74k), dearer again once a second
    replica is needed, and so on, then cheaper for good."""
    from pagedserve.planner.specs import HERE

    p = plan("llama-3-8b", "A10", api_prices=yaml.safe_load((HERE / "prices.yaml").read_text()))
    v = p.cost["api"]["gpt-4o-mini"]
    (lo, hi), last = v["cheaper_daily_users"][0], v["cheaper_daily_users"][-1]
    assert 8000 < v["crossover_daily_users"] == lo < hi < 12000 and v["cheaper_intervals_total"] > 3
    assert last[1] is None and last[0] > 50000


def test_plan_json_is_valid_json_against_its_schema():
    import jsonschema

    from pagedserve.planner.specs import HERE

    schema = json.loads((HERE / "plan.schema.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)  # once: jsonschema.validate re-checks the schema on every call
    validator = cls(schema)
    nulls = 0
    for p in _catalog_plans():
        doc = json.loads(json.dumps(p.to_json(), allow_nan=False))  # raises on Infinity / NaN
        validator.validate(doc)
        nulls += len(doc["nulls"])
        for path, why in doc["nulls"].items():
            assert why and path
    assert nulls > 0  # the sweep has plans that never turn compute-bound or do not fit
    r = subprocess.run([sys.executable, "-m", "pagedserve.cli", "plan", "llama-3-70b", "--gpu", "A10", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    jsonschema.validate(json.loads(r.stdout), schema)
    assert "Infinity" not in r.stdout and "NaN" not in r.stdout


def test_decode_reads_embedding_rows_not_the_table():
    """An untied input embedding is a gather of B rows per step (issue 29: counting the whole table
    made an 8B model's decode ~6% slower than it is); a tied one is read whole as the output head."""
    p = plan("llama-3-8b")
    m = p.inp.model
    table = m.vocab * m.hidden * 2
    assert not m.tied_embeddings and table / m.weight_bytes("bf16") == pytest.approx(0.065, abs=0.005)
    assert p._weights_read(1) == pytest.approx(m.weight_bytes("bf16") - table + m.hidden * 2)
    tied = plan("smollm2-135m")
    assert tied.inp.model.tied_embeddings and tied._weights_read(8) == tied.inp.model.weight_bytes("bf16")


def test_tensor_parallel_all_reduces_cost_time_and_more_over_pcie():
    """Two all-reduces per layer of B x hidden x 2 bytes, a ring over tp GPUs across the catalog's
    interconnect (NVLink 4: 900 GB/s both ways; PCIe Gen5: 128): issue 29 found TP assumed free."""
    nv, pcie = plan("llama-3-70b", "H100-SXM", tp=2), plan("llama-3-70b", "H100-PCIe", tp=2)
    one = plan("llama-3-8b", "H100-SXM")
    assert one.memory["tp"] == 1 and one.step_time(64)["t_comm"] == 0
    m = nv.inp.model
    bytes_256 = 256 * m.hidden * 2
    assert nv.step_time(256)["t_comm"] == pytest.approx(2 * m.layers * (10e-6 + bytes_256 / 450e9))
    assert pcie.step_time(256)["t_comm"] == pytest.approx(2 * m.layers * (10e-6 + bytes_256 / 64e9))
    assert pcie.step_time(256)["t_comm"] > 3 * nv.step_time(256)["t_comm"]
    s = nv.step_time(256)
    assert s["t_step"] == pytest.approx(max(s["t_compute"], s["t_memory"]) + s["t_comm"] + nv.inp.hw.step_overhead_s)
    assert any("all-reduces per layer" in f for _, f in nv.explain)


def test_prefill_is_batched_as_the_engine_schedules_it():
    """Under load, prompts share steps of --max-num-batched-tokens: a short prompt's share of engine
    time is its tokens' part of a full step (the weight read amortized), not a step of its own;
    alone (TTFT) it is still its own steps, in chunks of the budget. Short prompts on a
    memory-bound GPU gain the most; the budget reaches the server's flags when not the default."""
    from pagedserve.planner.plan import Workload

    short = plan("llama-3-8b", "L4", workload=Workload(input_tokens=40, output_tokens=200, itl_target_s=0.2))
    share, alone = short.capacity["prefill_share_s"], short.capacity["ttft_s"]
    assert share < alone / 5  # 40 tokens alone read all the weights; batched, 40/2048 of a step's read
    step = short._prefill_step(2048)
    assert share == pytest.approx(40 / 2048 * step + short._attention_prefill(40))
    assert alone == pytest.approx(short._prefill_step(40) + short._attention_prefill(40))
    long = plan("llama-3-8b", "L4", workload=Workload(input_tokens=5000, output_tokens=200, itl_target_s=0.2))
    assert long.capacity["ttft_s"] == pytest.approx(2 * long._prefill_step(2048) + long._prefill_step(904)
                                                    + long._attention_prefill(5000))
    small_budget = plan("llama-3-8b", "L4", max_num_batched_tokens=256,
                        workload=Workload(input_tokens=40, itl_target_s=0.2))
    assert small_budget.flags["--max-num-batched-tokens"] == 256 and "--max-num-batched-tokens" not in short.flags
    assert small_budget.capacity["prefill_share_s"] > share  # a smaller step amortizes the weights over fewer tokens
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        plan(max_num_batched_tokens=0)
