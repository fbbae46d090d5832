"""AWQ checkpoints (AutoAWQ's GEMM layout, `quant_method: awq`, `version: gemm`): per Linear
  qweight  int32 [K, N/8]   eight 4-bit columns a word, interleaved 0 2 4 6 1 3 5 7
  qzeros   int32 [K/G, N/8] the same packing
  scales   fp16  [K/G, N]
  w[n, k] = (q[k, n] - zero[k / G, n]) * scale[k / G, n]
"""

from __future__ import annotations

import torch

from pagedserve.model.quantization.packing import pack_int32, unpack_int32
from pagedserve.model.quantization.weight import QuantizedWeight

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # the column held by each nibble of a word


def check_config(qc: dict) -> tuple[int, int]:
    bits, group = int(qc.get("bits", qc.get("w_bit", 4))), int(qc.get("group_size", qc.get("q_group_size", 128)))
    version = str(qc.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm":
        raise ValueError(f"AWQ checkpoints load in the 4-bit GEMM layout; this one is {bits}-bit, version "
                         f"{version!r} (GEMV/Marlin layouts: re-export with AutoAWQ's version='gemm')")
    if not qc.get("zero_point", True):
        raise ValueError("AWQ without zero points (zero_point: false) is not supported; re-export with zero points")
    return bits, group


def to_quantized(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int) -> QuantizedWeight:
    k, n = qweight.shape[0], scales.shape[1]
    if k % group:
        raise ValueError(f"AWQ group size {group} does not divide the input dimension {k}")
    q = unpack_int32(qweight, 4, n, ORDER)  # [K, N]
    z = unpack_int32(qzeros, 4, n, ORDER).float()  # [G, N]
    s = scales.float()
    if s.shape != (k // group, n) or z.shape != s.shape:
        raise ValueError(f"AWQ scales/zeros {tuple(s.shape)}/{tuple(z.shape)} do not match a [{k}, {n}] qweight in "
                         f"groups of {group}")
    return QuantizedWeight(q.T.to(torch.uint8).contiguous(), s.T.contiguous(), (-z * s).T.contiguous(), 4, group, "awq")


def from_quantized_parts(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> dict[str, torch.Tensor]:
    """q [N, K] 0..15, scales / integer zeros [N, G] -> the three AWQ tensors (pagedserve quantize)."""
    return {"qweight": pack_int32(q.T.contiguous(), 4, ORDER),
            "qzeros": pack_int32(zeros.T.round().to(torch.int64).contiguous(), 4, ORDER),
            "scales": scales.T.contiguous().to(torch.float16)}
