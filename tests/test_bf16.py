"""`--dtype auto` / `bfloat16` on CPU: bf16 GEMMs where the CPU has AVX512_BF16, float32 elsewhere,
and what bf16 costs in accuracy on the default model (targets: perplexity within +1% of float32,
teacher-forced top-1 agreement >= 97% on ~1000 tokens of a fixed text)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import assert_no_leaks

from pagedserve import LLM, SamplingParams
from pagedserve.bench.accuracy import agreement_pct, prompt_stats
from pagedserve.config import EngineConfig
from pagedserve.model import cpu_kernels

TEXT = Path(__file__).parent.parent / "benchmarks" / "data" / "eval_text.txt"
HAS_BF16 = cpu_kernels.bf16_gemm() is not None


def test_auto_follows_the_cpu():
    want = torch.bfloat16 if HAS_BF16 else torch.float32
    assert EngineConfig().resolve_dtype(torch.device("cpu")) == want
    assert EngineConfig(dtype="float32").resolve_dtype(torch.device("cpu")) == torch.float32


@pytest.fixture(scope="module")
def bf16_llm(default_model_dir):
    return LLM(str(default_model_dir), dtype="bfloat16", max_model_len=2048, kv_cache_memory=256 << 20)


def test_bf16_engine_layout(bf16_llm, caplog):
    r = bf16_llm.engine.runner
    assert r.dtype == torch.bfloat16
    if HAS_BF16:  # GEMMs in bf16 through the C++ kernel; activations and attention in float32
        assert r.bf16_gemm and r.kv_dtype == torch.bfloat16
        assert r.model.layers[0].mlp.gate_up_proj.weight.dtype == torch.bfloat16
        assert r.model.layers[0].self_attn.backend.name == "cpp"
        assert r.model.norm.weight.dtype == torch.float32
    else:  # PyTorch's bf16, with a warning (tested where it is built: a fresh engine logs it)
        assert not r.bf16_gemm


def test_bf16_accuracy_on_a_fixed_text(llm, bf16_llm):
    ids = llm.get_tokenizer()(TEXT.read_text()).input_ids
    assert len(ids) >= 1000
    ppl32, top32 = prompt_stats(llm, ids)
    ppl16, top16 = prompt_stats(bf16_llm, ids)
    agree = agreement_pct(top32, top16)
    assert ppl16 <= ppl32 * 1.01, (ppl16, ppl32)
    assert agree >= 97, agree


def test_bf16_greedy_is_batch_invariant_and_leak_free(bf16_llm):
    """A row's bf16 result does not depend on its neighbours (each row's k-order is fixed)."""
    prompts = ["The capital of France is", "List three colours:", "Once upon a time", "def fib(n):"]
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = [bf16_llm.generate(x, p, use_tqdm=False)[0].outputs[0].token_ids for x in prompts]
    together = [o.outputs[0].token_ids for o in bf16_llm.generate(prompts, p, use_tqdm=False)]
    assert alone == together
    assert_no_leaks(bf16_llm.engine)


def test_bf16_without_the_instruction_warns(default_model_dir, caplog, monkeypatch):
    """Forced onto the path a CPU without AVX512_BF16 takes: it runs (PyTorch bf16) and says why
    that is slow; `auto` would pick float32 there."""
    monkeypatch.setattr(cpu_kernels, "bf16_gemm", lambda: None)
    assert EngineConfig().resolve_dtype(torch.device("cpu")) == torch.float32
    with caplog.at_level(logging.WARNING, logger="pagedserve.runner"):
        llm = LLM(str(default_model_dir), dtype="bfloat16", max_model_len=256, kv_cache_memory=16 << 20)
    assert "without AVX512_BF16" in caplog.text and not llm.engine.runner.bf16_gemm
    (o,) = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(o.outputs[0].token_ids) == 4
