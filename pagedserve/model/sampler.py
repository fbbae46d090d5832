"""Batched sampling: one call turns a step's logits into next tokens for every request.

Order of operations (as in vLLM): the structured-output bitmask -> logit_bias and min_tokens
masking -> repetition, presence and frequency penalties -> greedy argmax, or temperature -> min_p ->
top_k/top_p -> draw. Logprobs are reported from the model's distribution after the grammar's mask
(log_softmax of the logits the grammar allows), before bias and penalties.

All rows draw their noise together; seeded requests then draw again with their own
torch.Generator, one row at a time, so their result does not depend on what else is in the batch.
Per-row parameters reach the device in one copy, pinned and asynchronous on a GPU, and the tokens
and logprobs leave it the same way (`PendingSample`): nothing in a step waits for the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pagedserve.engine.request import Request
from pagedserve.engine.structured_output.backend import apply_bitmask


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row, when the request asked for logprobs: (chosen logprob, chosen rank, top ids, top logprobs).
    logprobs: list[tuple[float, int, list[int], list[float]] | None]


class PendingSample:
    """A step's sampled tokens (and the logprobs asked for) still on the device: `host()` brings
    them over. On a GPU the copies start at once, asynchronously, into pinned memory, so the host
    can prepare the next step meanwhile (--async-scheduling); `tokens` stays on the device for the
    next step's inputs."""

    def __init__(self, tokens: torch.Tensor, want: list[int], ks: list[int], lp_parts: tuple | None):
        self.tokens, self._want, self._ks = tokens, want, ks
        parts = (tokens, *(lp_parts or ()))
        self._event = None
        if tokens.device.type == "cuda":
            parts = tuple(t.to("cpu", non_blocking=True) for t in parts)  # pinned: the caching host allocator's
            self._event = torch.cuda.Event()
            self._event.record()
        self._parts = parts

    def host(self) -> SamplerOutput:
        if self._event is not None:
            self._event.synchronize()
        token_list = self._parts[0].tolist()
        lp_out: list = [None] * len(token_list)
        if self._want:
            for i, row in zip(self._want, _top_logprobs_rows(*self._parts[1:], self._ks)):
                lp_out[i] = row
        return SamplerOutput(token_list, lp_out)


class Sampler:
    def __init__(self, vocab_size: int, argmax: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """argmax: a faster row-wise argmax with torch.argmax's result (the C++ CPU kernel's) for
        greedy batches of float32 CPU logits; torch.argmax otherwise."""
        self.vocab_size = vocab_size
        self._argmax = argmax

    def __call__(self, logits: torch.Tensor, reqs: list[Request], bitmask: torch.Tensor | None = None) -> SamplerOutput:
        """bitmask: the step's structured-output mask (rows line up with `reqs`), or None."""
        return self.sample(logits, reqs, bitmask).host()

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, reqs: list[Request], bitmask: torch.Tensor | None = None) -> PendingSample:
        """The same, left on the device (`PendingSample.host()` brings it over)."""
        logits = logits.float()
        if bitmask is not None:
            apply_bitmask(logits, bitmask)  # in place: the model's logits tensor is ours to edit
        raw = logits
        params = [r.sampling_params for r in reqs]
        masks = any(p.logit_bias or r.num_sampled_tokens < p.min_tokens for p, r in zip(params, reqs))
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

        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        ks = [params[i].logprobs for i in want]
        parts = None
        if want:
            rows = to_device(want, logits.device)
            logprobs = torch.log_softmax(raw[rows], dim=-1)
            parts = _top_logprobs_tensors(logprobs, tokens[rows], max(ks))
        return PendingSample(tokens, want, ks, parts)

    def _apply_bias_and_min_tokens(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """logit_bias added and min_tokens' banned tokens set to -inf, for every row at once: the
        requests only contribute index lists (one host-to-device copy each, not one per request)."""
        bias_rows, bias_ids, bias_vals, ban_rows, ban_ids = [], [], [], [], []
        for i, r in enumerate(reqs):
            p = r.sampling_params
            if p.logit_bias:
                bias_rows += [i] * len(p.logit_bias)
                bias_ids += list(p.logit_bias.keys())
                bias_vals += list(p.logit_bias.values())
            if r.num_sampled_tokens < p.min_tokens:
                banned = list(p.stop_token_ids or []) + list(r.eos_token_ids)
                ban_rows += [i] * len(banned)
                ban_ids += banned
        dev = logits.device
        if bias_rows:
            logits.index_put_((to_device(bias_rows, dev), to_device(bias_ids, dev)),
                              to_device(bias_vals, dev, logits.dtype), accumulate=True)
        if ban_rows:
            logits[to_device(ban_rows, dev), to_device(ban_ids, dev)] = -float("inf")
        return logits

    def _apply_penalties(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """Repetition (over prompt and output), frequency and presence (over output) penalties for
        every row that has one, as whole-tensor ops on those rows."""
        rows = [i for i, r in enumerate(reqs) if r.sampling_params.needs_penalties]
        dev, V, n = logits.device, logits.shape[1], len(rows)
        ps = [reqs[i].sampling_params for i in rows]
        seen = [np.asarray(reqs[i].all_token_ids, dtype=np.int64) for i in rows]
        outs = [np.asarray(reqs[i].output_token_ids, dtype=np.int64) for i in rows]
        seen_rows, seen_ids = np.repeat(np.arange(n), [len(a) for a in seen]), np.concatenate(seen)
        out_rows, out_ids = np.repeat(np.arange(n), [len(a) for a in outs]), np.concatenate(outs)
        sub = logits[rows]
        rep = to_device([p.repetition_penalty for p in ps], dev, sub.dtype)[:, None]
        mask = torch.zeros(n, V, dtype=torch.bool, device=dev)
        mask[torch.from_numpy(seen_rows).to(dev), torch.from_numpy(seen_ids).to(dev)] = True
        sub = torch.where(mask & (rep != 1.0), torch.where(sub > 0, sub / rep, sub * rep), sub)
        counts = torch.zeros(n, V, dtype=sub.dtype, device=dev)
        counts.index_put_((torch.from_numpy(out_rows).to(dev), torch.from_numpy(out_ids).to(dev)),
                          torch.ones(len(out_rows), dtype=sub.dtype, device=dev), accumulate=True)
        freq = to_device([p.frequency_penalty for p in ps], dev, sub.dtype)[:, None]
        pres = to_device([p.presence_penalty for p in ps], dev, sub.dtype)[:, None]
        logits[rows] = sub - freq * counts - pres * (counts > 0).to(sub.dtype)
        return logits

    def _sample(self, logits: torch.Tensor, reqs: list[Request], greedy: list[bool]) -> torch.Tensor:
        params = [r.sampling_params for r in reqs]
        V = logits.shape[1]
        # Every row's parameters in one host -> device copy: temperature (1 for greedy rows),
        # min_p, top_k (V: off; float32 holds it exactly), top_p, and whether the row is greedy.
        temp, min_p, top_k, top_p, is_greedy = to_device(
            [[1.0 if g else p.temperature for g, p in zip(greedy, params)], [p.min_p for p in params],
             [float(p.top_k) if p.top_k > 0 else float(V) for p in params], [p.top_p for p in params],
             [float(g) for g in greedy]], logits.device, torch.float32)
        probs = torch.softmax(logits / temp[:, None], dim=-1)
        if any(p.min_p > 0 for p in params):
            top = probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < min_p[:, None] * top, 0.0)
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            probs = _top_k_top_p(probs, top_k, top_p)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p. Every row draws from the
        # global generator; a seeded row then draws again from its own, so its result does not
        # depend on its neighbours.
        noise = torch.empty_like(probs).exponential_()
        for i, r in enumerate(reqs):
            if r.generator is not None:
                noise[i].exponential_(generator=r.generator)
        sampled = (probs / noise).argmax(dim=-1)
        if any(greedy):
            sampled = torch.where(is_greedy.bool(), logits.argmax(dim=-1), sampled)
        return sampled


def _top_k_top_p(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row: the top_k most likely tokens (top_k = V: all), then the smallest prefix of them
    whose mass reaches top_p (always at least the top token)."""
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    V = probs.shape[1]
    ranks = torch.arange(V, device=probs.device)[None, :]
    mask = ranks >= top_k[:, None]
    cum = sorted_p.cumsum(dim=-1) - sorted_p
    mask |= cum >= top_p[:, None] * sorted_p.sum(dim=-1, keepdim=True)
    mask[:, 0] = False
    sorted_p = sorted_p.masked_fill(mask, 0.0)
    return torch.zeros_like(probs).scatter_(1, idx, sorted_p)


def to_device(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host values (a list, or a CPU tensor) as a tensor on `device`; off the CPU pinned and
    asynchronous (torch.tensor(..., device=cuda) waits for the copy, which would stall
    --async-scheduling's step in flight). The sampler's parameters and the runner's step inputs
    both reach the device this way."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type != "cpu" else t


def batch_top_logprobs(logprobs: torch.Tensor, chosen: list[int], ks: list[int]) -> list[tuple]:
    """top_logprobs for every row at once ([R, V] log-probabilities): one gather, one rank count,
    one top-k at the largest k, and one transfer to the host, instead of a few per row."""
    chosen_t = torch.tensor(chosen, device=logprobs.device)
    return _top_logprobs_rows(*_top_logprobs_tensors(logprobs, chosen_t, max(ks)), ks)


def _top_logprobs_tensors(logprobs: torch.Tensor, chosen: torch.Tensor, kmax: int) -> tuple[torch.Tensor, ...]:
    """The device half: (chosen logprobs [R], ranks [R], top values [R, kmax], top ids [R, kmax])."""
    chosen_lp = logprobs.gather(1, chosen[:, None])  # [R, 1]
    ranks = (logprobs > chosen_lp).sum(dim=-1) + 1
    vals, ids = logprobs.topk(kmax, dim=-1) if kmax else (logprobs[:, :0], logprobs[:, :0].long())
    return chosen_lp[:, 0], ranks, vals, ids


def _top_logprobs_rows(chosen_lp, ranks, vals, ids, ks: list[int]) -> list[tuple]:
    """The host half: one (chosen logprob, rank, top ids, top logprobs) per row, k of them each."""
    chosen_lp, ranks, vals, ids = chosen_lp.tolist(), ranks.tolist(), vals.tolist(), ids.tolist()
    out = []
    for r, k in enumerate(ks):
        # Tokens a grammar forbids have -inf: they are not alternatives (and not valid JSON).
        keep = [(i, v) for i, v in zip(ids[r][:k], vals[r][:k]) if v != float("-inf")]
        out.append((chosen_lp[r], ranks[r], [i for i, _ in keep], [v for _, v in keep]))
    return out


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
