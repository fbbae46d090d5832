"""One quantized weight matrix, the form every loader produces and every kernel reads.

A [N, K] weight is kept as integers q in groups of `group_size` along K, each (row, group) with a
float32 scale and an optional offset: w = q * scale + offset. 4-bit q are unsigned (0..15), 8-bit
q signed (-128..127). Every format pagedserve loads maps onto this exactly:
  GGUF Q4_0  q - 8 scaled by d   -> scale d, offset -8d      Q8_0   scale d, no offset
  GGUF Q4_1  d * q + m           -> scale d, offset m        Q5_0/1 8-bit q, as Q4_0/Q4_1
  AWQ / GPTQ s * (q - zero)      -> scale s, offset -s*zero  (GPTQ int8 recentred to signed)
  compressed-tensors symmetric   -> scale s, no offset
`pack()` lays it out for the C++ kernels (csrc/gemm_quant_cpu.cpp); `dequantize()` is the
float32 reference the tests compare against and the path for devices without those kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

BITS = (4, 8)
PANEL = 16  # output columns per kernel panel (gemm_quant_cpu.cpp NR)


@dataclass(eq=False)
class QuantizedWeight:
    q: torch.Tensor  # [N, K]: uint8 0..15 (bits=4) or int8 (bits=8)
    scales: torch.Tensor  # float32 [N, K // group_size]
    offsets: torch.Tensor | None  # float32 like scales; None: symmetric
    bits: int
    group_size: int
    source: str = ""  # what it was loaded from, for logs: "gguf Q4_1", "awq", ...
    # GPTQ act-order: the input features in stored order (columns of q follow x[:, input_perm]), so
    # each group's rows are contiguous; the Linear permutes its input the same way.
    input_perm: torch.Tensor | None = None
    _packed: tuple | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"quantized weights must be 4- or 8-bit, got {self.bits}")
        if self.q.dim() != 2:
            raise ValueError(f"a quantized weight is 2-D [out, in], got shape {tuple(self.q.shape)}")
        n, k = self.q.shape
        want = torch.uint8 if self.bits == 4 else torch.int8
        if self.q.dtype != want:
            raise ValueError(f"{self.bits}-bit q must be {want}, got {self.q.dtype}")
        if self.group_size <= 0 or k % self.group_size:
            raise ValueError(f"group size {self.group_size} does not divide the input dimension {k} "
                             f"({self.source or 'quantized weight'} [{n}, {k}])")
        g = k // self.group_size
        for name, t in (("scales", self.scales), ("offsets", self.offsets)):
            if t is not None and (tuple(t.shape) != (n, g) or t.dtype != torch.float32):
                raise ValueError(f"{name} must be float32 [{n}, {g}] for a [{n}, {k}] weight in groups of "
                                 f"{self.group_size}, got {t.dtype} {tuple(t.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        if self.q is None:
            p, units, _ = self._packed[0].shape
            return (p * PANEL, units * (8 if self.bits == 4 else 4))
        return tuple(self.q.shape)

    def _unpacked(self) -> None:
        """Rebuild q / scales / offsets from the packed form after pack() let them go."""
        if self.q is not None:
            return
        qw, sb = self._packed
        sb = sb.float()
        scales, offsets = (sb[..., :PANEL], sb[..., PANEL:]) if sb.shape[-1] == 2 * PANEL else (sb, None)
        p, units, _ = qw.shape
        if self.bits == 8:
            q = qw.view(p, units, PANEL, 4).permute(0, 2, 1, 3).reshape(p * PANEL, units * 4)
        else:
            u = torch.stack([qw & 15, qw >> 4], -1).view(p, units, PANEL, 4, 2)
            q = u.permute(0, 2, 1, 4, 3).reshape(p * PANEL, units * 8)

        def unlay(t):
            return None if t is None else t.transpose(1, 2).reshape(p * PANEL, -1)

        self.q, self.scales, self.offsets = q.contiguous(), unlay(scales), unlay(offsets)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]: q * scale + offset, as the kernels compute it (input features in their
        true order)."""
        self._unpacked()
        n, k = self.q.shape
        q = self.q.float().view(n, k // self.group_size, self.group_size)
        w = q * self.scales.unsqueeze(-1)
        if self.offsets is not None:
            w = w + self.offsets.unsqueeze(-1)
        w = w.view(n, k)
        if self.input_perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.input_perm, w)
        return w

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids`, dequantized (an embedding lookup without the kernels)."""
        self._unpacked()
        sub = QuantizedWeight(self.q[ids], self.scales[ids], None if self.offsets is None else self.offsets[ids],
                              self.bits, self.group_size, self.source, self.input_perm)
        return sub.dequantize()

    def slice_rows(self, first: int, count: int, pad_to: int | None = None) -> QuantizedWeight:
        """Output rows [first, first + count), zero rows appended up to `pad_to` (a tensor-parallel
        shard: q/k/v, gate/up, a vocabulary shard)."""
        self._unpacked()
        part = [t[first:first + count] if t is not None else None for t in (self.q, self.scales, self.offsets)]
        if pad_to is not None and pad_to > count:
            part = [torch.cat([t, t.new_zeros(pad_to - count, t.shape[1])]) if t is not None else None for t in part]
        q, scales, offsets = (t.contiguous() if t is not None else None for t in part)
        return QuantizedWeight(q, scales, offsets, self.bits, self.group_size, self.source, self.input_perm)

    def slice_cols(self, first: int, count: int) -> QuantizedWeight | None:
        """Input columns [first, first + count) in whole groups (a row-parallel shard: o_proj, down),
        or None where the cut would split a group or the columns are act-order permuted."""
        g = self.group_size
        if first % g or count % g or self.input_perm is not None:
            return None
        self._unpacked()
        cols = slice(first // g, (first + count) // g)
        return QuantizedWeight(self.q[:, first:first + count].contiguous(), self.scales[:, cols].contiguous(),
                               None if self.offsets is None else self.offsets[:, cols].contiguous(), self.bits, g,
                               self.source)

    def permute_rows(self, perm: torch.Tensor) -> QuantizedWeight:
        self._unpacked()
        return QuantizedWeight(self.q[perm].contiguous(), self.scales[perm].contiguous(),
                               None if self.offsets is None else self.offsets[perm].contiguous(),
                               self.bits, self.group_size, self.source, self.input_perm)

    def with_layout(self, bits: int, group_size: int) -> QuantizedWeight:
        """The same values in wider integers and/or smaller groups (exact: 4-bit q fit int8 as they
        are; a group's scale repeats over its parts). What fusing q/k/v of mixed formats needs."""
        self._unpacked()
        if bits < self.bits or self.group_size % group_size:
            raise ValueError(f"cannot re-lay {self.bits}-bit groups of {self.group_size} as {bits}-bit groups of "
                             f"{group_size}")
        rep = self.group_size // group_size
        q = self.q.to(torch.int8) if bits != self.bits else self.q
        scales = self.scales.repeat_interleave(rep, dim=1) if rep > 1 else self.scales
        offsets = self.offsets
        if offsets is not None and rep > 1:
            offsets = offsets.repeat_interleave(rep, dim=1)
        return QuantizedWeight(q, scales, offsets, bits, group_size, self.source, self.input_perm)

    @staticmethod
    def cat(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """Stack along the output dimension (q/k/v into one qkv projection), in one layout."""
        perm = parts[0].input_perm
        if any((p.input_perm is None) != (perm is None) or p.input_perm is not None and not torch.equal(p.input_perm, perm)
               for p in parts):
            raise ValueError("cannot fuse act-order weights whose input orders differ (GPTQ g_idx of q/k/v or gate/up)")
        bits = max(p.bits for p in parts)
        group = math.gcd(*(p.group_size for p in parts))
        parts = [p.with_layout(bits, group) for p in parts]
        if any(p.offsets is not None for p in parts):
            offsets = torch.cat([p.offsets if p.offsets is not None else torch.zeros_like(p.scales) for p in parts])
        else:
            offsets = None
        sources = sorted({p.source for p in parts})
        return QuantizedWeight(torch.cat([p.q for p in parts]), torch.cat([p.scales for p in parts]), offsets,
                               bits, group, "+".join(sources), perm)

    def packable(self) -> str | None:
        """Why the kernels cannot take this weight (None: they can)."""
        n, k = self.shape
        if n % PANEL:
            return f"{n} output features, not a multiple of {PANEL}"
        unit = 8 if self.bits == 4 else 4  # k per 64-byte unit of the packed layout
        if self.group_size % unit:
            return f"group size {self.group_size} is not a multiple of {unit}"
        return None

    def pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(qweight, scales, offsets) in the kernels' layout, computed once and shared by every
        module that holds this weight (a tied embedding and output head keep one copy); the
        unpacked tensors are let go (rebuilt from these if ever asked for again): 64-byte
        units of 16 columns x 4 k (8-bit: int8 [N/16, K/4, 64]) or 16 columns x 8 k (4-bit, two
        values a byte: uint8 [N/16, K/8, 64]); scales [N/16, K/G, 16], or with offsets
        [N/16, K/G, 32] (a group's 16 scales, then its 16 offsets: one stream, read beside the
        weights), float16 when every value is one exactly (GGUF's: fewer bytes per decode step,
        the same products), else float32. See csrc/gemm_quant_cpu.cpp."""
        if self._packed is None:
            why = self.packable()
            if why:
                raise ValueError(f"cannot pack this quantized weight for the CPU kernels: {why}")
            n, k = self.q.shape
            p, g = n // PANEL, k // self.group_size
            if self.bits == 8:  # byte 4c + i of unit t: column c, k = 4t + i
                qw = self.q.view(p, PANEL, k // 4, 4).permute(0, 2, 1, 3).reshape(p, k // 4, 64).contiguous()
            else:  # low nibble: column c, k = 8t + i; high nibble: k = 8t + 4 + i
                u = self.q.view(p, PANEL, k // 8, 2, 4).permute(0, 2, 1, 4, 3)  # [P, K/8, 16, 4, 2]
                qw = (u[..., 0] | (u[..., 1] << 4)).reshape(p, k // 8, 64).contiguous()

            def lay(t):
                return t.view(p, PANEL, g).transpose(1, 2)

            sb = lay(self.scales) if self.offsets is None else torch.cat([lay(self.scales), lay(self.offsets)], -1)
            sb16 = sb.half()
            if torch.equal(sb16.float(), sb):
                sb = sb16
            self._packed = (qw, sb.contiguous())
            self.q = self.scales = self.offsets = None  # one copy resident: q alone is a byte a value
        return self._packed

    def move_packed(self, place) -> None:
        """Put the packed tensors where `place(tensor) -> copy` puts them (a HugePageArena)."""
        self._packed = tuple(place(t) for t in self.pack())

    def nbytes(self) -> int:
        """Bytes the packed form keeps resident."""
        n, k = self.shape
        if self._packed is None:  # before packing: as pack() will store them
            halves = all(t is None or torch.equal(t.half().float(), t) for t in (self.scales, self.offsets))
            per_group = (2 if halves else 4) * (1 if self.offsets is None else 2)
        else:
            sb = self._packed[1]
            per_group = sb.element_size() * sb.shape[-1] // PANEL
        return n * k * self.bits // 8 + n * (k // self.group_size) * per_group
