"""The sampler's logit edits (logit_bias, min_tokens, repetition / frequency / presence penalties)
run as whole-tensor ops over the batch (issue 27: no per-request tensor work in the step); they
must equal the per-row definition, written out here, bit for bit."""

from __future__ import annotations

import random
from types import SimpleNamespace

import torch

from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.model.sampler import Sampler

V = 300


def _reference(logits: torch.Tensor, reqs) -> torch.Tensor:
    """Row by row, as vLLM defines them."""
    logits = logits.clone()
    for i, r in enumerate(reqs):
        p = r.sampling_params
        for t, b in (p.logit_bias or {}).items():
            logits[i, t] += b
        if r.num_output_tokens < p.min_tokens:
            for t in list(p.stop_token_ids or []) + list(r.eos_token_ids):
                logits[i, t] = -float("inf")
        if not p.needs_penalties:
            continue
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(V, dtype=torch.bool)
            seen[torch.tensor(r.all_token_ids)] = True
            row = torch.where(seen, torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty), row)
        if r.output_token_ids:
            counts = torch.bincount(torch.tensor(r.output_token_ids), minlength=V).to(row.dtype)
            row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(row.dtype)
        logits[i] = row
    return logits


def _request(rng: random.Random):
    prompt = [rng.randrange(V) for _ in range(rng.randrange(1, 40))]
    output = [rng.randrange(V) for _ in range(rng.randrange(0, 20))]
    kw = {}
    if rng.random() < 0.5:
        kw["repetition_penalty"] = rng.choice([1.0, 1.3, 0.8])
    if rng.random() < 0.5:
        kw.update(frequency_penalty=rng.uniform(-1, 1), presence_penalty=rng.uniform(-1, 1))
    if rng.random() < 0.4:
        kw["logit_bias"] = {rng.randrange(V): rng.uniform(-5, 5) for _ in range(rng.randrange(1, 6))}
    if rng.random() < 0.3:
        kw.update(min_tokens=rng.randrange(0, 30), max_tokens=40, stop_token_ids=[rng.randrange(V)])
    return SimpleNamespace(sampling_params=SamplingParams(**kw), all_token_ids=prompt + output,
                           output_token_ids=output, num_output_tokens=len(output), num_sampled_tokens=len(output),
                           eos_token_ids={2, 7},
                           generator=None)


def test_batched_edits_equal_the_per_row_definition():
    rng = random.Random(0)
    s = Sampler(V)
    for _ in range(30):
        reqs = [_request(rng) for _ in range(rng.randrange(1, 12))]
        logits = torch.randn(len(reqs), V)
        want = _reference(logits, reqs)
        got = logits.clone()
        if any(r.sampling_params.logit_bias or r.num_output_tokens < r.sampling_params.min_tokens for r in reqs):
            got = s._apply_bias_and_min_tokens(got, reqs)
        if any(r.sampling_params.needs_penalties for r in reqs):
            got = s._apply_penalties(got, reqs)
        assert torch.equal(got, want)


def test_batched_top_logprobs_equal_row_by_row():
    from pagedserve.model.sampler import batch_top_logprobs, top_logprobs

    g = torch.Generator().manual_seed(1)
    lp = torch.log_softmax(torch.randn(9, V, generator=g), dim=-1)
    lp[2, :250] = -float("inf")  # a grammar's mask: fewer alternatives than k
    chosen, ks = [int(x) for x in torch.randint(0, V, (9,), generator=g)], [0, 1, 5, 20, 3, 0, 7, 2, 20]
    chosen[2] = 260
    for got, c, k, row in zip(batch_top_logprobs(lp, chosen, ks), chosen, ks, lp):
        want = top_logprobs(row, c, k)
        assert got[1:] == want[1:] and abs(got[0] - want[0]) == 0
