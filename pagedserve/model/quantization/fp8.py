"""FP8 weights (`quant_method: fp8`, or compressed-tensors float-quantized): float8_e4m3fn [N, K]
with a scale per tensor ([] / [1]), per output channel ([N, 1]) or per 128x128 block
(`weight_scale_inv` [N/128, K/128], DeepSeek-style). The CPU kernels multiply integers, and e4m3
values are not, so FP8 weights are dequantized at load to the model's dtype (the start-up log says
so): they load and compute correctly, at float size in memory."""

from __future__ import annotations

import torch


def dequantize(module: str, weight: torch.Tensor, scale: torch.Tensor, block: list[int] | None = None) -> torch.Tensor:
    if weight.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"{module}: an FP8 weight must be float8_e4m3fn, got {weight.dtype}")
    w = weight.float()
    n, k = w.shape
    s = scale.float()
    if s.numel() == 1:
        return w * s.reshape(())
    if s.shape in ((n, 1), (n,)):
        return w * s.reshape(n, 1)
    bn, bk = block or [128, 128]
    if s.shape == (-(-n // bn), -(-k // bk)):
        return w * s.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    raise ValueError(f"{module}: FP8 scale of shape {tuple(s.shape)} fits neither a tensor, a channel nor "
                     f"{bn}x{bk} blocks of a [{n}, {k}] weight")
