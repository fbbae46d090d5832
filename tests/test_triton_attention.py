"""The GPU path's Triton attention kernels (issue 27), run here in Triton's interpreter on CPU
tensors: every step shape (decodes split over several programs and merged, prefill chunks over a
cached prefix and themselves, in one launch), every KV cache dtype, against the PyTorch backend;
and the whole engine with --attention-backend triton, token for token with the PyTorch backend."""

from __future__ import annotations

import pytest
import torch

from pagedserve.model.attention import (  # noqa: E402
    AttentionMetadata,
    PrefillChunk,
    ScaledKV,
    TorchPagedAttention,
    get_attention_backend,
)
from pagedserve.model.triton_attention import TritonPagedAttention  # noqa: E402

SCALED = (torch.int8, torch.float8_e4m3fn)


def _step(kv_dtype, dtype, heads, kv_heads, head_dim, bs, dec_ctx, prefills, seed=0):
    """Two identical caches with random history, and one step: decodes with contexts `dec_ctx`
    (their new token included), prefill chunks (tokens, context after the chunk)."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = 96
    shape = (2, num_blocks, kv_heads, bs, head_dim)

    def cache():
        c = torch.zeros(shape, dtype=kv_dtype)
        return ScaledKV(c, torch.zeros(shape[:-1])) if kv_dtype in SCALED else c

    caches = [cache(), cache()]
    free = iter(torch.randperm(num_blocks, generator=g).tolist())
    contexts = list(dec_ctx) + [c for _, c in prefills]
    news = [1] * len(dec_ctx) + [n for n, _ in prefills]
    tables = [torch.tensor([next(free) for _ in range(-(-c // bs))]) for c in contexts]
    for table, c, new in zip(tables, contexts, news):  # the history before this step
        if c > new:
            pos = torch.arange(c - new)
            kx, vx = torch.randn(c - new, kv_heads, head_dim, generator=g), torch.randn(c - new, kv_heads, head_dim,
                                                                                       generator=g)
            m = AttentionMetadata(table[pos // bs], pos % bs, 0, None, None, 0, [], bs)
            for cc in caches:
                TorchPagedAttention._write_kv(kx, vx, cc[0], cc[1], m)
    t = sum(news)
    # views of one fused qkv row per token, as the model hands them over (strided rows)
    qkv = torch.randn(t, heads + 2 * kv_heads, head_dim, generator=g).to(dtype)
    q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
    blocks, offsets, chunks, start = [], [], [], len(dec_ctx)
    for i, (table, c, new) in enumerate(zip(tables, contexts, news)):
        pos = torch.arange(c - new, c)
        blocks.append(table[pos // bs])
        offsets.append(pos % bs)
        if i >= len(dec_ctx):
            chunks.append(PrefillChunk(start, new, c, table))
            start += new
    nd = len(dec_ctx)
    width = max([len(tb) for tb in tables[:nd]], default=1)
    dec_tables = torch.zeros(nd, width, dtype=torch.int64)
    for i in range(nd):
        dec_tables[i, :len(tables[i])] = tables[i]

    def meta():
        return AttentionMetadata(torch.cat(blocks).long(), torch.cat(offsets).long(), nd, dec_tables if nd else None,
                                 torch.tensor(dec_ctx, dtype=torch.int64) if nd else None, max(dec_ctx, default=0),
                                 chunks, bs)
    return q, k, v, caches, meta


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e5m2, torch.int8,
                                      torch.float8_e4m3fn])
@pytest.mark.parametrize("splits", [1, 3])
def test_a_mixed_step_matches_the_pytorch_backend(kv_dtype, splits):
    """Decodes (short, mid, long contexts; a split may get no block) and two prefill chunks (one over
    a cached prefix, one fresh) in one step; GQA 3:1, head_dim 40 (not a power of two). float32
    math: outputs within float32 rounding; the caches written bit for bit as the reference writes
    them (int8 / fp8 scales too)."""
    q, k, v, (ref_cache, cache), meta = _step(kv_dtype, torch.float32, 6, 2, 40, 16, [5, 37, 70, 16],
                                              [(20, 33), (9, 9), (1, 50)])
    ref = TorchPagedAttention().forward(q, k, v, ref_cache, meta(), 40 ** -0.5)
    got = TritonPagedAttention(decode_splits=splits).forward(q, k, v, cache, meta(), 40 ** -0.5)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-6)
    if kv_dtype in SCALED:
        assert torch.equal(cache.data.view(torch.uint8), ref_cache.data.view(torch.uint8))
        assert torch.equal(cache.scales, ref_cache.scales)
    else:
        assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_models_accumulate_in_float32(dtype):
    """A bf16 / fp16 model: the matmuls take 16-bit inputs with float32 accumulation and softmax;
    against float64 attention on the same 16-bit values, within a 16-bit output's rounding."""
    q, k, v, (ref_cache, cache), meta = _step(dtype, dtype, 8, 2, 64, 16, [3, 40], [(24, 40)], seed=1)
    got = TritonPagedAttention(decode_splits=2).forward(q, k, v, cache, meta(), 0.125)
    ref = TorchPagedAttention().forward(q.double(), k.double(), v.double(),
                                        ref_cache.double(), meta(), 0.125)
    torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("heads,kv_heads,head_dim,bs", [(8, 1, 64, 16), (4, 4, 32, 32), (16, 2, 128, 16)])
def test_shapes(heads, kv_heads, head_dim, bs):
    """MQA, MHA and an 8:1 group with the 128-wide heads of Llama 3; 32-token blocks."""
    q, k, v, (ref_cache, cache), meta = _step(torch.float32, torch.float32, heads, kv_heads, head_dim, bs, [1, 65],
                                              [(17, 40)], seed=2)
    ref = TorchPagedAttention().forward(q, k, v, ref_cache, meta(), head_dim ** -0.5)
    got = TritonPagedAttention(decode_splits=2).forward(q, k, v, cache, meta(), head_dim ** -0.5)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-6)


def test_decode_only_and_prefill_only_steps():
    for dec, pre in (([7, 300], []), ([], [(40, 40), (3, 100)])):
        q, k, v, (ref_cache, cache), meta = _step(torch.float32, torch.float32, 4, 2, 64, 16, dec, pre, seed=3)
        ref = TorchPagedAttention().forward(q, k, v, ref_cache, meta(), 0.125)
        got = TritonPagedAttention(decode_splits=4).forward(q, k, v, cache, meta(), 0.125)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-6)


def test_backend_choice_and_refusals():
    assert get_attention_backend(torch.device("cpu"), torch.float32, "triton").name == "triton"
    assert get_attention_backend(torch.device("cpu"), torch.float32, "auto").name in ("cpp", "torch")  # CPU: not triton
    with pytest.raises(ValueError, match="triton"):
        get_attention_backend(torch.device("cpu"), torch.float64, "triton")
    with pytest.raises(ValueError, match="auto, cpp, triton or torch"):
        get_attention_backend(torch.device("cpu"), torch.float32, "flash")


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_the_engine_on_the_triton_backend_matches_the_pytorch_one(tiny_dirs, kv_cache_dtype):
    """The whole engine (chunked prefill across steps, decodes beside prefills, prefix caching)
    with --attention-backend triton: the same greedy tokens and logprobs as the PyTorch backend."""
    from pagedserve import LLM, SamplingParams

    prompts = [list(range(100, 100 + n)) for n in (5, 37, 70)] + [list(range(100, 140)) + [7, 8, 9]]
    sp = SamplingParams(max_tokens=6, temperature=0, logprobs=1)
    outs = {}
    for backend in ("torch", "triton"):
        llm = LLM(str(tiny_dirs["llama3"]), dtype="float32", attention_backend=backend, max_model_len=256,
                  kv_cache_memory=8 << 20, max_num_batched_tokens=32, kv_cache_dtype=kv_cache_dtype)
        assert llm.engine.runner.model.layers[0].self_attn.backend.name == backend
        outs[backend] = llm.generate(prompts, sp, use_tqdm=False)
    for a, b in zip(outs["torch"], outs["triton"]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            (ta, pa), (tb, pb) = next(iter(la.items())), next(iter(lb.items()))
            assert ta == tb and abs(pa.logprob - pb.logprob) < 1e-4
