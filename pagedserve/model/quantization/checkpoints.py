"""A quantized checkpoint's tensors -> the Hugging Face names the model loads, each quantized
Linear's parts (qweight/qzeros/scales, weight_packed/weight_scale, ...) replaced by one
QuantizedWeight (or, for FP8, a float weight) under `<module>.weight`. Everything else passes
through. Called by loader.load_weights for checkpoints with a quantization_config."""

from __future__ import annotations

import logging

import torch

from pagedserve.model.quantization import awq, compressed_tensors, fp8, gptq

log = logging.getLogger("pagedserve.loader")

# the suffixes each format stores per Linear, in place of `.weight`
_PARTS = {
    "awq": ("qweight", "qzeros", "scales"),
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "compressed-tensors": ("weight_packed", "weight_shape", "weight_scale", "weight_zero_point", "weight_g_idx",
                           "input_scale", "input_zero_point", "output_scale"),
    "fp8": ("weight_scale", "weight_scale_inv", "input_scale"),
}


def _split(weights: dict[str, torch.Tensor], parts: tuple[str, ...], anchor: str) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {part: tensor}} for every module that has an `anchor` part (at least one: a config
    that names a method whose tensors are not there is a broken checkpoint, not a float one)."""
    modules = {name.rsplit(".", 1)[0] for name in weights if name.endswith("." + anchor)}
    if not modules:
        raise ValueError(f"config.json's quantization_config names a method whose tensors (*.{anchor}) are not in "
                         "the checkpoint: a float checkpoint with a stray quantization_config, or a broken export; "
                         "remove the quantization_config or re-export")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for m in sorted(modules):
        out[m] = {p: weights.pop(f"{m}.{p}") for p in (*parts, "weight") if f"{m}.{p}" in weights}
    return out


def convert(weights: dict[str, torch.Tensor], qc: dict, method: str) -> dict:
    if method == "awq":
        _, group = awq.check_config(qc)
        for m, t in _split(weights, _PARTS["awq"], "qweight").items():
            weights[f"{m}.weight"] = awq.to_quantized(t["qweight"], t["qzeros"], t["scales"], group)
    elif method == "gptq":
        bits, group, v2 = gptq.check_config(qc)
        for m, t in _split(weights, _PARTS["gptq"], "qweight").items():
            w, perm = gptq.to_quantized(t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"), bits, group, v2)
            w.input_perm = perm
            weights[f"{m}.weight"] = w
    elif method == "compressed-tensors":
        dropped = 0
        for m, t in _split(weights, _PARTS["compressed-tensors"], "weight_scale").items():
            args = compressed_tensors.scheme_for(m, qc) or {}
            dropped += sum(k in t for k in ("input_scale", "input_zero_point", "output_scale"))
            if str(args.get("type", "int")) == "float":
                weights[f"{m}.weight"] = fp8.dequantize(m, t["weight"], t["weight_scale"])
            else:
                weights[f"{m}.weight"] = compressed_tensors.to_quantized(m, t, args)
        if dropped:
            log.warning("%d static activation scales in the checkpoint are not used: activations stay float", dropped)
    elif method == "fp8":
        block = qc.get("weight_block_size")
        for m, t in _split(weights, _PARTS["fp8"], "weight").items():
            scale = t.get("weight_scale", t.get("weight_scale_inv"))
            if scale is None:  # a float weight beside the FP8 ones (norms are not Linears; lm_head may be)
                weights[f"{m}.weight"] = t["weight"]
                continue
            weights[f"{m}.weight"] = fp8.dequantize(m, t["weight"], scale, block)
        log.warning("FP8 weights are dequantized at load (no FP8 kernel on this device): float size in memory")
    else:
        raise ValueError(f"no reader for {method!r} checkpoints")
    return weights
