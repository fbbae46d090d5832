"""Batched sampling: one call turns a step's logits into next tokens for every request.

Order of operations (as in vLLM): the structured-output bitmask -> logit_bias and min_tokens
masking -> repetition, presence and frequency penalties -> greedy argmax, or temperature -> min_p ->
top_k/top_p -> draw. Logprobs are reported from the model's distribution after the grammar's mask
(log_softmax of the logits the grammar allows), before bias and penalties.

Seeded requests draw with their own torch.Generator, one row at a time, so their result does not
depend on what else is in the batch; unseeded rows draw together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pagedserve.engine.request import Request
from pagedserve.engine.structured_output.backend import apply_bitmask


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row, when the request asked for logprobs: (chosen logprob, chosen rank, top ids, top logprobs).
    logprobs: list[tuple[float, int, list[int], list[float]] | None]


class Sampler:
    def __init__(self, vocab_size: int, argmax: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """argmax: a faster row-wise argmax with torch.argmax's result (the C++ CPU kernel's) for
        greedy batches of float32 CPU logits; torch.argmax otherwise."""
        self.vocab_size = vocab_size
        self._argmax = argmax

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, reqs: list[Request], bitmask: torch.Tensor | None = None) -> SamplerOutput:
        """bitmask: the step's structured-output mask (rows line up with `reqs`), or None."""
        logits = logits.float()
        if bitmask is not None:
            apply_bitmask(logits, bitmask)  # in place: the model's logits tensor is ours to edit
        raw = logits
        params = [r.sampling_params for r in reqs]
        masks = any(p.logit_bias or r.num_output_tokens < p.min_tokens for p, r in zip(params, reqs))
        penalties = any(p.needs_penalties for p in params)
        if masks or penalties:  # edits happen in place: copy once, keep the raw logits for logprobs
            logits = logits.clone()
        if masks:
            logits = self._apply_bias_and_min_tokens(logits, reqs)
        if penalties:
            logits = self._apply_penalties(logits, reqs)

        greedy = [p.greedy for p in params]
        if all(greedy):
            fast = self._argmax is not None and logits.device.type == "cpu" and logits.stride(-1) == 1
            tokens = self._argmax(logits) if fast else logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, reqs, greedy)
        token_list = tokens.tolist()

        lp_out: list = [None] * len(reqs)
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        if want:
            logprobs = torch.log_softmax(raw[want], dim=-1)
            for j, i in enumerate(want):
                lp_out[i] = top_logprobs(logprobs[j], token_list[i], params[i].logprobs)
        return SamplerOutput(token_list, lp_out)

    def _apply_bias_and_min_tokens(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        for i, r in enumerate(reqs):
            p = r.sampling_params
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias.keys()), dtype=torch.long, device=logits.device)
                vals = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
                logits[i].index_add_(0, ids, vals)
            if r.num_output_tokens < p.min_tokens:
                banned = list(p.stop_token_ids or []) + list(r.eos_token_ids)
                if banned:
                    logits[i, banned] = -float("inf")
        return logits

    def _apply_penalties(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        V = logits.shape[1]
        for i, r in enumerate(reqs):
            p = r.sampling_params
            if not p.needs_penalties:
                continue
            row = logits[i]
            if p.repetition_penalty != 1.0:
                seen = torch.zeros(V, dtype=torch.bool, device=logits.device)
                seen[torch.tensor(r.all_token_ids, device=logits.device)] = True
                pen = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
                row = torch.where(seen, pen, row)
            if r.output_token_ids and (p.presence_penalty or p.frequency_penalty):
                counts = torch.bincount(
                    torch.tensor(r.output_token_ids, device=logits.device), minlength=V
                ).to(row.dtype)
                row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(row.dtype)
            logits[i] = row
        return logits

    def _sample(self, logits: torch.Tensor, reqs: list[Request], greedy: list[bool]) -> torch.Tensor:
        params = [r.sampling_params for r in reqs]
        dev = logits.device
        temp = torch.tensor([1.0 if g else p.temperature for g, p in zip(greedy, params)], device=dev)
        probs = torch.softmax(logits / temp[:, None], dim=-1)
        if any(p.min_p > 0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=dev)
            top = probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < min_p[:, None] * top, 0.0)
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            probs = _top_k_top_p(probs, params)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p; per-row generators keep
        # a seeded request's draw independent of its neighbours.
        noise = torch.empty_like(probs)
        unseeded = [i for i, r in enumerate(reqs) if r.generator is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=dev).exponential_()
        for i, r in enumerate(reqs):
            if r.generator is not None:
                noise[i].exponential_(generator=r.generator)
        sampled = (probs / noise).argmax(dim=-1)
        if any(greedy):
            g = torch.tensor(greedy, device=dev)
            sampled = torch.where(g, logits.argmax(dim=-1), sampled)
        return sampled


def _top_k_top_p(probs: torch.Tensor, params) -> torch.Tensor:
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    V = probs.shape[1]
    dev = probs.device
    k = torch.tensor([p.top_k if p.top_k > 0 else V for p in params], device=dev)
    ranks = torch.arange(V, device=dev)[None, :]
    mask = ranks >= k[:, None]
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
    cum = sorted_p.cumsum(dim=-1) - sorted_p
    mask |= cum >= top_p[:, None] * sorted_p.sum(dim=-1, keepdim=True)
    mask[:, 0] = False
    sorted_p = sorted_p.masked_fill(mask, 0.0)
    return torch.zeros_like(probs).scatter_(1, idx, sorted_p)


def top_logprobs(row_logprobs: torch.Tensor, chosen: int, k: int) -> tuple[float, int, list[int], list[float]]:
    """The chosen token's logprob and rank (1 = best), plus the top-k alternatives."""
    chosen_lp = row_logprobs[chosen]
    rank = int((row_logprobs > chosen_lp).sum().item()) + 1
    if k:
        vals, ids = row_logprobs.topk(k)
        # Tokens a grammar forbids have -inf: they are not alternatives (and not valid JSON).
        keep = [(i, v) for i, v in zip(ids.tolist(), vals.tolist()) if v != float("-inf")]
        return float(chosen_lp), rank, [i for i, _ in keep], [v for _, v in keep]
    return float(chosen_lp), rank, [], []
