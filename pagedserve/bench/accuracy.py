"""Teacher-forced accuracy of an engine on a fixed text: what the bf16 and quantized-KV checks
(tests and benchmarks) compare against float32."""

from __future__ import annotations

import math


def prompt_stats(llm, ids: list[int]) -> tuple[float, list[int]]:
    """Perplexity of token ids under `llm` (every position via prompt_logprobs) and the top-1 token
    it predicts at each position after the first."""
    from pagedserve import SamplingParams

    (o,) = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0), use_tqdm=False)
    nll, top = [], []
    for tok, entry in zip(ids[1:], o.prompt_logprobs[1:]):
        nll.append(-entry[tok].logprob)
        top.append(next(t for t, lp in entry.items() if lp.rank == 1))
    return math.exp(sum(nll) / len(nll)), top


def agreement_pct(a: list[int], b: list[int]) -> float:
    """Percent of positions where two top-1 predictions agree."""
    return 100 * sum(x == y for x, y in zip(a, b)) / len(a)
