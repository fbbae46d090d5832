"""GPTQ checkpoints (AutoGPTQ / GPTQModel, `quant_method: gptq`), 4- or 8-bit: per Linear
  qweight  int32 [K * bits / 32, N]  packed along K, low bits first
  qzeros   int32 [G, N * bits / 32]  packed along N; stored minus one unless checkpoint_format
                                      is gptq_v2
  scales   fp16  [G, N]
  g_idx    int32 [K]                  the group of each input row
  w[n, k] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n]
With act-order (desc_act) g_idx is not sorted: the input rows are permuted so each group's rows are
contiguous, and the Linear permutes its input the same way (Linear.input_perm).
"""

from __future__ import annotations

import torch

from pagedserve.model.quantization.packing import unpack_int32
from pagedserve.model.quantization.weight import QuantizedWeight


def check_config(qc: dict) -> tuple[int, int, bool]:
    bits, group = int(qc.get("bits", 4)), int(qc.get("group_size", 128))
    if bits not in (4, 8):
        raise ValueError(f"GPTQ checkpoints load at 4 or 8 bits; this one is {bits}-bit")
    if str(qc.get("checkpoint_format", "gptq")).lower() not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format {qc.get('checkpoint_format')!r} is not supported (gptq, gptq_v2)")
    return bits, group, str(qc.get("checkpoint_format", "gptq")).lower() == "gptq_v2"


def to_quantized(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                 bits: int, group: int, v2: bool) -> tuple[QuantizedWeight, torch.Tensor | None]:
    """(the weight, the input permutation act-order needs or None)."""
    n = scales.shape[1]
    k = qweight.shape[0] * 32 // bits
    if group == -1:
        group = k
    q = unpack_int32(qweight.T.contiguous(), bits, k).T  # [K, N]
    z = unpack_int32(qzeros, bits, n).float() + (0 if v2 else 1)  # [G, N]
    s = scales.float()
    g = torch.arange(k) // group if g_idx is None else g_idx.long()
    if g.shape != (k,) or int(g.max()) >= s.shape[0] or s.shape != z.shape:
        raise ValueError(f"GPTQ g_idx {tuple(g.shape)} / scales {tuple(s.shape)} / zeros {tuple(z.shape)} do not "
                         f"match a [{k}, {n}] weight")
    perm = None
    if not torch.equal(g, torch.arange(k) // group):
        perm = torch.argsort(g, stable=True)
        if not torch.equal(g[perm], torch.arange(k) // group):
            raise ValueError(f"GPTQ g_idx does not give every group {group} rows")
        q = q[perm]
    zero, scale = z.T, s.T  # [N, G]
    if bits == 4:
        w = QuantizedWeight(q.T.to(torch.uint8).contiguous(), scale.contiguous(), (-zero * scale).contiguous(), 4,
                            group, "gptq")
    else:  # unsigned 0..255 -> signed: (q - z) * s = (q - 128) * s + (128 - z) * s
        w = QuantizedWeight((q.T - 128).to(torch.int8).contiguous(), scale.contiguous(),
                            ((128 - zero) * scale).contiguous(), 8, group, "gptq")
    return w, perm
