"""GGUF (llama.cpp) block formats kept quantized: Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 unpack into a
QuantizedWeight exactly (groups of 32 along each row, the block's fp16 scale and min as float32).

Block layouts (ggml-common.h), 32 weights each, value j in 0..15 in the low nibble of qs[j] and
value j + 16 in its high nibble:
  Q4_0  d:f16  qs[16]               w = d * (q - 8)
  Q4_1  d:f16  m:f16  qs[16]        w = d * q + m
  Q5_0  d:f16  qh[4]  qs[16]        q |= bit j of qh << 4;  w = d * (q - 16)
  Q5_1  d:f16  m:f16  qh[4] qs[16]  w = d * q + m
  Q8_0  d:f16  qs[32] (int8)        w = d * q
Other types (F32/F16/BF16, the K-quants, IQ*) come back as None: the caller dequantizes them
with gguf-py and says so at startup.
"""

from __future__ import annotations

import numpy as np
import torch

from pagedserve.model.quantization.weight import QuantizedWeight

KEPT_QUANTIZED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
GROUP = 32


def _f16(blocks: np.ndarray, at: int) -> torch.Tensor:
    """The fp16 field at byte `at` of every block, as float32 [N, G]."""
    return torch.from_numpy(np.ascontiguousarray(blocks[..., at : at + 2]).view(np.float16)[..., 0].astype(np.float32))


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """qs [..., 16] -> the 32 values [..., 32] (low nibbles first)."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """qh [..., 4] (32 bits, little-endian) -> bit j << 4 for j in 0..31."""
    bits = np.unpackbits(qh, axis=-1, bitorder="little")
    return bits << 4


def unpack(type_name: str, data: np.ndarray, n: int, k: int) -> QuantizedWeight | None:
    """A GGUF tensor's raw bytes ([n, bytes per row]) as a QuantizedWeight [n, k], or None when the
    type is not one kept quantized."""
    if type_name not in KEPT_QUANTIZED:
        return None
    blocks = np.asarray(data).reshape(n, k // GROUP, -1)
    src = f"gguf {type_name}"
    if type_name == "Q8_0":
        q = np.ascontiguousarray(blocks[..., 2:34]).view(np.int8).reshape(n, k)
        return QuantizedWeight(torch.from_numpy(q.copy()), _f16(blocks, 0), None, 8, GROUP, src)
    d = _f16(blocks, 0)
    if type_name == "Q4_0":
        q = _nibbles(blocks[..., 2:18]).reshape(n, k)
        return QuantizedWeight(torch.from_numpy(q), d, -8 * d, 4, GROUP, src)
    if type_name == "Q4_1":
        q = _nibbles(blocks[..., 4:20]).reshape(n, k)
        return QuantizedWeight(torch.from_numpy(q), d, _f16(blocks, 2), 4, GROUP, src)
    if type_name == "Q5_0":
        q = (_nibbles(blocks[..., 6:22]) | _high_bits(blocks[..., 2:6])).astype(np.int8).reshape(n, k)
        return QuantizedWeight(torch.from_numpy(q), d, -16 * d, 8, GROUP, src)
    q = (_nibbles(blocks[..., 8:24]) | _high_bits(blocks[..., 4:8])).astype(np.int8).reshape(n, k)  # Q5_1
    return QuantizedWeight(torch.from_numpy(q), d, _f16(blocks, 2), 8, GROUP, src)
