"""How the CPU engine takes memory from Linux (pagedserve/engine/cpu_memory.py)."""

import resource

import pytest
import torch

from pagedserve.engine.cpu_memory import (HugePageArena, keep_freed_memory, lazily_zeroed_cpu_tensor, mapping_kib,
                                          populate)


def assert_packed_weights_in_one_arena(model) -> int:
    """Every packed weight of `model` (a shared quantized one once) lies in one buffer, in module
    order, each on a 4 KiB boundary, the first on a 2 MiB one. Returns how many tensors."""
    from pagedserve.model.llama import Linear

    seen, tensors = set(), []
    for m in model.modules():
        if isinstance(m, Linear) and m.packed is not None:
            key = id(m.quant) if m.quant is not None else id(m)
            if key not in seen:
                seen.add(key)
                tensors += [m.weight] if m.quant is None else list(m.quant.pack())
    assert tensors
    ptrs = [t.data_ptr() for t in tensors]
    assert ptrs[0] % (2 << 20) == 0 and all(p % HugePageArena.ALIGN == 0 for p in ptrs)
    for t, p, nxt in zip(tensors, ptrs, ptrs[1:]):  # back to back, in order
        assert nxt == p + HugePageArena.padded(t.numel() * t.element_size())
    return len(tensors)


def _faults_of_repeated_allocations(n: int, sizes: tuple[int, ...]) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        held = []
        for nbytes in sizes:
            held.append(torch.empty(nbytes // 4))
            held[-1].fill_(1.0)  # touch every page, as a layer's output does
        del held
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_activations_are_reused_without_page_faults():
    """The setting takes (glibc), and afterwards a step's worth of activations of several sizes,
    allocated, written and freed, fault no pages once the heap has grown. The engine-level effect
    is measured, not asserted here: a 64-request offline run faulted 40k-450k pages during
    generation without it (varying with how allocations interleave), 7k-12k with it."""
    assert keep_freed_memory()
    sizes = (6 << 20, 12 << 20, 3 << 20)
    _faults_of_repeated_allocations(20, sizes)  # the heap grows to its steady size
    assert _faults_of_repeated_allocations(20, sizes) < 100


def test_lazily_zeroed_cache_is_zero_and_huge_page_aligned():
    t = lazily_zeroed_cpu_tensor((3, 5, 16, 64), torch.float16)
    assert t.dtype == torch.float16 and t.shape == (3, 5, 16, 64)
    assert t.data_ptr() % (2 << 20) == 0  # whole cache lines per row, huge pages from the first byte
    assert t.count_nonzero() == 0


def test_lazily_zeroed_memory_is_untouched_even_after_the_heap_was_used():
    """Fresh pages, never glibc's recycled heap: calloc of a size the heap could serve wrote the
    zeros itself (resident at once, on 4 KiB pages before any huge-page advice)."""
    keep_freed_memory()
    junk = [torch.ones((24 << 20) // 4) for _ in range(4)]  # heap chunks, written, then freed
    del junk
    t = lazily_zeroed_cpu_tensor(((16 << 20) // 4,), torch.float32)
    assert mapping_kib(t.data_ptr(), "Rss") == 0
    t[:: 1024].fill_(1.0)
    assert mapping_kib(t.data_ptr(), "Rss") >= 16 << 10  # each touch faults its page(s) in


def test_huge_page_arena_places_copies_back_to_back():
    a = HugePageArena([10, 5000, 4096 * 3])
    x, y, z = torch.arange(10, dtype=torch.uint8), torch.randn(1250), torch.randn(3, 1024)
    px, py, pz = a.place(x), a.place(y), a.place(z)
    assert torch.equal(px, x) and torch.equal(py, y) and torch.equal(pz, z) and pz.shape == (3, 1024)
    assert px.data_ptr() % (2 << 20) == 0
    assert py.data_ptr() == px.data_ptr() + 4096 and pz.data_ptr() == py.data_ptr() + 8192
    with pytest.raises(ValueError, match="no room"):
        a.place(torch.zeros(1))


def test_packed_weights_share_one_arena_and_compute_the_same(tiny_dirs):
    """The arena changes where the weights are, not one bit of what is computed."""
    from pagedserve import LLM, SamplingParams
    from pagedserve.model import cpu_kernels, llama

    assert cpu_kernels.packed_linear() is not None  # every CPU this runs on has AVX2 (the arena holds packed weights)
    kw = dict(kv_cache_memory=16 << 20, max_model_len=256, dtype="float32")
    llama.WEIGHTS_ON_HUGE_PAGES = False
    try:
        plain = LLM(str(tiny_dirs["llama"]), **kw)
    finally:
        llama.WEIGHTS_ON_HUGE_PAGES = True
    arena = LLM(str(tiny_dirs["llama"]), **kw)
    assert assert_packed_weights_in_one_arena(arena.engine.runner.model) > 4
    with pytest.raises(AssertionError):
        assert_packed_weights_in_one_arena(plain.engine.runner.model)
    sp = SamplingParams(temperature=0, max_tokens=24, logprobs=3, ignore_eos=True)
    prompts = ["The arena holds", "Every packed weight of the model in one buffer"]
    a, b = (llm.generate(prompts, sp, use_tqdm=False) for llm in (plain, arena))
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert x.outputs[0].logprobs == y.outputs[0].logprobs


def test_populate_faults_the_cache_in_and_keeps_it_zero():
    """After populate() writing the cache faults no pages (steps no longer stall on first touches),
    and the pages read as zeros, as a lazily zeroed cache must."""
    t = lazily_zeroed_cpu_tensor((64 << 20) // 4, torch.float32)  # 64 MiB, untouched
    secs = populate(t, chunk=8 << 20)
    assert secs >= 0
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t.view(-1, 1024)[:, 0].fill_(1.0)  # one write per 4 KiB page
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 16
    t.view(-1, 1024)[:, 0].zero_()
    assert t.count_nonzero() == 0


def test_offline_llm_waits_for_its_cache_and_the_server_path_does_not(tiny_dirs):
    """LLM(...) returns with its KV cache faulted in; an engine alone (the server's path) starts
    populating only when asked, and asking twice starts one thread."""
    from pagedserve import LLM
    from pagedserve.config import EngineConfig
    from pagedserve.engine.engine import LLMEngine

    llm = LLM(str(tiny_dirs["llama"]), kv_cache_memory=16 << 20, max_model_len=256)
    assert llm.engine.runner._populating is not None and not llm.engine.runner._populating.is_alive()
    runner = LLMEngine(EngineConfig(model=str(tiny_dirs["llama"]), kv_cache_memory=16 << 20, max_model_len=256)).runner
    assert runner._populating is None
    runner.start_kv_populate()
    first = runner._populating
    runner.start_kv_populate()
    assert runner._populating is first
    runner.wait_kv_populated()
    assert not first.is_alive()


def test_weights_without_huge_pages_are_named_at_start(monkeypatch, caplog):
    """Where the OS grants no huge pages (transparent_hugepage=never, fragmentation), the start-up
    log says so, with the host's setting; the measured fraction is a share of the buffer."""
    import logging

    from pagedserve import LLM

    a = HugePageArena([8 << 20])
    a.place(torch.ones(2 << 20))
    assert 0.0 <= a.huge_fraction() <= 1.0
    monkeypatch.setattr(HugePageArena, "huge_fraction", lambda self: 0.0)
    with caplog.at_level(logging.INFO, logger="pagedserve.runner"):
        LLM(None, kv_cache_memory=16 << 20, max_model_len=256)
    assert any("on huge pages (transparent_hugepage:" in r.getMessage() for r in caplog.records)
