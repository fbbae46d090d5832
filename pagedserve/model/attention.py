"""Paged attention over a flattened batch, behind one interface.

A step's tokens arrive concatenated: first one token per decoding request, then the chunks of
requests that are prefilling. A layer's cache is [2, num_blocks, kv_heads, block_size, head_dim]:
head-major inside a block, so one head's keys of a block are contiguous (4 KiB for 16 tokens of
64 floats), which is what a decode kernel streams. Every token's K/V is written into its slot
(block_id, offset), then:
  - decodes attend over their whole context, read through their block tables;
  - each prefill chunk attends causally over its cached prefix plus itself.

The cache may hold a narrower type than the model computes in (--kv-cache-dtype): K/V are
rounded when stored and widened when read; a prefill chunk attends over its own K/V as computed.
int8 and fp8 (e4m3) caches are scaled: a ScaledKV pairs the stored values with one float32 scale
per (token, kv head), see quantize_kv; with those a chunk reads its own K/V back from the cache
too, so no output depends on how a prompt was chunked or which prefix came from the cache.
Backends implement `forward`; `get_attention_backend` picks one for the device. The pure-PyTorch
backend runs anywhere (CPU float32 here, CUDA bfloat16 where a GPU exists).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    start: int  # index of the chunk's first token in the flattened batch
    num_tokens: int
    context_len: int  # tokens in the cache after this chunk (prefix + chunk)
    block_table: torch.Tensor  # [num_blocks] int64


# A token whose slot block is PAD_SLOT has no slot: its K/V is not stored (the padding rows of a
# CUDA-graph decode step, engine/cuda_graphs.py; honoured by the Triton store, the graphs' backend).
PAD_SLOT = -1

# --kv-cache-dtype int8 / fp8 (e4m3): stored = x / s per (token, kv head) row, s = max|x| / QMAX.
KV_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def quantize_kv(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows x [..., D] -> (stored [..., D] of dtype, scales [...] float32), the C++ write_kv's bits
    (csrc/kv_types.h quantize_row): inverse scale qmax / max|x| (0 for an all-zero row), values
    clamped to the format's range, int8 rounded to nearest even."""
    qmax = KV_QMAX[dtype]
    x = x.float()
    amax = x.abs().amax(-1)
    inv = torch.where(amax > 0, qmax / amax, torch.zeros_like(amax))
    y = (x * inv.unsqueeze(-1)).clamp(-qmax, qmax)
    return (y.round() if dtype == torch.int8 else y).to(dtype), amax * (1.0 / qmax)


@dataclass(frozen=True)
class ScaledKV:
    """A scaled KV cache (int8 / float8_e4m3fn): `data` [..., block_size, D] and its row scales
    `scales` [..., block_size] float32, indexed together like the tensor it stands for (all
    layers, one layer, its K or V half, gathered blocks)."""

    data: torch.Tensor
    scales: torch.Tensor

    def __getitem__(self, idx) -> "ScaledKV":
        return ScaledKV(self.data[idx], self.scales[idx])

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    def clone(self) -> "ScaledKV":
        return ScaledKV(self.data.clone(), self.scales.clone())

    def to(self, dtype: torch.dtype) -> torch.Tensor:
        """The values read back: scale * stored."""
        return self.data.to(dtype) * self.scales.unsqueeze(-1).to(dtype)


def store_kv(cache, blocks: torch.Tensor, offsets: torch.Tensor, x: torch.Tensor) -> None:
    """Write rows x [T, KVH, D] into their slots of one layer's K or V cache (a tensor or ScaledKV)."""
    if isinstance(cache, ScaledKV):
        stored, scales = quantize_kv(x, cache.dtype)
        cache.data[blocks, :, offsets] = stored
        cache.scales[blocks, :, offsets] = scales
    else:
        cache[blocks, :, offsets] = x.to(cache.dtype)


@dataclass
class AttentionMetadata:
    slot_blocks: torch.Tensor  # [T] int64: the block each token's K/V goes to
    slot_offsets: torch.Tensor  # [T] int64: its offset inside that block
    num_decodes: int  # the first num_decodes tokens are decodes, one per request
    decode_block_tables: torch.Tensor | None  # [D, max_blocks] int64 (padded with 0)
    decode_context_lens: torch.Tensor | None  # [D] int64
    decode_max_context: int
    prefills: list[PrefillChunk]
    block_size: int


class AttentionBackend:
    name = "base"

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, KVH, D]
        v: torch.Tensor,  # [T, KVH, D]
        kv_cache: torch.Tensor,  # [2, num_blocks, KVH, block_size, D]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, H, D]
        raise NotImplementedError


class TorchPagedAttention(AttentionBackend):
    """Reference backend in plain PyTorch; SDPA does the math."""

    name = "torch"

    def forward(self, q, k, v, kv_cache, meta, scale):
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        self._write_kv(k, v, k_cache, v_cache, meta)
        nd = meta.num_decodes
        if nd == q.shape[0]:  # a decode-only step: no output slices to stitch
            return self._decode(q, k_cache, v_cache, meta, scale)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache, meta, scale)
        for p in meta.prefills:
            sl = slice(p.start, p.start + p.num_tokens)
            out[sl] = self._prefill(q[sl], k[sl], v[sl], k_cache, v_cache, p, meta.block_size, scale)
        return out

    @staticmethod
    def _write_kv(k, v, k_cache, v_cache, meta: AttentionMetadata):
        store_kv(k_cache, meta.slot_blocks, meta.slot_offsets, k)
        store_kv(v_cache, meta.slot_blocks, meta.slot_offsets, v)

    @staticmethod
    def _decode(q, k_cache, v_cache, meta: AttentionMetadata, scale):
        n, h, d = q.shape
        kvh = k_cache.shape[1]
        bs = meta.block_size
        nblocks = -(-meta.decode_max_context // bs)
        bt = meta.decode_block_tables[:, :nblocks]
        # Gather each request's blocks: [n, MB, KVH, BS, D] -> [n, KVH, L, D] (a copy).
        keys = k_cache[bt].to(q.dtype).transpose(1, 2).reshape(n, kvh, nblocks * bs, d)
        values = v_cache[bt].to(q.dtype).transpose(1, 2).reshape(n, kvh, nblocks * bs, d)
        pos = torch.arange(nblocks * bs, device=q.device)
        mask = (pos[None, :] < meta.decode_context_lens[:, None])[:, None, None, :]  # [n,1,1,L]
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # [n, H, 1, D]
            keys,
            values,
            attn_mask=mask,
            scale=scale,
            enable_gqa=h != kvh,
        )
        return o.squeeze(2)

    @staticmethod
    def _prefill(q, k, v, k_cache, v_cache, p: PrefillChunk, bs, scale):
        qn, h, d = q.shape
        kvh = k.shape[1]
        # Positions read back from the cache: the prefix, and for int8 / fp8 the chunk's own too
        # (prefill_attention_cpu.cpp's kv_rows: outputs then do not depend on chunking or caching).
        cached = p.context_len if isinstance(k_cache, ScaledKV) else p.context_len - qn
        if cached == 0:  # nothing cached before this chunk: use K/V as computed
            keys, values, mask, causal = k, v, None, True
        else:
            blocks = p.block_table[: -(-cached // bs)]
            # [nb, KVH, BS, D] -> [cached, KVH, D] in token order.
            keys = k_cache[blocks].to(q.dtype).transpose(0, 1).reshape(kvh, -1, d)[:, :cached].transpose(0, 1)
            values = v_cache[blocks].to(q.dtype).transpose(0, 1).reshape(kvh, -1, d)[:, :cached].transpose(0, 1)
            if cached < p.context_len:  # then the chunk's own as computed
                keys, values = torch.cat([keys, k]), torch.cat([values, v])
            qpos = torch.arange(qn, device=q.device)[:, None] + (p.context_len - qn)
            mask = torch.arange(p.context_len, device=q.device)[None, :] <= qpos
            causal = False
        # A leading batch dim matters: 4-D inputs take PyTorch's CPU flash-attention kernel,
        # 3-D ones the unfused math path (2.5-3x slower for 256-512 token chunks here).
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
            enable_gqa=h != kvh,
        )
        return o[0].transpose(0, 1)


class CppCpuPagedAttention(TorchPagedAttention):
    """Attention in C++ (csrc/): decode tokens read K/V blocks in place through the block tables
    (paged_attention_cpu.cpp), each prefill chunk runs a flash-attention kernel over its cached
    prefix and itself (prefill_attention_cpu.cpp), and the K/V writes are one call instead of two
    index_puts. Every output lands in one [T, H, D] tensor: no slices to stitch."""

    name = "cpp"

    def __init__(self):
        from pagedserve.model import cpu_kernels

        self.ops = cpu_kernels.load(required=True)
        # q.k and p.v in bf16 on a bf16 cache (csrc/attention_bf16.h): set by the runner for bf16
        # models on CPUs with AVX512_BF16; the kernel keeps float32 math anywhere else.
        self.bf16_math = False

    def forward(self, q, k, v, kv_cache, meta, scale):
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        self._write_kv(k, v, k_cache, v_cache, meta)
        ks, vs = _scales(k_cache), _scales(v_cache)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        nd = meta.num_decodes
        if nd:
            self._decode(q[:nd], k_cache, v_cache, meta, scale, out[:nd])
        for p in meta.prefills:
            self.ops.paged_attention_prefill(out, q, k, v, _data(k_cache), _data(v_cache), p.block_table, p.start,
                                             p.num_tokens, p.context_len, scale, self.bf16_math, ks, vs)
        return out

    def _write_kv(self, k, v, k_cache, v_cache, meta: AttentionMetadata):
        self.ops.write_kv(k, v, _data(k_cache), _data(v_cache), meta.slot_blocks, meta.slot_offsets,
                          _scales(k_cache), _scales(v_cache))

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata, scale, out=None):
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        self.ops.paged_attention_decode(
            out, q, _data(k_cache), _data(v_cache), meta.decode_block_tables, meta.decode_context_lens, scale,
            self.bf16_math, _scales(k_cache), _scales(v_cache)
        )
        return out


def _data(cache):
    return cache.data if isinstance(cache, ScaledKV) else cache


def _scales(cache):
    return cache.scales if isinstance(cache, ScaledKV) else None


CPP_KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e5m2, torch.int8, torch.float8_e4m3fn)


TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def get_attention_backend(device: torch.device, dtype: torch.dtype, name: str | None = None,
                          kv_dtype: torch.dtype | None = None) -> AttentionBackend:
    """Pick the attention backend: by name ("torch", "cpp", "triton"), or "auto"/None: on CPU the
    C++ kernel for float32 models when it builds here, on CUDA the Triton kernels when Triton is
    installed, else the pure-PyTorch one (any device and dtype). "triton" on a machine without a
    GPU runs the kernels in Triton's interpreter: correct, and slow (the tests use it)."""
    name = name or "auto"
    kv_dtype = kv_dtype or dtype
    fits_cpp = device.type == "cpu" and dtype == torch.float32 and kv_dtype in CPP_KV_DTYPES
    fits_triton = dtype in TRITON_DTYPES and kv_dtype in CPP_KV_DTYPES and device.type in ("cuda", "cpu")
    if name == "torch":
        return TorchPagedAttention()
    if name == "cpp":
        if not fits_cpp:
            raise ValueError("the 'cpp' attention backend runs on CPU with a float32 model (KV cache float32, "
                             "float16 or bfloat16); use 'torch' or 'auto'")
        return CppCpuPagedAttention()
    if name == "triton":
        if not fits_triton:
            raise ValueError(f"the 'triton' attention backend runs float32/float16/bfloat16 models on CUDA (or CPU "
                             f"through Triton's interpreter), not {dtype} on {device.type}; use 'torch' or 'auto'")
        if not triton_available():
            raise ValueError("the 'triton' attention backend needs Triton: pip install triton (CUDA builds of torch "
                             "bring it)")
        from pagedserve.model.triton_attention import TritonPagedAttention

        return TritonPagedAttention()
    if name != "auto":
        raise ValueError(f"unknown attention backend {name!r}; choose auto, cpp, triton or torch")
    if fits_cpp:
        from pagedserve.model import cpu_kernels

        if cpu_kernels.load() is not None:
            return CppCpuPagedAttention()
    if device.type == "cuda" and fits_triton and triton_available():
        from pagedserve.model.triton_attention import TritonPagedAttention

        return TritonPagedAttention()
    return TorchPagedAttention()
