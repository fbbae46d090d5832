"""`pagedserve quantize MODEL --method int8|int4-rtn|awq --out DIR`: quantized checkpoints without a
GPU, in the layouts the loader reads back (and vLLM reads too).

  int8      symmetric int8 per output channel, compressed-tensors int-quantized (W8A16)
  int4-rtn  symmetric int4 in groups of --group-size (128), round to nearest, compressed-tensors
            pack-quantized (W4A16)
  gptq      GPTQ: asymmetric int4 in groups of --group-size, each input column rounded in turn with
            its error spread over the columns not yet rounded (the inverse Hessian of the
            calibration text's activations); GPTQ's v1 layout (AutoGPTQ, vLLM), no act-order
  awq       AWQ: per input channel scales s = mean|x|^alpha searched on a calibration text (alpha
            on a grid of 20, the one whose quantized output is nearest the float one), folded into
            the op before (the RMSNorm weight for q/k/v and gate/up, up_proj's rows for down_proj),
            then each group's range clipped where that brings the quantized output nearer (AWQ's
            clip search, on the same text), then asymmetric int4 with zero points in groups of
            --group-size; AutoAWQ's GEMM layout

The decoder layers' projections are quantized; the embeddings and the output head stay float (as
llm-compressor and AutoAWQ leave them). A GGUF source is dequantized first.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from pagedserve.config import QUANTIZE_METHODS as METHODS
from pagedserve.model.arch import moe_fields
from pagedserve.model.quantization import awq as awq_format
from pagedserve.model.quantization import compressed_tensors
from pagedserve.model.quantization.packing import pack_int32
from pagedserve.model.quantization.weight import QuantizedWeight

log = logging.getLogger("pagedserve.quantize")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "w1", "w2", "w3")  # Mixtral's experts' gate, down, up
AWQ_GRID = 20
AWQ_CLIP_STEPS = 8  # per end of a group's range
AWQ_CLIP_MAX_SHRINK = 0.35


def symmetric(w: torch.Tensor, bits: int, group: int | None) -> QuantizedWeight:
    """Round-to-nearest symmetric quantization of a float [N, K] (group None: one per row), in
    compressed-tensors' convention: scale = max|w| / ((2^bits - 1) / 2), q in [-2^(bits-1), 2^(bits-1) - 1]."""
    n, k = w.shape
    g = group or k
    if k % g:
        raise ValueError(f"group size {g} does not divide the input dimension {k}")
    wg = w.float().reshape(n, k // g, g)
    half = (2**bits - 1) / 2
    scale = (wg.abs().amax(-1) / half).clamp_min(1e-10)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.clamp(torch.round(wg / scale.unsqueeze(-1)), lo, hi).reshape(n, k)
    if bits == 8:
        return QuantizedWeight(q.to(torch.int8), scale, None, 8, g, "rtn int8")
    return QuantizedWeight((q + 8).to(torch.uint8), scale, -8 * scale, 4, g, "rtn int4")


def asymmetric4(w: torch.Tensor, group: int, lo: torch.Tensor | None = None,
                hi: torch.Tensor | None = None) -> tuple[QuantizedWeight, torch.Tensor]:
    """AWQ's int4: q in 0..15 with an integer zero point per group, w ~ (q - z) * s, the grid
    spanning each group's [lo, hi] [N, G] (default: its min and max; a narrower range clips).
    Returns the weight and the zero points [N, G]."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    if lo is None or hi is None:
        lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-10)
    zero = torch.clamp(torch.round(-lo / scale), 0, 15)
    q = torch.clamp(torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, 15).reshape(n, k)
    # offsets as the loader computes them from the stored fp16 scales (exact round trip)
    s16 = scale.half().float()
    return QuantizedWeight(q.to(torch.uint8), s16, -zero * s16, 4, group, "awq"), zero


def awq_clip(w: torch.Tensor, x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ's clip search: each group's quantization range [lo, hi] [N, G], both ends shrunk toward
    zero on a grid (AWQ_CLIP_STEPS x AWQ_CLIP_STEPS, down to 1 - AWQ_CLIP_MAX_SHRINK), chosen per
    group where the layer's output on the calibration inputs x [T, K] moves least. A group's share of
    that error is d^T H d, with d the group's weight error and H = X^T X / T of its own input
    columns, so every candidate is scored exactly without a matmul over the tokens. Clipping trades
    a few outliers' error for a finer grid under the rest. AutoAWQ shrinks a symmetric range by its
    max |w|; both ends on their own fit asymmetric groups better (measured: benchmarks/README.md)."""
    n, k = w.shape
    g = k // group
    w = w.float()
    xg = x.float().reshape(-1, g, group)
    h = torch.einsum("tgi,tgj->gij", xg, xg) / xg.shape[0]
    wg = w.reshape(n, g, group)
    lo0, hi0 = wg.amin(-1), wg.amax(-1)
    best_lo, best_hi, best_err = lo0, hi0, torch.full_like(lo0, float("inf"))
    ratios = [1 - AWQ_CLIP_MAX_SHRINK * i / (AWQ_CLIP_STEPS - 1) for i in range(AWQ_CLIP_STEPS)]
    for a in ratios:
        for b in ratios:
            lo, hi = lo0 * a, hi0 * b
            d = asymmetric4(w, group, lo, hi)[0].dequantize().reshape(n, g, group) - wg
            err = torch.einsum("ngi,gij,ngj->ng", d, h, d)
            better = err < best_err
            best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
            best_err = torch.minimum(err, best_err)
    return best_lo, best_hi


def gptq4(w: torch.Tensor, x: torch.Tensor, group: int, damp: float = 0.01, block: int = 128,
          min_zero: int = 0) -> tuple[QuantizedWeight, torch.Tensor]:
    """GPTQ's rounding (Frantar et al. 2022) into the same asymmetric int4 groups as asymmetric4:
    the input columns are quantized in order and each one's rounding error is spread over the
    columns not yet quantized, weighted by the inverse Hessian H = X^T X of the calibration inputs
    x [T, K], so the layer's *output* on those inputs stays close even where a group's values sit
    badly on the integer grid. A group's scale and zero are set from its columns as they stand when
    the first is reached (after earlier groups' corrections). min_zero 1 keeps zero points that
    GPTQ's v1 layout (zero - 1 in 4 bits) can hold. Returns (weight, zero points [N, G])."""
    n, k = w.shape
    w = w.float().clone()
    x = x.float()
    h = x.T @ x
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.empty(n, k, dtype=torch.uint8)
    scales = torch.empty(n, k // group)
    zeros = torch.empty(n, k // group)
    block = max(group, block // group * group)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if (i1 + i) % group == 0:
                g = (i1 + i) // group
                cols = w1[:, i:i + group]
                lo, hi = cols.amin(-1), cols.amax(-1)
                s = ((hi - lo) / 15).clamp_min(1e-10).half().float()  # stored as fp16: round with what loads
                z = torch.clamp(torch.round(-lo / s), min_zero, 15)
                scales[:, g], zeros[:, g] = s, z
            s, z = scales[:, (i1 + i) // group], zeros[:, (i1 + i) // group]
            col = w1[:, i]
            qi = torch.clamp(torch.round(col / s) + z, 0, 15)
            q[:, i1 + i] = qi.to(torch.uint8)
            e = (col - (qi - z) * s) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return QuantizedWeight(q, scales, -zeros * scales, 4, group, "gptq"), zeros


def _calibration_inputs(model, tokenizer, text: str, max_tokens: int) -> dict[str, torch.Tensor]:
    """The input activations [T, K] of every projection (forward hooks on the float model)."""
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if name.split(".")[-1] in PROJECTIONS:
            hooks.append(mod.register_forward_hook(
                lambda m, inp, out, name=name: seen.__setitem__(name, inp[0].detach().reshape(-1, inp[0].shape[-1]))))
    with torch.inference_mode():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


def _awq_scales(ws: list[torch.Tensor], x: torch.Tensor, group: int) -> torch.Tensor:
    """The per-input-channel scales of AWQ's search for weights `ws` (sharing input x [T, K])."""
    x = x.float()
    mean_abs = x.abs().mean(0).clamp_min(1e-8)
    ref = [x @ w.float().T for w in ws]
    best, best_err = torch.ones_like(mean_abs), float("inf")
    for i in range(AWQ_GRID):
        s = mean_abs.pow(i / AWQ_GRID)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, r in zip(ws, ref):
            qw, _ = asymmetric4(w.float() * s, group)
            err += ((x / s) @ qw.dequantize().T - r).pow(2).mean().item()
        if err < best_err:
            best, best_err = s, err
    return best


def quantize_model(model: str | None, method: str, out: Path, group_size: int = 128, calibration: Path | None = None,
                   calibration_tokens: int = 512) -> Path:
    """Write `model` quantized with `method` to the folder `out` (config, tokenizer, safetensors)."""
    from safetensors.torch import save_file

    from pagedserve.model.loader import load_checkpoint, load_hf_config, load_weights

    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    folder, gguf = load_checkpoint(model)
    cfg = load_hf_config(folder)
    if cfg.get("quantization_config"):
        raise ValueError(f"{folder} is already quantized ({cfg['quantization_config'].get('quant_method')}); "
                         "quantize its float original")
    if method in ("awq", "gptq") and moe_fields(cfg).num_experts:
        raise ValueError(f"--method {method} does not handle Mixture-of-Experts models yet (it calibrates on each "
                         "projection's inputs, and an expert's are the tokens routed to it); use --method int8 or "
                         "int4-rtn")
    weights = {k: (v.dequantize() if isinstance(v, QuantizedWeight) else v.float())
               for k, v in load_weights(folder, gguf).items()}
    if cfg.get("tie_word_embeddings") and "lm_head.weight" in weights:
        weights.pop("lm_head.weight")
    names = [n for n in weights if n.endswith(".weight") and n.split(".")[-2] in PROJECTIONS]
    group = None if method == "int8" else group_size
    for n in names:
        k = weights[n].shape[1]
        if group and k % group:
            raise ValueError(f"--group-size {group} does not divide {n}'s input dimension {k}: pick a divisor")
    tensors: dict[str, torch.Tensor] = {}
    if method == "awq":
        tensors = _awq(folder, weights, names, group_size, calibration, calibration_tokens)
    elif method == "gptq":
        tensors = _gptq(folder, weights, names, group_size, calibration, calibration_tokens)
    else:
        bits = 8 if method == "int8" else 4
        for i, n in enumerate(names):
            prefix = n.removesuffix(".weight")
            for part, t in compressed_tensors.from_quantized(symmetric(weights.pop(n), bits, group)).items():
                tensors[f"{prefix}.{part}"] = t
            if (i + 1) % 28 == 0 or i + 1 == len(names):
                log.info("quantized %d/%d projections", i + 1, len(names))
        cfg["quantization_config"] = compressed_tensors.config(bits, group, ["lm_head"])
    tensors.update({k: v.contiguous() for k, v in weights.items()})
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in folder.iterdir():  # tokenizer and generation files
        if f.is_file() and f.suffix in (".json", ".txt", ".model", ".jinja") and f.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy(f, tmp / f.name)
    if method == "gptq":
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False,
                                      "sym": False, "checkpoint_format": "gptq"}
    if method == "awq":
        cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                                      "version": "gemm"}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("wrote %s (%s, %.1f MB)", out, method, (out / "model.safetensors").stat().st_size / 1e6)
    return out


def _calibration(folder: Path, calibration: Path | None, max_tokens: int) -> dict[str, torch.Tensor]:
    """Every projection's input activations on the calibration text, from the float model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = calibration.read_text() if calibration else (Path(__file__).parent / "calibration.txt").read_text()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return _calibration_inputs(model, AutoTokenizer.from_pretrained(str(folder)), text, max_tokens)


def _gptq(folder: Path, weights: dict, names: list[str], group: int, calibration: Path | None,
          max_tokens: int) -> dict[str, torch.Tensor]:
    inputs = _calibration(folder, calibration, max_tokens)
    out: dict[str, torch.Tensor] = {}
    for i, n in enumerate(names):
        prefix = n.removesuffix(".weight")
        qw, zero = gptq4(weights.pop(n), inputs[prefix], group, min_zero=1)
        k = qw.q.shape[1]
        out[f"{prefix}.qweight"] = pack_int32(qw.q, 4).T.contiguous()  # [K/8, N]: packed along K
        out[f"{prefix}.qzeros"] = pack_int32((zero.T - 1).to(torch.int64).contiguous(), 4)  # [G, N/8]: v1's zero - 1
        out[f"{prefix}.scales"] = qw.scales.T.contiguous().to(torch.float16)
        out[f"{prefix}.g_idx"] = (torch.arange(k) // group).to(torch.int32)
        if (i + 1) % 28 == 0 or i + 1 == len(names):
            log.info("GPTQ: %d/%d projections", i + 1, len(names))
    return out


def _awq(folder: Path, weights: dict, names: list[str], group: int, calibration: Path | None,
         max_tokens: int) -> dict[str, torch.Tensor]:
    inputs = _calibration(folder, calibration, max_tokens)
    layers = sorted({n.split(".mlp.")[0].split(".self_attn.")[0] for n in names}, key=lambda p: int(p.split(".")[-1]))
    out: dict[str, torch.Tensor] = {}
    in_scale: dict[str, torch.Tensor] = {}
    for li, layer in enumerate(layers):
        # scale groups: (projections sharing an input, the op the inverse scale folds into)
        attn, mlp = f"{layer}.self_attn", f"{layer}.mlp"
        for projs, fold in (((f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"), f"{layer}.input_layernorm.weight"),
                            ((f"{mlp}.gate_proj", f"{mlp}.up_proj"), f"{layer}.post_attention_layernorm.weight"),
                            ((f"{mlp}.down_proj",), f"{mlp}.up_proj.weight")):
            x = inputs[projs[0]]
            s = _awq_scales([weights[p + ".weight"] for p in projs], x, group)
            for p in projs:
                weights[p + ".weight"] = weights[p + ".weight"] * s
                in_scale[p] = s  # its calibration inputs, captured unscaled, are x / s now
            if fold.endswith("up_proj.weight"):
                weights[fold] = weights[fold] / s.unsqueeze(1)  # up's output rows feed down's input channels
            else:
                weights[fold] = weights[fold] / s
        for p in [f"{attn}.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
                 [f"{mlp}.{n}" for n in ("gate_proj", "up_proj", "down_proj")]:
            w = weights.pop(p + ".weight")
            qw, zero = asymmetric4(w, group, *awq_clip(w, inputs[p] / in_scale.get(p, 1), group))
            for part, t in awq_format.from_quantized_parts(qw.q, qw.scales, zero).items():
                out[f"{p}.{part}"] = t
        log.info("AWQ: layer %d/%d", li + 1, len(layers))
    return out
