"""The seeded synthetic workload shared by every benchmark: same seed, same requests."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int


def synthetic_workload(
    num_requests: int = 128,
    prompt_len: tuple[int, int] = (32, 512),
    output_len: tuple[int, int] = (32, 256),
    vocab_range: tuple[int, int] = (100, 49000),
    seed: int = 0,
) -> list[BenchRequest]:
    """Prompts of random ordinary token ids (no special tokens), lengths uniform in the ranges."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(num_requests):
        n = rng.randint(*prompt_len)
        reqs.append(BenchRequest([rng.randint(*vocab_range) for _ in range(n)], rng.randint(*output_len)))
    return reqs
