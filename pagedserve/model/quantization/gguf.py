"""GGUF (llama.cpp) block formats kept quantized: Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 unpack into a
QuantizedWeight exactly (groups of 32 along each row, the block's fp16 scale and min as float32).

Block layouts (ggml-common.h), 32 weights each, value j in 0..15 in the low nibble of qs[j] and
value j + 16 in its high nibble:
  Q4_0  d:f16  qs[16]               w = d * (q - 8)
  Q4_1  d:f16  m:f16  qs[16]        w = d * q + m
  Q5_0  d:f16  qh[4]  qs[16]        q |= bit j of qh << 4;  w = d * (q - 16)
  Q5_1  d:f16  m:f16  qh[4] qs[16]  w = d * q + m
  Q8_0  d:f16  qs[32] (int8)        w = d * q
K-quants, super-blocks of 256 weights in sub-blocks (k_quants in ggml):
  Q4_K  d:f16 dmin:f16 scales[12] qs[128]            8 sub-blocks of 32, 6-bit scale sc and min m
        each (packed as below); chunk c of qs (32 bytes): sub-block 2c in the low nibbles, 2c + 1
        in the high ones; w = (d * sc) * q - dmin * m  -> 4-bit, groups of 32, with offsets
  Q5_K  d:f16 dmin:f16 scales[12] qh[32] qs[128]     as Q4_K, plus bit i of qh[l] as bit 4 of
        element l of sub-block i                                      -> 8-bit, groups of 32
  Q6_K  ql[128] qh[64] scales[16]:int8 d:f16         16 sub-blocks of 16; half h (128 weights):
        32-groups g = 0..3 take the low nibbles of ql[64h : 64h+32], of ql[64h+32 : 64h+64], then the
        high nibbles of each, and bits 2g, 2g+1 of qh[32h + l] as bits 4-5; w = (d * sc) * (q - 32)
        -> 8-bit, groups of 16, no offsets
Each product d * sc is exact in float32 (an fp16 times a 6- or 8-bit integer), so these are the
values gguf-py's dequantize computes, bit for bit. Other types (F32/F16/BF16, Q2_K, Q3_K, IQ*) come
back as None: the caller dequantizes them with gguf-py and says so at startup.
"""

from __future__ import annotations

import numpy as np
import torch

from pagedserve.model.quantization.weight import QuantizedWeight

KEPT_QUANTIZED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
GROUP = 32
SUPER = 256  # weights per K-quant super-block


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
    src = f"gguf {type_name}"
    if type_name.endswith("_K"):
        return _unpack_k(type_name, np.asarray(data).reshape(n * (k // SUPER), -1), n, k, src)
    blocks = np.asarray(data).reshape(n, k // GROUP, -1)
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


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes of a Q4_K / Q5_K super-block -> (sc, m) [B, 8], 6 bits each: bytes 0-3
    hold sc 0-3 in their low 6 bits, bytes 4-7 m 0-3; sc 4-7 and m 4-7 have their low 4 bits in
    bytes 8-11 (low / high nibble) and their top 2 bits in the top bits of bytes 0-3 / 4-7."""
    s = s.astype(np.int32)
    lo_sc, lo_m, mix = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo_sc & 63, (mix & 15) | ((lo_sc >> 6) << 4)], axis=1)
    m = np.concatenate([lo_m & 63, (mix >> 4) | ((lo_m >> 6) << 4)], axis=1)
    return sc, m


def _low_high(qs: np.ndarray) -> np.ndarray:
    """qs [B, 128] -> [B, 8, 32]: chunk c's low nibbles as sub-block 2c, its high nibbles as 2c + 1."""
    c = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([c & 15, c >> 4], axis=2).reshape(-1, 8, 32)


def _unpack_k(type_name: str, b: np.ndarray, n: int, k: int, src: str) -> QuantizedWeight:
    nb = b.shape[0]  # super-blocks, row-major: n rows of k / 256

    def f16(at: int) -> np.ndarray:
        return np.ascontiguousarray(b[:, at : at + 2]).view(np.float16)[:, 0].astype(np.float32)

    if type_name == "Q6_K":
        ql, qh, sc, d = b[:, 0:128], b[:, 128:192], b[:, 192:208].view(np.int8), f16(208)
        q = np.empty((nb, 2, 4, 32), dtype=np.int16)
        for h in range(2):
            lq, hq = ql[:, 64 * h : 64 * h + 64], qh[:, 32 * h : 32 * h + 32]
            for g in range(4):
                low = lq[:, 32 * (g % 2) : 32 * (g % 2) + 32]
                low = low & 15 if g < 2 else low >> 4
                q[:, h, g] = low.astype(np.int16) | (((hq >> (2 * g)) & 3).astype(np.int16) << 4)
        q = (q - 32).astype(np.int8).reshape(n, k)
        scales = (d[:, None] * sc.astype(np.float32)).reshape(n, k // 16)
        return QuantizedWeight(torch.from_numpy(q), torch.from_numpy(scales), None, 8, 16, src)
    d, dmin = f16(0), f16(2)
    sc, m = _scale_min_k4(b[:, 4:16])
    scales = (d[:, None] * sc.astype(np.float32)).reshape(n, k // GROUP)
    offsets = -(dmin[:, None] * m.astype(np.float32)).reshape(n, k // GROUP)
    if type_name == "Q4_K":
        q = _low_high(b[:, 16:144]).reshape(n, k)
        return QuantizedWeight(torch.from_numpy(np.ascontiguousarray(q)), torch.from_numpy(scales),
                               torch.from_numpy(offsets), 4, GROUP, src)
    qh = b[:, 16:48]  # Q5_K: bit i of qh[l] is bit 4 of element l of sub-block i
    high = ((qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1) << 4
    q = (_low_high(b[:, 48:176]) | high).astype(np.int8).reshape(n, k)
    return QuantizedWeight(torch.from_numpy(q), torch.from_numpy(scales), torch.from_numpy(offsets), 8, GROUP, src)
