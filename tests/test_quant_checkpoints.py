"""Quantized checkpoints (issue 25): a checkpoint in each supported layout, written here from the
layout's documented tensor names and bit packing (independently of the loader's own unpacking),
gives the log-probabilities of its dequantized float32 equivalent; `pagedserve quantize` output
reads back to the values it wrote; bad checkpoints are refused at load, by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedserve import LLM, SamplingParams

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT = list(range(100, 140))  # 40 token ids: prefill runs the float32 tile (exact to rounding)


def _logprobs(model_dir, **kw) -> torch.Tensor:
    llm = LLM(str(model_dir), dtype="float32", max_model_len=256, kv_cache_memory=16 << 20, **kw)
    (o,) = llm.generate([PROMPT], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0), use_tqdm=False)
    return torch.tensor([next(iter(e.values())).logprob for e in o.prompt_logprobs[1:]])


def _write(src, dst, tensors: dict, quant_config: dict | None):
    """A copy of the float model folder `src` with `tensors` as its weights."""
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg.pop("quantization_config", None)
    if quant_config:
        cfg["quantization_config"] = quant_config
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _pack_words(fields: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    """Documented int32 packing, written out: field i of each word at bit offset bits * i (low
    first); with `order`, field i holds logical position order[i] (AWQ)."""
    per = 32 // bits
    rows, cols = fields.shape
    out = torch.zeros(rows, cols // per, dtype=torch.int64)
    for i in range(per):
        src = order[i] if order else i
        out |= fields[:, src::per].to(torch.int64) << (bits * i)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def _int_weights(float_weights: dict, bits: int, group: int, asym: bool, seed: int):
    """For every projection: random integer weights near the float ones' scale -> (q [N, K] in
    0..2^bits-1, scale [N, G], zero [N, G]) and the float32 values they stand for."""
    g = torch.Generator().manual_seed(seed)
    parts, dense = {}, {}
    for name, w in float_weights.items():
        if name.split(".")[-2] not in PROJ:
            continue
        n, k = w.shape
        q = torch.randint(0, 2**bits, (n, k), generator=g)
        scale = (torch.rand(n, k // group, generator=g) * 0.01 + 0.005).half().float()  # fp16-exact
        zero = (torch.randint(1, 2**bits, (n, k // group), generator=g) if asym
                else torch.full((n, k // group), 2 ** (bits - 1)))
        parts[name] = (q, scale, zero)
        dense[name] = ((q.view(n, k // group, group) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(n, k)
    return parts, dense


def _compare(tiny, tmp_path, tensors, qc, dense, float_weights, atol=2e-3):
    qdir = _write(tiny, tmp_path / "quantized", tensors, qc)
    fdir = _write(tiny, tmp_path / "dequantized", {**float_weights, **dense}, None)
    got, want = _logprobs(qdir), _logprobs(fdir)
    assert (got - want).abs().max().item() < atol, (got - want).abs().max()
    return qdir


@pytest.fixture
def tiny(tiny_dirs):
    return tiny_dirs["llama"]


@pytest.fixture
def float_weights(tiny):
    return load_file(str(next(tiny.glob("*.safetensors"))))


def test_awq_gemm_layout(tiny, float_weights, tmp_path):
    order = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: the column in each nibble of a word
    parts, dense = _int_weights(float_weights, 4, 32, asym=True, seed=1)
    tensors = {k: v for k, v in float_weights.items() if k not in parts}
    for name, (q, scale, zero) in parts.items():
        m = name.removesuffix(".weight")
        tensors[f"{m}.qweight"] = _pack_words(q.T, 4, order)  # [K, N/8]
        tensors[f"{m}.qzeros"] = _pack_words(zero.T, 4, order)  # [K/G, N/8]
        tensors[f"{m}.scales"] = scale.T.half()  # [K/G, N]
    qc = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    qdir = _compare(tiny, tmp_path, tensors, qc, dense, float_weights)
    assert LLM(str(qdir), max_model_len=64, kv_cache_memory=8 << 20).engine.quantization == "awq"


@pytest.mark.parametrize("bits,act_order,v2", [(4, False, False), (8, False, False), (4, True, False), (4, False, True)])
def test_gptq_layout(tiny, float_weights, tmp_path, bits, act_order, v2):
    """qweight packed along K, qzeros stored minus one (v1) along N, g_idx; with act-order the
    groups are scattered over the input rows (one order per input: q/k/v share it, as GPTQ's
    Hessian order does)."""
    group = 32
    parts, dense = _int_weights(float_weights, bits, group, asym=True, seed=2)
    tensors = {k: v for k, v in float_weights.items() if k not in parts}
    g = torch.Generator().manual_seed(3)
    orders = {}
    for name, (q, scale, zero) in parts.items():
        m = name.removesuffix(".weight")
        n, k = q.shape
        shared = "qkv" if m.split(".")[-1] in ("q_proj", "k_proj", "v_proj") else \
            "gate_up" if m.split(".")[-1] in ("gate_proj", "up_proj") else m
        key = (m.rsplit(".", 2)[0], shared)
        if act_order and key not in orders:
            orders[key] = torch.randperm(k, generator=g)
        g_idx = (torch.arange(k) // group)[orders[key]] if act_order else torch.arange(k) // group
        # stored row k belongs to group g_idx[k]: scatter the dense weight's groups that way
        qk = torch.empty_like(q)
        for gi in range(k // group):
            rows = torch.nonzero(g_idx == gi).flatten()
            qk[:, rows] = q[:, gi * group:(gi + 1) * group]
        dense[name] = (qk - zero[:, g_idx]) * scale[:, g_idx]
        tensors[f"{m}.qweight"] = _pack_words(qk, bits).T.contiguous()  # [K*bits/32, N]: along K
        tensors[f"{m}.qzeros"] = _pack_words((zero.T - (0 if v2 else 1)).contiguous(), bits)  # [G, N*bits/32]
        tensors[f"{m}.scales"] = scale.T.half().contiguous()  # [G, N]
        tensors[f"{m}.g_idx"] = g_idx.to(torch.int32)
    qc = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order, "sym": False,
          **({"checkpoint_format": "gptq_v2"} if v2 else {})}
    _compare(tiny, tmp_path, tensors, qc, dense, float_weights)


@pytest.mark.parametrize("bits,asym", [(4, False), (4, True), (8, False)])
def test_compressed_tensors_layouts(tiny, float_weights, tmp_path, bits, asym):
    """pack-quantized (4-bit: weight_packed, weight_shape, packed zero points along N) and
    int-quantized (8-bit: an int8 weight), signed values, scales per group of 32."""
    group = 32
    parts, dense = _int_weights(float_weights, bits, group, asym=asym, seed=4)
    tensors = {k: v for k, v in float_weights.items() if k not in parts}
    half = 2 ** (bits - 1)
    for name, (q, scale, zero) in parts.items():
        m = name.removesuffix(".weight")
        signed, zsigned = q - half, zero - half
        if bits == 4:
            tensors[f"{m}.weight_packed"] = _pack_words(q, 4)  # value + 8, unsigned, along K
            tensors[f"{m}.weight_shape"] = torch.tensor(list(q.shape))
            if asym:
                tensors[f"{m}.weight_zero_point"] = _pack_words(zero.T.contiguous(), 4).T.contiguous()
        else:
            tensors[f"{m}.weight"] = signed.to(torch.int8)
            if asym:
                tensors[f"{m}.weight_zero_point"] = zsigned.to(torch.int8)
        tensors[f"{m}.weight_scale"] = scale.half()
    weights = {"num_bits": bits, "type": "int", "symmetric": not asym, "strategy": "group", "group_size": group}
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized" if bits == 4 else "int-quantized",
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}, "ignore": ["lm_head"]}
    qdir = _compare(tiny, tmp_path, tensors, qc, dense, float_weights)
    assert LLM(str(qdir), max_model_len=64, kv_cache_memory=8 << 20).engine.quantization == "compressed-tensors"


def test_fp8_weights_load_dequantized(tiny, float_weights, tmp_path, caplog):
    tensors, dense = {}, {}
    for name, w in float_weights.items():
        if name.split(".")[-2] in PROJ:
            scale = w.abs().amax(1, keepdim=True) / 448
            w8 = (w / scale).to(torch.float8_e4m3fn)
            tensors[name], tensors[name.replace(".weight", ".weight_scale")] = w8, scale
            dense[name] = w8.float() * scale
        else:
            tensors[name] = w
    _compare(tiny, tmp_path, tensors, {"quant_method": "fp8", "activation_scheme": "dynamic"}, dense, float_weights)
    assert "FP8 weights are dequantized at load" in caplog.text


@pytest.mark.parametrize("method,group", [("int8", None), ("int4-rtn", 32), ("gptq", 32), ("awq", 32)])
def test_pagedserve_quantize_round_trip(tiny, tmp_path, method, group):
    """`pagedserve quantize` writes a checkpoint the loader reads back to exactly the values it
    quantized to (AWQ: with its scales folded into the norms), and the engine computes with them."""
    from pagedserve.cli import main
    from pagedserve.model.loader import load_weights
    from pagedserve.model.quantization.weight import QuantizedWeight

    out = tmp_path / method
    argv = ["quantize", str(tiny), "--method", method, "--out", str(out)] + (["--group-size", str(group)] if group else [])
    assert main(argv) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == {"awq": "awq", "gptq": "gptq"}.get(method, "compressed-tensors")
    loaded = load_weights(out)
    quant = {k: v for k, v in loaded.items() if isinstance(v, QuantizedWeight)}
    assert len(quant) == 2 * len(PROJ)
    assert {w.bits for w in quant.values()} == {8 if method == "int8" else 4}
    dense = {k: (v.dequantize() if isinstance(v, QuantizedWeight) else v) for k, v in loaded.items()}
    fdir = _write(tiny, tmp_path / "dequantized", dense, None)
    got, want = _logprobs(out), _logprobs(fdir)
    assert (got - want).abs().max().item() < 2e-3
    # and the quantized model stays near the float one it came from
    assert (got - _logprobs(tiny)).abs().mean().item() < (0.05 if method == "int8" else 0.5)


def test_the_default_model_quantized_reads_back_to_what_transformers_computes_from_its_values(default_model_dir,
                                                                                              tmp_path):
    """The round trip on the real default model: `pagedserve quantize` (int4 in groups of 32), read
    back by the loader, served by the engine, gives the log-probabilities transformers computes
    with the dequantized values put into the float model; and it stays near the float model."""
    from transformers import AutoModelForCausalLM

    from pagedserve.cli import main
    from pagedserve.model.loader import load_weights
    from pagedserve.model.quantization.weight import QuantizedWeight

    out = tmp_path / "int4"
    assert main(["quantize", str(default_model_dir), "--method", "int4-rtn", "--group-size", "32", "--out", str(out)]) == 0
    loaded = load_weights(out)
    quant = {k: v.dequantize() for k, v in loaded.items() if isinstance(v, QuantizedWeight)}
    assert len(quant) == 30 * len(PROJ)
    hf = AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32).eval()
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        float_logits = hf(ids).logits[0].log_softmax(-1)
        assert not hf.load_state_dict(quant, strict=False).unexpected_keys
        ref_logits = hf(ids).logits[0].log_softmax(-1)
    pick = lambda lp: lp[:-1].gather(1, ids[0, 1:, None])[:, 0]  # noqa: E731  each next token's logprob
    got = _logprobs(out)
    assert (got - pick(ref_logits)).abs().max().item() < 2e-3
    assert 0 < (got - pick(float_logits)).abs().mean().item() < 2.0  # 1.01 nats (int4-rtn on 4-bit-grid weights)


def test_gptq_rounding_beats_round_to_nearest_on_the_calibration_inputs():
    """GPTQ's point: on the activations it was calibrated with, the layer's output error is smaller
    than round-to-nearest's at the same scales, groups and bits (correlated inputs, as real
    activations are); and its zero points fit the v1 layout (1..15)."""
    from pagedserve.model.quantization.quantize import asymmetric4, gptq4

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    mix = torch.randn(128, 128, generator=g) / 128**0.5 + torch.eye(128)
    x = torch.randn(512, 128, generator=g) @ mix
    ref = x @ w.T
    gw, zero = gptq4(w, x, 32, min_zero=1)
    rw, _ = asymmetric4(w, 32)
    err_gptq = (x @ gw.dequantize().T - ref).pow(2).mean()
    err_rtn = (x @ rw.dequantize().T - ref).pow(2).mean()
    assert err_gptq < 0.7 * err_rtn, (err_gptq, err_rtn)
    assert int(zero.min()) >= 1 and int(zero.max()) <= 15 and gw.q.max() <= 15


def test_awq_clip_search_moves_the_output_less_than_the_full_range():
    """AWQ's clip search: on its calibration inputs, each group's share of the output error
    (d^T H d) is never above the full min..max range's (the full range is one of the candidates),
    the ranges only shrink, and with heavy-tailed weights, as trained layers have, the layer's
    whole output error falls well below the full range's."""
    from pagedserve.model.quantization.quantize import asymmetric4, awq_clip

    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((64, 128)) * 0.02
    x = torch.randn(256, 128) * (torch.rand(128) * 2 + 0.1)
    lo, hi = awq_clip(w, x, 32)
    wg = w.reshape(64, 4, 32)
    assert (lo >= wg.amin(-1)).all() and (hi <= wg.amax(-1)).all() and (lo < hi).all()
    assert (lo > wg.amin(-1)).any() or (hi < wg.amax(-1)).any()
    clipped, _ = asymmetric4(w, 32, lo, hi)
    full, _ = asymmetric4(w, 32)
    xg = x.reshape(-1, 4, 32)
    h = torch.einsum("tgi,tgj->gij", xg, xg) / xg.shape[0]
    share = lambda q: (lambda d: torch.einsum("ngi,gij,ngj->ng", d, h, d))(q.dequantize().reshape(64, 4, 32) - wg)  # noqa: E731
    assert (share(clipped) <= share(full) * (1 + 1e-5) + 1e-12).all()
    ref = x @ w.T
    err_clip = (x @ clipped.dequantize().T - ref).pow(2).mean()
    err_full = (x @ full.dequantize().T - ref).pow(2).mean()
    assert err_clip < 0.9 * err_full, (err_clip, err_full)  # 0.81 measured


def test_pagedserve_quantize_refuses_what_it_cannot_do(tiny, tmp_path, default_model_dir):
    from pagedserve.cli import main

    assert main(["quantize", str(tiny), "--method", "int4-rtn", "--group-size", "48", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main(["quantize", str(tiny), "--method", "nf4", "--out", str(tmp_path / "y")])


@pytest.mark.parametrize("qc,tensors_fix,match", [
    ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}, None, "GEMM layout"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 32}, None, "4 or 8 bits"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {"targets": ["Linear"], "weights": {
        "num_bits": 8, "type": "int", "strategy": "group", "group_size": 48}}}}, "scale48", "do not divide"),
])
def test_bad_quantized_checkpoints_fail_at_load_by_name(tiny, float_weights, tmp_path, qc, tensors_fix, match):
    tensors = dict(float_weights)
    if tensors_fix == "scale48":  # int8 weights with scales in groups that do not divide K = 64
        for name in [n for n in float_weights if n.split(".")[-2] in PROJ]:
            n, k = float_weights[name].shape
            tensors[name] = torch.zeros(n, k, dtype=torch.int8)
            tensors[name.replace(".weight", ".weight_scale")] = torch.ones(n, 3)
    else:  # a qweight per projection so the reader starts
        for name in [n for n in float_weights if n.split(".")[-2] in PROJ]:
            n, k = float_weights[name].shape
            m = name.removesuffix(".weight")
            tensors.pop(name)
            tensors[f"{m}.qweight"] = torch.zeros(k, n // 8, dtype=torch.int32)
            tensors[f"{m}.qzeros"] = torch.zeros(k // 32, n // 8, dtype=torch.int32)
            tensors[f"{m}.scales"] = torch.ones(k // 32, n, dtype=torch.float16)
    qdir = _write(tiny, tmp_path / "bad", tensors, qc)
    with pytest.raises(ValueError, match=match):
        LLM(str(qdir), max_model_len=64, kv_cache_memory=8 << 20)
