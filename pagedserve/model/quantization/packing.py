"""Bit-packing shared by the int32-packed checkpoint formats (AWQ, GPTQ, compressed-tensors)."""

from __future__ import annotations

import torch


def unpack_int32(packed: torch.Tensor, bits: int, count: int, order: list[int] | None = None) -> torch.Tensor:
    """int32 words [R, W] -> their `bits`-bit fields [R, count] (unsigned, int32), field i of a word
    at bit offset bits * i, low bits first. `order`: the logical position of each field within its
    word (AWQ interleaves eight 4-bit columns as 0 2 4 6 1 3 5 7)."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed weights must be int32, got {packed.dtype}")
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    fields = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [R, W, per]
    if order is not None:
        inverse = torch.empty(per, dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(per)
        fields = fields[..., inverse]
    fields = fields.reshape(packed.shape[0], -1)
    if fields.shape[1] < count:
        raise ValueError(f"{packed.shape[1]} packed words hold {fields.shape[1]} values, {count} expected")
    return fields[:, :count]


def pack_int32(values: torch.Tensor, bits: int, order: list[int] | None = None) -> torch.Tensor:
    """The inverse of unpack_int32: unsigned fields [R, C] (C a multiple of 32 / bits) -> int32 [R, C * bits / 32]."""
    per = 32 // bits
    r, c = values.shape
    if c % per:
        raise ValueError(f"{c} values do not fill whole int32 words of {per}")
    v = values.to(torch.int64).reshape(r, c // per, per)
    if order is not None:
        v = v[..., torch.tensor(order)]
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    words = (v << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)

