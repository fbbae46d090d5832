"""A decode batch held steady on an engine, for benchmarks that time decode steps at a given batch
size (benchmarks/planner_validation.py, gemm_prefetch.py, gpu_session.py): `batch` requests of
`prompt_len` random tokens, prefilled and decoding, timed over a window of steps, then aborted."""

from __future__ import annotations

import time
from collections.abc import Callable

from pagedserve.bench.workload import synthetic_workload
from pagedserve.engine.sampling_params import SamplingParams


def start_decoding(engine, batch: int, prompt_len: int, max_tokens: int = 400,
                   vocab_range: tuple[int, int] = (100, 49000)) -> list[str]:
    """Add the batch (prompts seeded by `batch`) and step until every request is decoding; returns
    their request ids."""
    ids = []
    for i, r in enumerate(synthetic_workload(batch, (prompt_len, prompt_len), (1, 1), vocab_range, seed=batch)):
        ids.append(f"decoding-{batch}-{i}")
        engine.add_request(ids[-1], r.prompt_token_ids, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                       ignore_eos=True))
    while len(engine.scheduler.running) < batch or any(r.num_output_tokens < 2 for r in engine.scheduler.running):
        engine.step()
    engine.step()
    return ids


def decode_window(engine, steps: int, sync: Callable[[], None] = lambda: None) -> tuple[float, float]:
    """(seconds per step over `steps` decode steps, the average context they attended to); `sync`
    waits for the device (a GPU's queued work) before each clock reading."""
    running = engine.scheduler.running
    ctx = sum(r.num_tokens for r in running) / len(running) + steps / 2
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    return (time.perf_counter() - t) / steps, ctx


def stop_decoding(engine, ids: list[str]) -> None:
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
