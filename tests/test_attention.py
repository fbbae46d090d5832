"""The C++ CPU kernels (paged decode and prefill attention, packed-weight GEMM, fused RMSNorm / rotary / SiLU*up)
against the PyTorch reference path on random data."""

import pytest
import torch

from pagedserve.model import cpu_kernels, kernel_levels
from pagedserve.model.attention import (AttentionMetadata, CppCpuPagedAttention, PrefillChunk, ScaledKV,
                                        TorchPagedAttention, quantize_kv)

KV_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e5m2, torch.int8, torch.float8_e4m3fn]


def _cache(x: torch.Tensor, dtype: torch.dtype):
    """Random K/V x as a cache of dtype: a ScaledKV for int8 / float8 e4m3 (scale per row)."""
    return ScaledKV(*quantize_kv(x, dtype)) if dtype in (torch.int8, torch.float8_e4m3fn) else x.to(dtype)


def _same(a, b) -> bool:
    """Caches equal byte for byte (values and, when scaled, scales)."""
    if isinstance(a, ScaledKV):
        return _same(a.data, b.data) and torch.equal(a.scales, b.scales)
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.fixture(autouse=True, params=[lv.name for lv in kernel_levels.supported_levels()])
def kernel_level(request, monkeypatch):
    """Every test here runs on each installed build this CPU can run (x86-64-v4's AVX-512 tiles
    and x86-64-v3's AVX2 ones on an AVX-512 machine), whichever one the process picked."""
    monkeypatch.setattr(cpu_kernels, "_module", cpu_kernels.load_level(request.param))
    monkeypatch.setattr(cpu_kernels, "_error", None)
    return request.param


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size",
                         [(9, 3, 64, 16), (4, 4, 32, 8), (8, 2, 128, 4), (6, 1, 16, 1), (4, 2, 96, 5), (14, 2, 64, 16),
                          (8, 2, 128, 32)])
@pytest.mark.parametrize("lens", [[1, 5, 17, 33, 64, 2, 100], [700], [3, 400]])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_cpp_decode_matches_torch(heads, kv_heads, head_dim, block_size, lens, kv_dtype):
    """Many sequences (one pass per sequence), and one or two long ones, where each sequence's
    blocks are split over the threads and the partial softmax states merged (also with a split
    range that is empty for the short sequence). A 16-bit cache (--kv-cache-dtype) is widened as it
is read, an int8 / e4m3 one also scaled per row: the same values as the PyTorch path, which
widens the gathered copy."""
    g = torch.Generator().manual_seed(0)
    n = len(lens)
    lens = torch.tensor(lens, dtype=torch.long)
    max_blocks = int(-(-lens.max() // block_size))
    num_blocks = max_blocks * 2
    # Scattered, overlapping block tables (shared blocks are fine for attention).
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.stack([perm.roll(i * 3)[:max_blocks] for i in range(n)]).contiguous()
    kv = _cache(torch.randn(2, num_blocks, kv_heads, block_size, head_dim, generator=g), kv_dtype)
    q = torch.randn(n, heads, head_dim, generator=g)
    meta = AttentionMetadata(slot_blocks=torch.zeros(0, dtype=torch.long), slot_offsets=torch.zeros(0, dtype=torch.long), num_decodes=n,
                             decode_block_tables=tables, decode_context_lens=lens,
                             decode_max_context=int(lens.max()), prefills=[], block_size=block_size)
    scale = head_dim**-0.5
    ref = TorchPagedAttention._decode(q, kv[0], kv[1], meta, scale)
    out = CppCpuPagedAttention()._decode(q, kv[0], kv[1], meta, scale)
    assert (out - ref).abs().max().item() < 1e-5
    # q as the kernel gets it in the model: a row-strided view of the fused QKV output
    qkv = torch.cat([q.view(n, -1), torch.randn(n, 2 * kv_heads * head_dim, generator=g)], dim=1)
    strided = qkv[:, : heads * head_dim].view(n, heads, head_dim)
    assert n == 1 or not strided.is_contiguous()  # (one row counts as contiguous whatever its stride)
    out = CppCpuPagedAttention()._decode(strided, kv[0], kv[1], meta, scale)
    assert (out - ref).abs().max().item() < 1e-5


def _step(heads, kv_heads, head_dim, block_size, chunks, kv_dtype):
    """A step's inputs: decodes of 3 and 40 tokens, then prompt chunks (cached prefix, chunk
    length), each sequence its own scattered blocks, q/k/v strided views of a fused QKV output."""
    g = torch.Generator().manual_seed(len(chunks) * 100 + head_dim)
    dec_lens = [3, 40]
    need = [-(-n // block_size) for n in dec_lens] + [-(-(c + n) // block_size) for c, n in chunks]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g)
    tables, at = [], 0
    for nb in need:
        tables.append(perm[at : at + nb].contiguous())
        at += nb
    kv = _cache(torch.randn(2, num_blocks, kv_heads, block_size, head_dim, generator=g), kv_dtype)
    t = len(dec_lens) + sum(n for _, n in chunks)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=g)
    q = qkv[:, : heads * head_dim].view(t, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(t, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(t, kv_heads, head_dim)
    positions = [n - 1 for n in dec_lens] + [c + i for c, n in chunks for i in range(n)]
    owners = list(range(len(dec_lens))) + [len(dec_lens) + j for j, (_, n) in enumerate(chunks) for _ in range(n)]
    slots = torch.tensor([int(tables[o][p // block_size]) * block_size + p % block_size
                          for o, p in zip(owners, positions)])
    width = max(len(tb) for tb in tables[: len(dec_lens)])
    dec_tables = torch.zeros(len(dec_lens), width, dtype=torch.long)
    for i, tb in enumerate(tables[: len(dec_lens)]):
        dec_tables[i, : len(tb)] = tb
    prefills, start = [], len(dec_lens)
    for j, (c, n) in enumerate(chunks):
        prefills.append(PrefillChunk(start, n, c + n, tables[len(dec_lens) + j]))
        start += n
    meta = AttentionMetadata(slot_blocks=slots // block_size, slot_offsets=slots % block_size,
                             num_decodes=len(dec_lens), decode_block_tables=dec_tables,
                             decode_context_lens=torch.tensor(dec_lens), decode_max_context=max(dec_lens),
                             prefills=prefills, block_size=block_size)
    return q, k, v, kv, meta, head_dim**-0.5


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size",
                         [(9, 3, 64, 16), (4, 4, 32, 8), (8, 2, 128, 4), (6, 1, 16, 1), (4, 2, 40, 5), (14, 2, 64, 16)])
@pytest.mark.parametrize("chunks", [[(0, 7)], [(0, 130), (61, 3)], [(200, 77), (0, 1), (15, 64)]])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_cpp_attention_step_matches_torch(heads, kv_heads, head_dim, block_size, chunks, kv_dtype):
    """A whole step through each backend: decodes, then prompt chunks that start fresh or follow a
    prefix, chunks shorter than a 6-row tile and spanning several 64-key steps, one head per group
    (a tile spans 6 tokens), a head size that is not a multiple of 16 (the portable tail), q/k/v
    as strided views of the fused QKV output. The C++ prefill kernel reads the prefix from the
    paged cache and the chunk's own K/V as computed."""
    q, k, v, kv, meta, scale = _step(heads, kv_heads, head_dim, block_size, chunks, kv_dtype)
    ref_kv, got_kv = kv.clone(), kv.clone()
    ref = TorchPagedAttention().forward(q, k, v, ref_kv, meta, scale)
    got = CppCpuPagedAttention().forward(q, k, v, got_kv, meta, scale)
    assert _same(got_kv, ref_kv)
    assert got.shape == ref.shape and (got - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size",
                         [(9, 3, 64, 16), (8, 2, 128, 4), (4, 2, 96, 5), (4, 4, 32, 8), (14, 2, 64, 16), (5, 5, 64, 3)])
@pytest.mark.parametrize("chunks", [[(0, 7)], [(0, 130), (61, 3)], [(200, 77), (0, 1), (15, 64)]])
def test_bf16_attention_matches_a_rounded_reference(heads, kv_heads, head_dim, block_size, chunks):
    """bf16 math (`--dtype bfloat16` on a CPU with AVX512_BF16: csrc/attention_bf16.h) on a bf16
    cache: a whole step against float64 attention of the bf16-rounded q, k and v, within what
    rounding the probabilities to bf16 costs; decode (head sizes that are multiples of 64; 96 keeps
    float32 math there) and prefill (multiples of 32), odd block sizes and chunk lengths (a zero
    row pairs with the last key). Where the build or the CPU has no AVX512_BF16, bf16_math changes
    nothing: the results are bitwise the float32 math's."""
    q, k, v, kv, meta, scale = _step(heads, kv_heads, head_dim, block_size, chunks, torch.bfloat16)
    # Slots past each sequence's context hold NaN: stale bytes there must never reach a result.
    got_kv = kv.clone()
    ends = [(t, int(n)) for t, n in zip(meta.decode_block_tables, meta.decode_context_lens)]
    for t, n in ends + [(p.block_table, p.context_len) for p in meta.prefills]:
        got_kv[:, int(t[(n - 1) // block_size]), :, (n - 1) % block_size + 1 :] = float("nan")
    fast = CppCpuPagedAttention()
    fast.bf16_math = True
    got = fast.forward(q, k, v, got_kv, meta, scale)
    plain = CppCpuPagedAttention().forward(q, k, v, kv.clone(), meta, scale)
    if not fast.ops.packed_linear_bf16_supported():  # the AVX2 build, or a CPU without the instruction
        assert torch.equal(got, plain)
        return
    r = lambda x: x.bfloat16().double()  # noqa: E731
    ref = TorchPagedAttention().forward(r(q), r(k), r(v), kv.clone(), meta, scale)
    err = (got.double() - ref).abs()
    assert torch.isfinite(got).all() and err.max().item() < 2e-2 and err.mean().item() < 2e-3, (err.max(), err.mean())
    assert not torch.equal(got, plain)  # the bf16 path did run


def test_cpp_prefill_refuses_bad_chunks():
    """Out-of-range chunks and block ids are errors with a message, not reads past the tensors."""
    ops = CppCpuPagedAttention().ops
    q, k = torch.randn(4, 2, 16), torch.randn(4, 1, 16)
    cache, out = torch.zeros(3, 1, 4, 16), torch.empty(4, 2, 16)
    table = torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match="out of range"):
        ops.paged_attention_prefill(out, q, k, k, cache, cache, table, 2, 3, 3, 0.25)
    with pytest.raises(RuntimeError, match="block id out of range"):
        ops.paged_attention_prefill(out, q, k, k, cache, cache, torch.tensor([0, 7, 2]), 0, 4, 10, 0.25)
    with pytest.raises(RuntimeError, match="shorter than the prefix"):
        ops.paged_attention_prefill(out, q, k, k, cache, cache, table, 0, 4, 20, 0.25)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 6, 7, 11, 12, 13, 22, 45, 64, 97, 200])
@pytest.mark.parametrize("n,k", [(960, 576), (576, 1536), (32, 4100), (48, 40)])
def test_packed_linear_matches_torch(m, n, k):
    """The packed-weight GEMM agrees with F.linear for every register-tile remainder (rows mod 6 in
    the AVX2 tile, mod 12 in the AVX-512 one, which also runs an odd last panel alone: n=48),
    one row to prefill-sized inputs, K in one slice (576, 1536) and in 2048-deep slices (4100), odd K,
    a strided input, and a bias (direct and via Linear)."""
    from pagedserve.model import cpu_kernels
    from pagedserve.model.llama import Linear, use_cpu_kernels

    ops = cpu_kernels.load(required=True)
    assert ops.packed_linear_supported()
    g = torch.Generator().manual_seed(m * 1000 + n)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    wp = ops.pack_linear_weight(w)
    assert wp.shape == (n // 16, k, 16)
    ref = torch.nn.functional.linear(x, w)
    tol = 1e-4 * max(1.0, k / 1024)  # rounding grows with the length of each dot product
    torch.testing.assert_close(ops.packed_linear(x, wp), ref, rtol=1e-4, atol=tol)
    torch.testing.assert_close(ops.packed_linear(x, wp, b), ref + b, rtol=1e-4, atol=tol)
    wide = torch.randn(m, k + 24, generator=g)[:, 8 : 8 + k]  # rows strided in memory
    torch.testing.assert_close(ops.packed_linear(wide, wp), torch.nn.functional.linear(wide, w), rtol=1e-4, atol=tol)
    lin = Linear(k, n, bias=True)
    ref = lin(x)
    assert use_cpu_kernels(lin, ops) == 1 and lin.weight.shape == (n // 16, k, 16)
    torch.testing.assert_close(lin(x), ref, rtol=1e-4, atol=tol)


def test_the_float_gemms_prefetch_changes_no_bit():
    """The packed float32 and bf16 GEMMs' prefetch of their weights into L2 (set_gemm_prefetch,
    csrc/prefetch.h) is only a hint: at any distance, none and past the weight's end included, the
    same bits, for the row counts that take it (1-16 float32, up to 64 bf16) and one that does not;
    out of range is refused."""
    from pagedserve.model import cpu_kernels

    ops = cpu_kernels.load(required=True)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(96, 1040, generator=g)
    packs = [ops.pack_linear_weight(w)] + ([ops.pack_linear_weight_bf16(w)] if ops.packed_linear_bf16_supported() else [])
    try:
        for wp in packs:
            for m in (1, 8, 13, 64, 80):
                x = torch.randn(m, 1040, generator=g)
                outs = []
                for ahead in (0, 64, 4096, 1 << 16):
                    ops.set_gemm_prefetch(ahead)
                    outs.append(ops.packed_linear(x, wp))
                assert all(torch.equal(outs[0], o) for o in outs[1:]), (wp.dtype, m)
    finally:
        ops.set_gemm_prefetch(4096)
    for bad in (-1, (1 << 16) + 1):
        with pytest.raises(RuntimeError, match="0..65536"):
            ops.set_gemm_prefetch(bad)


def test_packed_linear_refusals_and_tied_weights():
    """Shapes the packed layout cannot hold stay on F.linear; bad calls say what is wrong; packing
    a head tied to the embedding leaves the embedding's table as it was."""
    from pagedserve.model import cpu_kernels
    from pagedserve.model.llama import Embedding, Linear, use_cpu_kernels

    ops = cpu_kernels.load(required=True)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ops.pack_linear_weight(torch.randn(13, 8))
    odd = Linear(8, 13)
    assert use_cpu_kernels(odd, ops) == 0 and odd.packed is None  # 13 outputs: F.linear
    wp = ops.pack_linear_weight(torch.randn(32, 8))
    with pytest.raises(RuntimeError, match="expects 8"):
        ops.packed_linear(torch.randn(2, 9), wp)
    with pytest.raises(RuntimeError, match="bias"):
        ops.packed_linear(torch.randn(2, 8), wp, torch.randn(31))
    emb, head = Embedding(64, 8), Linear(8, 64, bias=False)
    torch.nn.init.normal_(emb.weight)
    head.weight = emb.weight
    table = emb.weight.detach().clone()
    x = torch.randn(3, 8)
    ref = head(x)
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    assert use_cpu_kernels(model, ops) == 1
    assert torch.equal(emb.weight, table) and emb.weight.shape == (64, 8)
    torch.testing.assert_close(head(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 3, 17, 64, 300])
def test_fused_elementwise_ops_match_torch(rows):
    """RMSNorm (with and without the residual add), rotary on strided q/k views of a fused QKV
    output, and SiLU*up: the C++ kernels give the PyTorch path's results, row counts below and
    above the threading grain."""
    from pagedserve.model import cpu_kernels
    from pagedserve.model.arch import ModelArch
    from pagedserve.model.llama import MLP, RMSNorm, RotaryEmbedding, use_cpu_kernels

    ops = cpu_kernels.load(required=True)
    g = torch.Generator().manual_seed(rows)
    hidden, heads, kv_heads, d = 96, 6, 2, 16
    arch = ModelArch(architecture="LlamaForCausalLM", vocab_size=10, hidden_size=hidden, intermediate_size=40,
                     num_layers=1, num_heads=heads, num_kv_heads=kv_heads, head_dim=d, rms_norm_eps=1e-5,
                     rope_theta=10000.0, rope_scaling=None, max_position_embeddings=512, tie_word_embeddings=False,
                     attention_bias=False, sliding_window=None, bos_token_id=None, eos_token_ids=[])
    norm, rot, mlp = RMSNorm(hidden, 1e-5), RotaryEmbedding(arch, 512), MLP(arch)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, generator=g))
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x, res = torch.randn(rows, hidden, generator=g), torch.randn(rows, hidden, generator=g)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d, generator=g)
    pos = torch.randint(0, 512, (rows,), generator=g)

    def run():
        n1 = norm(x.clone())
        n2, r2 = norm(x.clone(), res.clone())
        q, k, _ = qkv.clone().split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        q, k = rot(pos, q.view(rows, heads, d), k.view(rows, kv_heads, d))
        return n1, n2, r2, q.clone(), k.clone(), mlp(x)

    ref = run()
    use_cpu_kernels(norm, ops), use_cpu_kernels(rot, ops), use_cpu_kernels(mlp, ops, pack=False)
    assert norm.fused is ops and rot.fused is ops and mlp.fused is ops
    for got, want in zip(run(), ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="position out of range"):
        q = qkv.clone()[:, : heads * d].view(rows, heads, d)
        rot(torch.full((rows,), 512), q, q)


@pytest.mark.parametrize("vocab", [1, 7, 16, 49152, 50001])
def test_cpp_argmax_matches_torch(vocab):
    """Greedy sampling's argmax: torch.argmax's index on every row, i.e. the first of tied maxima,
    NaN as the largest value, all -inf giving 0; widths below, at and past the 16-lane vector
    with a ragged tail, and rows that are a strided view."""
    from pagedserve.model import cpu_kernels

    ops = cpu_kernels.load(required=True)
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(9, vocab + 3, generator=g)
    x[1] = torch.randint(0, 3, (vocab + 3,), generator=g).float()  # many ties
    x[2] = float("-inf")
    x[3, vocab // 2] = float("nan")
    x[4, -4:] = float("nan")
    x[5, vocab // 3] = float("inf")
    x[6] = x[6].round()  # ties among large values
    x[7, vocab - 1] = 1e30  # the maximum in the last column (before the strided view's cut)
    view = x[:, :vocab]
    assert view.stride(0) == vocab + 3
    for t in (view, view.contiguous(), x[:3, :vocab]):
        assert torch.equal(ops.argmax_rows(t), torch.argmax(t, dim=-1))


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_cpp_write_kv_matches_index_put(kv_dtype):
    """The C++ K/V store puts strided K/V rows (views of a fused QKV output) in the same slots as
    the PyTorch index_put, rounded to the cache's dtype the same way (nearest even, infinity past
    the largest finite value; int8 / e4m3 scaled per row, an outlier row and an all-zero row
    included), byte for byte, and rejects slots outside the cache."""
    g = torch.Generator().manual_seed(1)
    t, kvh, d, nb, bs = 37, 3, 64, 11, 16
    qkv = torch.randn(t, (9 + 2 * kvh) * d, generator=g)
    k = qkv[:, 9 * d : (9 + kvh) * d].view(t, kvh, d)
    v = qkv[:, (9 + kvh) * d :].view(t, kvh, d)
    k[0] *= 3e4  # past float16's and float8 e5m2's largest finite values: both paths store inf
    v[1, 2] = 0.0
    slots = torch.randperm(nb * bs, generator=g)[:t]
    meta = AttentionMetadata(slot_blocks=slots // bs, slot_offsets=slots % bs, num_decodes=0, decode_block_tables=None,
                             decode_context_lens=None, decode_max_context=0, prefills=[], block_size=bs)
    ref, got = (_cache(torch.zeros(2, nb, kvh, bs, d), kv_dtype) for _ in range(2))
    TorchPagedAttention._write_kv(k, v, ref[0], ref[1], meta)
    backend = CppCpuPagedAttention()
    backend._write_kv(k, v, got[0], got[1], meta)
    assert _same(got, ref) and ref.to(torch.float32).abs().sum() > 0
    if isinstance(ref, ScaledKV):  # read back within half a step of the format at each row's scale
        back = ref[1].to(torch.float32)[meta.slot_blocks, :, meta.slot_offsets]
        step = ref[1].scales[meta.slot_blocks, :, meta.slot_offsets].unsqueeze(-1)
        assert ((back - v).abs() <= step * (0.5 if kv_dtype == torch.int8 else 16)).all() and (back[1, 2] == 0).all()
    meta.slot_blocks = meta.slot_blocks.clone()
    meta.slot_blocks[5] = nb
    with pytest.raises(RuntimeError, match="slot out of range"):
        backend._write_kv(k, v, got[0], got[1], meta)


def test_kernel_build_lock_removes_a_killed_builds_lock_and_serializes_builders(tmp_path, caplog):
    """torch waits forever on the lock file a killed build leaves; our flock (released by the
    kernel when its holder dies) makes that file provably stale, and makes a second builder wait."""
    import threading
    import time

    from pagedserve.model.cpu_kernels import _build_lock

    build_dir = tmp_path / "kernels"
    build_dir.mkdir()
    (build_dir / "lock").write_text("")  # what a killed build leaves behind
    with caplog.at_level("WARNING", logger="pagedserve.kernels"), _build_lock(build_dir):
        assert not (build_dir / "lock").exists()
    assert "killed" in caplog.text

    order = []

    def second():
        with _build_lock(build_dir):
            order.append("second")

    with _build_lock(build_dir):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.3)
        order.append("first done")  # the second builder is still waiting here
    t.join(10)
    assert order == ["first done", "second"]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fused_layer_loop_equals_the_python_loop(tiny_dirs, kind):
    """The C++ layer loop (llama_layers) runs the same kernels in the same order as llama.py's
    loop: tokens, logprobs and prompt logprobs are bitwise equal over batches that mix decodes,
    chunked prompts, a prompt after a cached prefix and the last layer's sampled-rows shortcut
    (off when prompt logprobs want every row); QKV biases (qwen2) included."""
    from pagedserve import LLM, SamplingParams

    def run(fused: bool):
        llm = LLM(str(tiny_dirs[kind]), kv_cache_memory=16 << 20, block_size=4, max_num_batched_tokens=32)
        model = llm.engine.runner.model
        assert model.fused is not None  # every kernel the loop needs is installed
        if not fused:
            model.fused = None
        prompts = [list(range(100, 100 + n)) for n in (5, 40, 17, 70)]
        params = SamplingParams(temperature=0, max_tokens=12, logprobs=2, ignore_eos=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
        more = llm.generate([list(range(100, 140)) + [7, 8, 9]],  # its first 40 tokens are cached
                            SamplingParams(temperature=0, max_tokens=5, logprobs=2, ignore_eos=True), use_tqdm=False)
        assert more[0].num_cached_tokens == 40
        more += llm.generate([list(range(100, 140)) + [7, 8]],  # prompt logprobs: every row's hidden state
                             SamplingParams(temperature=0, max_tokens=5, logprobs=2, prompt_logprobs=1,
                                            ignore_eos=True), use_tqdm=False)
        return [(o.outputs[0].token_ids, repr(o.outputs[0].logprobs), repr(o.prompt_logprobs)) for o in outs + more]

    assert run(True) == run(False)


@pytest.mark.parametrize("m", [1, 5, 12, 13, 64, 97])
@pytest.mark.parametrize("n,k", [(960, 576), (576, 1536), (48, 33), (32, 6201)])
def test_bf16_packed_linear_matches_a_rounded_reference(m, n, k):
    """The AVX512_BF16 GEMM (`--dtype bfloat16` on CPU): inputs and weights rounded to bf16 as torch
    rounds them, products summed in float32 — within float32 rounding of a float64 sum of the same
    rounded values; every row remainder of the 12-row tile, an odd last panel (n=48), odd K, K in
    slices (6201). A build or CPU without AVX512_BF16 says so and refuses bf16 weights."""
    from pagedserve.model import kernel_levels
    from pagedserve.model.llama import Linear, use_cpu_kernels

    ops = cpu_kernels._module
    v4 = kernel_levels.level_named("x86-64-v4")
    expected = "avx512_bf16" in kernel_levels.cpu_flags() and v4 in kernel_levels.supported_levels() \
        and ops is cpu_kernels.load_level(v4.name)
    g = torch.Generator().manual_seed(m * 7 + n + k)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    assert ops.packed_linear_bf16_supported() == expected
    if not expected:  # the AVX2 build, or a CPU without the instruction
        with pytest.raises(RuntimeError, match="AVX512_BF16|x86-64-v4"):
            ops.packed_linear(x, ops.pack_linear_weight_bf16(w), b)
        return
    wp = ops.pack_linear_weight_bf16(w)
    assert wp.shape == (n // 16, (k + 1) // 2, 32) and wp.dtype == torch.bfloat16
    ref = (x.bfloat16().double() @ w.bfloat16().double().T + b.double())
    tol = 2e-6 * k ** 0.5 * ref.abs().max().item()
    assert (ops.packed_linear(x, wp, b).double() - ref).abs().max().item() < tol
    wide = torch.randn(m, k + 24, generator=g)[:, 8 : 8 + k]  # rows strided in memory
    ref_w = wide.bfloat16().double() @ w.bfloat16().double().T
    assert (ops.packed_linear(wide, wp).double() - ref_w).abs().max().item() < tol
    lin = Linear(k, n, bias=True)
    with torch.no_grad():
        expect = torch.nn.functional.linear(x.bfloat16().float(), lin.weight.bfloat16().float(), lin.bias)
    assert use_cpu_kernels(lin, ops, weight_dtype=torch.bfloat16) == 1 and lin.weight.dtype == torch.bfloat16
    torch.testing.assert_close(lin(x), expect, rtol=1e-4, atol=1e-3)


@pytest.fixture
def two_threads():
    """The dynamic split only differs from the fixed one with more than one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)
    cpu_kernels._module.set_dynamic_split(True)


def test_dynamic_split_is_bitwise_the_fixed_split(two_threads, tiny_dirs):
    """Kernels hand their work out in chunks from a shared counter (parallel.h), so a thread that
    lost its core takes fewer; which thread computes an item never changes its bits: every kernel
    (GEMMs in float32 and bf16 over panel counts that cut into many chunks, prompt chunks and
    decodes through the attention kernels, norms, rotary, SiLU, KV writes, argmax) gives exactly
    the fixed split's results, kernel by kernel and through the whole model; and so does one
    thread running work planned for two (the decode attention's flash-decoding splits)."""
    from pagedserve import LLM, SamplingParams

    ops = cpu_kernels._module
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1536, 576, generator=g)
    weights = [ops.pack_linear_weight(w)]
    if ops.packed_linear_bf16_supported():
        weights.append(ops.pack_linear_weight_bf16(w))
    xs = [torch.randn(m, 576, generator=g) for m in (1, 13, 97)]
    logits = torch.randn(37, 49152, generator=g)

    def kernels():
        out = [ops.packed_linear(x, wp) for x in xs for wp in weights] + [ops.argmax_rows(logits)]
        for x in xs:
            r, y = x.clone(), x.clone()
            ops.add_rms_norm(y, r, w[0], 1e-5)
            out += [r, y, ops.silu_and_mul(torch.cat([x, x.flip(0)], 1))]
        return out

    # Both runs compute every prompt (no prefix cache), in the same steps: no TTFT target, whose
    # clock would change a slow run's step composition on a loaded machine (and with it which
    # sequences share a decode step: ulp-level differences that are not the split's).
    llm = LLM(str(tiny_dirs["llama"]), kv_cache_memory=16 << 20, block_size=4, max_num_batched_tokens=64,
              enable_prefix_caching=False, ttft_target_ms=None)
    assert llm.engine.runner.model.fused is ops

    def model():
        prompts = [list(range(100, 100 + n)) for n in (5, 40, 17, 70, 3)]
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, logprobs=3, prompt_logprobs=1,
                                                    ignore_eos=True), use_tqdm=False)
        return [(o.outputs[0].token_ids, repr(o.outputs[0].logprobs), repr(o.prompt_logprobs)) for o in outs]

    ops.set_dynamic_split(False)
    fixed = kernels(), model()
    ops.set_dynamic_split(True)
    dynamic = kernels(), model()
    torch.set_num_threads(1)  # the engine's tuner may run the work on fewer threads than it was planned for
    one_thread = kernels(), model()
    for run in (dynamic, one_thread):
        assert all(torch.equal(a, b) for a, b in zip(fixed[0], run[0]))
        assert fixed[1] == run[1]
