"""--kv-cache-dtype int8 and fp8 (e4m3), a float32 scale per (token, kv head) row: accuracy on the
default model against a float32 cache (issue 25's targets: perplexity within +1% for int8, +2% for
fp8, on the fixed text), greedy agreement, and the engine paths that move K/V around —
preemption (recompute) and prefix caching — with a quantized cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_no_leaks
from prompts import long_prompt

from pagedserve import LLM, SamplingParams
from pagedserve.bench.accuracy import agreement_pct, prompt_stats
from pagedserve.model.attention import ScaledKV

TEXT = Path(__file__).parent.parent / "benchmarks" / "data" / "eval_text.txt"
PPL_LIMIT = {"int8": 1.01, "fp8": 1.02}  # issue 25's targets; measured +0.01% and +0.20% (Zen 4)
AGREE_FLOOR = {"int8": 96, "fp8": 92}  # teacher-forced top-1 vs float32, %; measured 97.8 and 94.9


@pytest.fixture(scope="module", params=["int8", "fp8"])
def quant(request, default_model_dir):
    return request.param, LLM(str(default_model_dir), dtype="float32", kv_cache_dtype=request.param,
                              max_model_len=2048, kv_cache_memory=128 << 20)


def test_scaled_cache_layout(quant):
    name, llm = quant
    r = llm.engine.runner
    assert isinstance(r.kv_caches, ScaledKV)
    assert r.kv_caches.dtype == {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[name]
    assert r.kv_caches.scales.shape == r.kv_caches.shape[:-1] and r.kv_caches.scales.dtype == torch.float32
    # 30 layers x 3 kv heads x (64 one-byte values + a 4-byte scale), for K and V: 3.78x a float32 cache's tokens
    assert r.num_blocks == (128 << 20) // (2 * 30 * 3 * (64 + 4) * 16)
    assert r.kv_bytes <= 128 << 20


def test_accuracy_on_a_fixed_text(llm, quant):
    name, q = quant
    ids = llm.get_tokenizer()(TEXT.read_text()).input_ids
    ppl32, top32 = prompt_stats(llm, ids)
    pplq, topq = prompt_stats(q, ids)  # in 512-token chunks: later chunks read earlier ones back from the cache
    agree = agreement_pct(top32, topq)
    assert pplq <= ppl32 * PPL_LIMIT[name], (pplq, ppl32)
    assert agree >= AGREE_FLOOR[name], agree


def test_greedy_decoding_agrees_with_float32(llm, quant):
    """Decode steps read every earlier token from the quantized cache."""
    _, q = quant
    prompts = ["The capital of France is", "List three colours:", "Once upon a time", "def fib(n):"]
    p = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in q.generate(prompts, p, use_tqdm=False)]
    same = sum(a == b for r, g in zip(ref, got) for a, b in zip(r, g)) / sum(len(r) for r in ref)
    assert same >= 0.6, same
    assert_no_leaks(q.engine)


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_preemption_and_prefix_caching_with_a_quantized_cache(default_model_dir, kv):
    """Cached prefix blocks give exactly the outputs of an ample cache without caching (the row
    scales travel with their blocks, and a chunk reads its own K/V back from the cache, so nothing
    depends on what was cached). Recompute after preemption only nearly so: the recomputed K/V
    come from prefill attention instead of decode attention, a last-bit difference can cross a
    rounding boundary of the 1-byte format, and greedy decoding then goes its own way from there
    (measured: 100% of tokens in place for int8, 81% for fp8; for a float32 cache the outputs are
    identical, see test_engine.py). Misplaced scales would give noise from the first recomputed
    token on."""
    kw = dict(dtype="float32", kv_cache_dtype=kv, max_model_len=256, max_num_seqs=8)
    ample = LLM(str(default_model_dir), kv_cache_memory=64 << 20, enable_prefix_caching=False, **kw)
    tok = ample.get_tokenizer()
    prompts = [long_prompt(60 + 10 * i, tok) for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in ample.generate(prompts, params, use_tqdm=False)]
    block_bytes = 2 * 30 * 3 * (64 + 4) * 16
    small = LLM(str(default_model_dir), kv_cache_memory=24 * block_bytes, **kw)  # prefix caching on, as by default
    assert small.engine.kv.num_blocks == 24
    tight = [o.outputs[0].token_ids for o in small.generate(prompts, params, use_tqdm=False)]
    assert small.engine.scheduler.num_preemptions > 0, "the budget was meant to force preemption"
    same = sum(a == b for r, t in zip(ref, tight) for a, b in zip(r, t)) / sum(len(r) for r in ref)
    assert all(len(t) == 32 for t in tight) and same >= 0.6, same
    assert_no_leaks(small.engine)

    cached = small  # its blocks now free, the cache's prefixes still indexed
    shared = long_prompt(150, tok)
    p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = ample.generate(shared + " the market.", p, use_tqdm=False)[0]
    cached.generate(shared + " the river.", p, use_tqdm=False)
    got = cached.generate(shared + " the market.", p, use_tqdm=False)[0]
    assert got.num_cached_tokens >= 128 and want.num_cached_tokens == 0
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert_no_leaks(cached.engine)
