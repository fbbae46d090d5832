"""compressed-tensors checkpoints (llm-compressor's format, `quant_method: compressed-tensors`):
integer weights, per Linear (the scheme from the config group whose targets match it):
  pack-quantized  weight_packed int32 [N, K * bits / 32] (value + 2^(bits-1), low bits first),
                  weight_shape [2], weight_scale [N, K / G] | [N, 1] | [1],
                  weight_zero_point (asymmetric) int32 packed along N
  int-quantized / naive-quantized
                  weight int8 [N, K], weight_scale, weight_zero_point (asymmetric) int8 [N, G]
  w = (q - zero_point) * scale
FP8 (float-quantized) weights go to fp8.py. Static activation scales (W8A8's input_scale) are
dropped with a log line: activations stay float here (the CPU kernels quantize them themselves).
"""

from __future__ import annotations

import logging
import re

import torch

from pagedserve.model.quantization.packing import pack_int32, unpack_int32
from pagedserve.model.quantization.weight import QuantizedWeight

log = logging.getLogger("pagedserve.loader")


def scheme_for(module: str, qc: dict) -> dict | None:
    """The weights' quantization args of the config group that targets `module` (None: ignored)."""
    for pattern in qc.get("ignore") or []:
        if module == pattern or pattern.startswith("re:") and re.fullmatch(pattern[3:], module):
            return None
    for group in (qc.get("config_groups") or {}).values():
        for target in group.get("targets") or []:
            if target == "Linear" or target.startswith("re:") and re.fullmatch(target[3:], module) or target == module:
                return group.get("weights")
    return None


def to_quantized(module: str, tensors: dict[str, torch.Tensor], args: dict) -> QuantizedWeight | torch.Tensor:
    """One Linear's tensors (`weight_packed` / `weight`, `weight_scale`, ...) as a QuantizedWeight."""
    bits, kind = int(args.get("num_bits", 8)), str(args.get("type", "int"))
    if kind != "int":
        raise ValueError(f"{module}: compressed-tensors {kind} weights load through fp8.py")
    if bits not in (4, 8):
        raise ValueError(f"{module}: {bits}-bit compressed-tensors weights are not supported (4 or 8)")
    strategy = str(args.get("strategy", "channel"))
    if "weight_g_idx" in tensors and not torch.equal(tensors["weight_g_idx"].long(),
                                                      torch.sort(tensors["weight_g_idx"].long()).values):
        raise ValueError(f"{module}: activation-ordered compressed-tensors weights (weight_g_idx) are not supported; "
                         "export with actorder=None or 'weight'")
    if "weight_packed" in tensors:
        n, k = (int(x) for x in tensors["weight_shape"].tolist())
        q = unpack_int32(tensors["weight_packed"], bits, k).to(torch.int16) - (1 << (bits - 1))  # signed
    else:
        w = tensors["weight"]
        if w.dtype != torch.int8:
            raise ValueError(f"{module}: an int-quantized weight must be int8, got {w.dtype}")
        q = w.to(torch.int16)
        n, k = q.shape
    scale = tensors["weight_scale"].float()
    if strategy == "tensor" or scale.numel() == 1:
        scale = scale.reshape(1, 1).expand(n, 1)
    scale = scale.reshape(n, -1).contiguous()
    groups = scale.shape[1]
    if k % groups:
        raise ValueError(f"{module}: {groups} scale groups do not divide the input dimension {k}")
    zero = tensors.get("weight_zero_point")
    if zero is not None:
        if zero.dtype == torch.int32 and "weight_packed" in tensors:  # packed along N
            zero = unpack_int32(zero.T.contiguous(), bits, n).T - (1 << (bits - 1))
        zero = zero.float().reshape(n, groups)
        if not torch.any(zero):
            zero = None
    if bits == 4:  # unsigned 0..15: (q - z) * s = (q + 8) * s - (8 + z) * s
        z = 8 if zero is None else 8 + zero
        return QuantizedWeight((q + 8).to(torch.uint8), scale, (-z * scale).contiguous(), 4, k // groups,
                               "compressed-tensors int4")
    return QuantizedWeight(q.to(torch.int8), scale, None if zero is None else (-zero * scale).contiguous(), 8,
                           k // groups, "compressed-tensors int8")


def from_quantized(w: QuantizedWeight) -> dict[str, torch.Tensor]:
    """A symmetric QuantizedWeight (pagedserve quantize) as pack-quantized (4-bit) or
    int-quantized (8-bit) tensors, scales in float32 (exact)."""
    n, k = w.shape
    if w.bits == 4:
        if w.offsets is None or not torch.equal(w.offsets, -8 * w.scales):
            raise ValueError("only symmetric 4-bit weights (offset = -8 * scale) write as compressed-tensors")
        return {"weight_packed": pack_int32(w.q.to(torch.int64), 4), "weight_shape": torch.tensor([n, k]),
                "weight_scale": w.scales.clone()}
    if w.offsets is not None:
        raise ValueError("only symmetric 8-bit weights write as compressed-tensors int-quantized")
    return {"weight": w.q.clone(), "weight_scale": w.scales.clone()}


def config(bits: int, group: int | None, ignore: list[str]) -> dict:
    """quantization_config for weights written by from_quantized (group None: per channel)."""
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": False,
               "strategy": "group" if group else "channel", "group_size": group, "actorder": None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized" if bits == 4 else "int-quantized",
            "quantization_status": "compressed", "ignore": ignore, "kv_cache_scheme": None,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None}}}
