"""Paged attention in Triton: the GPU path's kernels (issue 27), behind the AttentionBackend interface.

Three launches a layer, whatever the step holds:
  store      every token's K and V into its slot (block, offset) of the paged cache, rounded (16-bit,
             fp8 e5m2) or scaled per (token, kv head) row (int8, fp8 e4m3: quantize_kv's bits);
  decode     flash-decoding: each decode's context is split over `splits` programs per KV head
             (so a few long sequences still fill the GPU); a program reads each K/V block once for
             the whole GQA group of query heads sharing it (the group is the rows of one tile),
             keeps a running max / sum / accumulator, and writes its partial result; a second small
             kernel merges the splits;
  prefill    every prefill chunk of the step in one launch: programs are (query tile, head) pairs
             over all chunks (the tile list is built once a step and shared by the layers); a tile
             attends over its cached prefix, read through the block table, then causally over its
             chunk's own K/V as computed (scaled caches: read back from the cache, as the CPU
             kernels do, so no output depends on chunking).
Math is float32 where the model is (test parity with the PyTorch reference), else the matmuls run
in the model's 16-bit type with float32 accumulation and softmax.

Without a GPU the same kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below when CUDA
is absent), on CPU tensors: that is how CI checks them against the PyTorch backend on every run.
Triton is an optional dependency (`pip install triton`; torch's CUDA wheels bring it).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # no GPU: the interpreter (read when the kernels are defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and not type(tl.cdiv).__name__ == "InterpretedFunction":
    raise RuntimeError("Triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on this "
                       "machine without a GPU: set TRITON_INTERPRET=1 in the environment before starting")

from pagedserve.model.attention import KV_QMAX, AttentionBackend, AttentionMetadata, ScaledKV  # noqa: E402

# float32 matmuls exactly (no TF32): the reference's precision
_F32_DOT = "ieee"
PREFILL_BLOCK_M = 16  # query rows per prefill program
PREFILL_BLOCK_N = 16  # chunk keys per inner step
DECODE_PROGRAMS = 512  # aim for about this many decode programs (seqs x kv heads x splits)


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


INTERPRETED = tl.constexpr(interpreted())


@triton.jit
def _round_even(x):
    # round half to even for |x| < 2^22 (torch.round's rule, so int8 bits match quantize_kv)
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _keep_top_bits(x, LOW: tl.constexpr):
    # float32 x rounded (nearest, ties to even) to its top 32 - LOW bits, low bits zeroed
    b = x.to(tl.uint32, bitcast=True)
    b = b + ((1 << (LOW - 1)) - 1) + ((b >> LOW) & 1)
    return ((b >> LOW) << LOW).to(tl.float32, bitcast=True)


@triton.jit
def _to_cache(x, DT: tl.constexpr):
    """float32 -> the cache's type, rounded to nearest even as torch's .to() rounds. The rounding
    is done in float32 bits first, so the narrowing conversion is exact: the interpreter (CI's
    CPU runs) truncates where a GPU would round."""
    if DT == tl.float32:
        return x
    elif DT == tl.bfloat16:
        return _keep_top_bits(x, 16).to(DT)
    elif DT == tl.float8e5:  # 2 mantissa bits; e5m2's normals reach down to 2^-14
        ax = tl.abs(x)
        sub = _round_even(x * 65536.0) / 65536.0  # its subnormals: steps of 2^-16
        return tl.where(ax < 6.103515625e-05, sub, _keep_top_bits(x, 21)).to(DT)
    elif DT == tl.float8e4nv:  # 3 mantissa bits; normals down to 2^-6 (callers clamp to +-448)
        ax = tl.abs(x)
        sub = _round_even(x * 512.0) / 512.0  # subnormals: steps of 2^-9
        return tl.where(ax < 0.015625, sub, _keep_top_bits(x, 20)).to(DT)
    else:  # float16 (the interpreter rounds it right), int8 (already rounded)
        return x.to(DT)


@triton.jit
def _store_kv_kernel(x_ptr, cache_ptr, scale_ptr, blocks_ptr, offsets_ptr,
                     sx_t, sx_h, sc_b, sc_h, sc_o, ss_b, ss_h,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SCALED: tl.constexpr, QMAX: tl.constexpr,
                     IS_INT: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    dm = d < HEAD_DIM
    x = tl.load(x_ptr + t * sx_t + h * sx_h + d, mask=dm, other=0.0).to(tl.float32)
    blk = tl.load(blocks_ptr + t)
    off = tl.load(offsets_ptr + t)
    if blk >= 0:  # PAD_SLOT (a padding row of a CUDA-graph step): nothing to store
        dst = cache_ptr + blk * sc_b + h * sc_h + off * sc_o + d
        if SCALED:
            amax = tl.max(tl.abs(x), axis=0)
            inv = tl.where(amax > 0, QMAX / amax, 0.0)
            y = tl.minimum(tl.maximum(x * inv, -QMAX), QMAX)
            if IS_INT:
                y = _round_even(y)
            tl.store(dst, _to_cache(y, cache_ptr.dtype.element_ty), mask=dm)
            tl.store(scale_ptr + blk * ss_b + h * ss_h + off, amax * (1.0 / QMAX))
        else:
            tl.store(dst, _to_cache(x, cache_ptr.dtype.element_ty), mask=dm)


@triton.jit
def _load_kv(cache_ptr, scale_ptr, blk, kh, rows, d, row_mask, d_mask, sc_b, sc_h, sc_o, ss_b, ss_h,
             SCALED: tl.constexpr):
    """Rows `rows` of block `blk`, kv head `kh` of a cache, as float32 [R, BLOCK_D] (scaled: x scale)."""
    x = tl.load(cache_ptr + blk * sc_b + kh * sc_h + rows[:, None] * sc_o + d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    if SCALED:
        s = tl.load(scale_ptr + blk * ss_b + kh * ss_h + rows, mask=row_mask, other=0.0)
        x = x * s[:, None]
    return x


@triton.jit
def _dot(a, b, F32: tl.constexpr, DT: tl.constexpr):
    """a @ b with float32 accumulation: exact float32 for a float32 model, else on DT (16-bit)
    inputs. The interpreter's 16-bit dot is wrong (numpy has no bfloat16), so there the inputs are
    rounded to DT and multiplied in float32: the same products."""
    if F32:
        return tl.dot(a, b, input_precision="ieee")
    elif INTERPRETED:
        return tl.dot(_to_cache(a, DT).to(tl.float32), _to_cache(b, DT).to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def _attend(q, k, v, see, m_i, l_i, acc, scale, F32: tl.constexpr, DT: tl.constexpr):
    """One online-softmax step over a tile of keys: q [R, D] against k, v [N, D] where `see`
    [R, N] allows, folded into the running max m_i, sum l_i and accumulator acc [R, D]."""
    qk = tl.where(see, _dot(q, tl.trans(k), F32, DT) * scale, -1.0e30)
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    p = tl.where(see, tl.exp(qk - m_new[:, None]), 0.0)
    alpha = tl.exp(m_i - m_new)
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + _dot(p, v, F32, DT)


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, tables_ptr, lens_ptr, part_o_ptr, part_ml_ptr,
                   scale, blocks_per_split,
                   sq_t, sq_h, st_s, sc_b, sc_h, sc_o, ss_b, ss_h, spo_s, spo_h, spo_p, spm_s, spm_h, spm_p,
                   GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, SCALED: tl.constexpr, F32: tl.constexpr, DT: tl.constexpr):
    s = tl.program_id(0)
    kh = tl.program_id(1)
    sp = tl.program_id(2)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gm = g < GROUP
    dm = d < HEAD_DIM
    heads = kh * GROUP + g
    q = tl.load(q_ptr + s * sq_t + heads[:, None] * sq_h + d[None, :], mask=gm[:, None] & dm[None, :],
                other=0.0).to(tl.float32)
    ctx = tl.load(lens_ptr + s)
    first = sp * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(ctx, BLOCK_SIZE))
    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    rows = tl.arange(0, BLOCK_SIZE)
    for b in range(first, last):
        blk = tl.load(tables_ptr + s * st_s + b)
        pos = b * BLOCK_SIZE + rows
        live = pos < ctx
        k = _load_kv(k_ptr, ks_ptr, blk, kh, rows, d, live, dm, sc_b, sc_h, sc_o, ss_b, ss_h, SCALED)
        v = _load_kv(v_ptr, vs_ptr, blk, kh, rows, d, live, dm, sc_b, sc_h, sc_o, ss_b, ss_h, SCALED)
        m_i, l_i, acc = _attend(q, k, v, gm[:, None] & live[None, :], m_i, l_i, acc, scale, F32, DT)
    tl.store(part_o_ptr + s * spo_s + heads[:, None] * spo_h + sp * spo_p + d[None, :], acc,
             mask=gm[:, None] & dm[None, :])
    tl.store(part_ml_ptr + s * spm_s + heads * spm_h + sp * spm_p, m_i, mask=gm)
    tl.store(part_ml_ptr + s * spm_s + heads * spm_h + sp * spm_p + 1, l_i, mask=gm)


@triton.jit
def _merge_splits_kernel(part_o_ptr, part_ml_ptr, out_ptr, splits,
                         spo_s, spo_h, spo_p, spm_s, spm_h, spm_p, so_t, so_h,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    s = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.arange(0, BLOCK_P)
    d = tl.arange(0, BLOCK_D)
    pm = p < splits
    dm = d < HEAD_DIM
    base = part_ml_ptr + s * spm_s + h * spm_h + p * spm_p
    m = tl.load(base, mask=pm, other=-1.0e30)
    l = tl.load(base + 1, mask=pm, other=0.0)
    mx = tl.max(m, axis=0)
    w = tl.where(pm & (l > 0), tl.exp(m - mx), 0.0)
    o = tl.load(part_o_ptr + s * spo_s + h * spo_h + p[:, None] * spo_p + d[None, :],
                mask=pm[:, None] & dm[None, :], other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + s * so_t + h * so_h + d, out.to(out_ptr.dtype.element_ty), mask=dm)


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, out_ptr,
                    tiles_ptr, chunks_ptr, tables_ptr, scale,
                    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h, st_c, sc_b, sc_h, sc_o, ss_b, ss_h,
                    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SCALED: tl.constexpr, F32: tl.constexpr,
                    DT: tl.constexpr):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    kh = h // GROUP
    c = tl.load(tiles_ptr + tile * 2)  # the tile's chunk
    row0 = tl.load(tiles_ptr + tile * 2 + 1)  # its first row inside the chunk
    start = tl.load(chunks_ptr + c * 3)  # the chunk's first token in the step
    n = tl.load(chunks_ptr + c * 3 + 1)  # its tokens
    ctx = tl.load(chunks_ptr + c * 3 + 2)  # context after it
    r = row0 + tl.arange(0, BLOCK_M)
    rm = r < n
    d = tl.arange(0, BLOCK_D)
    dm = d < HEAD_DIM
    q = tl.load(q_ptr + (start + r)[:, None] * sq_t + h * sq_h + d[None, :], mask=rm[:, None] & dm[None, :],
                other=0.0).to(tl.float32)
    qpos = ctx - n + r
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # 1. what the cache holds: the prefix (scaled caches: the chunk too, read back rounded)
    if SCALED:
        cached = ctx
    else:
        cached = ctx - n
    hi = tl.minimum(cached, ctx - n + row0 + BLOCK_M)  # no tile row sees past its last row
    rows = tl.arange(0, BLOCK_SIZE)
    for b in range(0, tl.cdiv(hi, BLOCK_SIZE)):
        blk = tl.load(tables_ptr + c * st_c + b)
        pos = b * BLOCK_SIZE + rows
        live = pos < cached
        k = _load_kv(kc_ptr, ks_ptr, blk, kh, rows, d, live, dm, sc_b, sc_h, sc_o, ss_b, ss_h, SCALED)
        v = _load_kv(vc_ptr, vs_ptr, blk, kh, rows, d, live, dm, sc_b, sc_h, sc_o, ss_b, ss_h, SCALED)
        see = live[None, :] & (pos[None, :] <= qpos[:, None])
        m_i, l_i, acc = _attend(q, k, v, see, m_i, l_i, acc, scale, F32, DT)
    # 2. unscaled caches: the chunk's own K/V as computed, causally
    if not SCALED:
        j = tl.arange(0, BLOCK_N)
        for j0 in range(0, tl.minimum(n, row0 + BLOCK_M), BLOCK_N):
            jj = j0 + j
            live = jj < n
            lm = live[:, None] & dm[None, :]
            tok = (start + jj)[:, None]
            k = tl.load(k_ptr + tok * sk_t + kh * sk_h + d[None, :], mask=lm, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + tok * sv_t + kh * sv_h + d[None, :], mask=lm, other=0.0).to(tl.float32)
            see = live[None, :] & (jj[None, :] <= r[:, None])
            m_i, l_i, acc = _attend(q, k, v, see, m_i, l_i, acc, scale, F32, DT)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (start + r)[:, None] * so_t + h * so_h + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rm[:, None] & dm[None, :])


_TL_TYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _parts(cache):
    return (cache.data, cache.scales) if isinstance(cache, ScaledKV) else (cache, None)


class TritonPagedAttention(AttentionBackend):
    """Attention through the Triton kernels above; a CUDA device, or CPU tensors in the interpreter."""

    name = "triton"

    def __init__(self, decode_splits: int | None = None):
        self.decode_splits = decode_splits  # None: chosen per step (tests force several)
        self._checked = False

    def _check(self, cache, device) -> None:
        """What compiled kernels cannot do, said at the first step (the engine's warm-up) rather
        than as a compiler error: tl.dot wants tiles of 16+ (blocks and heads), and Triton converts
        to fp8 e4m3 only on compute capability 8.9+ (Ada, Hopper)."""
        data = cache.data if isinstance(cache, ScaledKV) else cache
        if not interpreted():
            if data.shape[2] < 16 or data.shape[3] < 16:
                raise ValueError(f"the triton attention backend needs --block-size >= 16 and head_dim >= 16 (got "
                                 f"{data.shape[2]} and {data.shape[3]}); use --attention-backend torch")
            if data.dtype == torch.float8_e4m3fn and device.type == "cuda" and \
                    torch.cuda.get_device_capability(device) < (8, 9):
                raise ValueError("--kv-cache-dtype fp8 (e4m3) needs an Ada/Hopper GPU with the triton backend; use "
                                 "--kv-cache-dtype int8, or --attention-backend torch")
        self._checked = True

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, scale):
        if not self._checked:
            self._check(kv_cache[0], q.device)
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))  # rows may be strided, not elements
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        self.store(k, k_cache, meta)
        self.store(v, v_cache, meta)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if meta.num_decodes:
            self.decode(q, k_cache, v_cache, meta, scale, out)
        if meta.prefills:
            self.prefill(q, k, v, k_cache, v_cache, meta, scale, out)
        return out

    @staticmethod
    def store(x, cache, meta: AttentionMetadata) -> None:
        data, scales = _parts(cache)
        t, kvh, hd = x.shape
        if t == 0:
            return
        scaled = scales is not None
        _store_kv_kernel[(t, kvh)](
            x, data, scales if scaled else data, meta.slot_blocks, meta.slot_offsets,
            x.stride(0), x.stride(1), data.stride(0), data.stride(1), data.stride(2),
            scales.stride(0) if scaled else 0, scales.stride(1) if scaled else 0,
            HEAD_DIM=hd, BLOCK_D=triton.next_power_of_2(hd), SCALED=scaled,
            QMAX=KV_QMAX.get(data.dtype, 1.0), IS_INT=data.dtype == torch.int8)

    def _splits(self, nd: int, kvh: int, max_blocks: int) -> int:
        if self.decode_splits is not None:
            return max(1, min(self.decode_splits, max_blocks))
        if interpreted():  # every program is Python here: fewer, longer ones
            return 1
        return max(1, min(max_blocks, DECODE_PROGRAMS // max(1, nd * kvh)))

    def decode(self, q, k_cache, v_cache, meta: AttentionMetadata, scale, out) -> None:
        nd = meta.num_decodes
        _, h, hd = q.shape
        kd, ks = _parts(k_cache)
        vd, vs = _parts(v_cache)
        kvh, bs = kd.shape[1], kd.shape[2]
        group = h // kvh
        max_blocks = -(-meta.decode_max_context // bs)
        splits = self._splits(nd, kvh, max_blocks)
        per_split = -(-max_blocks // splits)
        bd = triton.next_power_of_2(hd)
        part_o = torch.empty((nd, h, splits, bd), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((nd, h, splits, 2), dtype=torch.float32, device=q.device)
        scaled = ks is not None
        tables = meta.decode_block_tables
        _decode_kernel[(nd, kvh, splits)](
            q, kd, vd, ks if scaled else kd, vs if scaled else vd, tables, meta.decode_context_lens, part_o, part_ml,
            scale, per_split,
            q.stride(0), q.stride(1), tables.stride(0), kd.stride(0), kd.stride(1), kd.stride(2),
            ks.stride(0) if scaled else 0, ks.stride(1) if scaled else 0,
            part_o.stride(0), part_o.stride(1), part_o.stride(2),
            part_ml.stride(0), part_ml.stride(1), part_ml.stride(2),
            GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_SIZE=bs, HEAD_DIM=hd, BLOCK_D=bd,
            SCALED=scaled, F32=q.dtype == torch.float32, DT=_TL_TYPES[q.dtype])
        _merge_splits_kernel[(nd, h)](
            part_o, part_ml, out, splits,
            part_o.stride(0), part_o.stride(1), part_o.stride(2),
            part_ml.stride(0), part_ml.stride(1), part_ml.stride(2), out.stride(0), out.stride(1),
            HEAD_DIM=hd, BLOCK_D=bd, BLOCK_P=triton.next_power_of_2(splits))

    @staticmethod
    def _prefill_plan(meta: AttentionMetadata, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tiles [n, 2]: chunk, first row; chunks [C, 3]: start, tokens, context; block tables
        [C, max]), built once a step: the first layer stores it on the step's metadata."""
        plan = getattr(meta, "_triton_prefill", None)
        if plan is None:
            tiles = [(c, r) for c, p in enumerate(meta.prefills) for r in range(0, p.num_tokens, PREFILL_BLOCK_M)]
            chunks = [(p.start, p.num_tokens, p.context_len) for p in meta.prefills]
            width = max(p.block_table.numel() for p in meta.prefills)
            tables = torch.zeros((len(meta.prefills), max(width, 1)), dtype=torch.int64)
            for c, p in enumerate(meta.prefills):
                tables[c, :p.block_table.numel()] = p.block_table.cpu()
            plan = tuple(torch.tensor(x, dtype=torch.int64).to(device) for x in (tiles, chunks)) + (tables.to(device),)
            meta._triton_prefill = plan
        return plan

    def prefill(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale, out) -> None:
        tiles, chunks, tables = self._prefill_plan(meta, q.device)
        _, h, hd = q.shape
        kd, ks = _parts(k_cache)
        vd, vs = _parts(v_cache)
        kvh, bs = kd.shape[1], kd.shape[2]
        scaled = ks is not None
        _prefill_kernel[(tiles.shape[0], h)](
            q, k, v, kd, vd, ks if scaled else kd, vs if scaled else vd, out, tiles, chunks, tables, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            tables.stride(0),
            kd.stride(0), kd.stride(1), kd.stride(2), ks.stride(0) if scaled else 0, ks.stride(1) if scaled else 0,
            GROUP=h // kvh, BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=PREFILL_BLOCK_N, BLOCK_SIZE=bs, HEAD_DIM=hd,
            BLOCK_D=triton.next_power_of_2(hd), SCALED=scaled, F32=q.dtype == torch.float32, DT=_TL_TYPES[q.dtype])
