"""How the CPU engine takes memory from Linux (pagedserve/engine/cpu_memory.py)."""

import resource

import torch

from pagedserve.engine.cpu_memory import keep_freed_memory, lazily_zeroed_cpu_tensor, populate


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
