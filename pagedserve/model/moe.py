"""Mixture-of-Experts MLP (Mixtral, Qwen2-MoE, OLMoE): a router picks each token's top-k experts.

  router     probs = softmax(x @ gate.T) in float32; the top k, renormalized to sum to 1 where the
             model does (Mixtral always, the others by norm_topk_prob)
  experts    the step's (token, expert) pairs sorted by expert, so each expert with work runs ONE
             matmul pair over all its tokens (a loop over the experts that have tokens, never over
             tokens); each expert is the dense MLP (gate_up, SiLU*up, down), so on CPU it takes the
             packed and quantized GEMMs like any other
  combine    results weighted by their probabilities, summed back per token
  shared     Qwen2-MoE: an always-on expert, scaled by sigmoid(x @ shared_expert_gate.T), added
On CPU with the C++ kernels the first three are moe_cpu.cpp's: routing and combine as plain loops,
and all the experts of a projection in one call (threads split the experts instead of each
expert's columns).
Under tensor parallelism every expert's width is split over the ranks (distributed/shard.py), or
with --enable-expert-parallel each rank holds whole experts (e % ranks == rank) and computes only
the pairs routed to them; either way the layer's all-reduce sums the ranks' parts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pagedserve.model.arch import ModelArch
from pagedserve.model.llama import MLP, Linear


@dataclass(frozen=True)
class _GroupedExperts:
    """A MoE layer's experts as moe_cpu.cpp's grouped_linear takes them: two tensors an expert."""
    kernels: object  # the C++ kernels module
    gate_up: list[torch.Tensor]
    gate_up_features: int
    down: list[torch.Tensor]
    down_features: int
    quant_bf16: bool  # as Linear's
    int8_rows: int


class SparseMoE(nn.Module):
    grouped_kernel = True  # False: one call per expert even where moe_cpu.cpp applies (benchmarks compare)

    def __init__(self, arch: ModelArch):
        super().__init__()
        m = arch.moe
        self.num_experts, self.top_k, self.norm_topk_prob = m.num_experts, m.num_experts_per_tok, m.norm_topk_prob
        self.gate = Linear(arch.hidden_size, m.num_experts, bias=False)
        # by global expert id; under expert parallelism only this rank's (arch.owns_expert)
        self.experts = nn.ModuleDict({str(e): MLP(arch, m.expert_intermediate_size) for e in range(m.num_experts)
                                      if arch.owns_expert(e)})
        self.shared_expert = self.shared_expert_gate = None
        if m.shared_expert_intermediate_size:
            self.shared_expert = MLP(arch, m.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(arch.hidden_size, 1, bias=False)
        self._grouped_cache = None

    def _grouped(self) -> _GroupedExperts | None:
        """The experts' weights as the C++ grouped product takes them (moe_cpu.cpp), or None where
        it does not apply: no C++ kernels on these Linears (not installed yet, another device), a
        bias, GPTQ's act-order permutation, mixed settings. Built at the first forward after the
        kernels are installed (the weights do not change after that)."""
        if self._grouped_cache is not None:
            return self._grouped_cache
        mlps = list(self.experts.values())
        kernels = mlps[0].gate_up_proj.packed if mlps else None
        if kernels is None or mlps[0].fused is None:
            return None
        lins = [lin for m in mlps for lin in (m.gate_up_proj, m.down_proj)]
        quantized = [lin for lin in lins if lin.quant is not None]
        if (any(lin.packed is not kernels or not lin.in_cpp_calls() for lin in lins)
                or len({(lin.quant_bf16, lin.quant_int8_rows) for lin in quantized}) > 1):
            return None
        gate_up, down = [], []
        for e in range(self.num_experts):
            m = self.experts[str(e)] if str(e) in self.experts else None
            if m is None:  # another rank's expert (expert parallel): empty tensors, zero rows
                gate_up += [torch.empty(0)] * 2
                down += [torch.empty(0)] * 2
            else:
                gate_up += m.gate_up_proj.cpp_tensors()
                down += m.down_proj.cpp_tensors()
        settings = quantized[0] if quantized else lins[0]  # quant_bf16 / int8_rows: the same on every expert
        self._grouped_cache = _GroupedExperts(kernels, gate_up, mlps[0].gate_up_proj.out_features, down,
                                              mlps[0].down_proj.out_features, settings.quant_bf16,
                                              settings.quant_int8_rows)
        return self._grouped_cache

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] in x's dtype, expert ids [T, k])."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self._grouped() if x.dtype == torch.float32 else None
        if g is None:
            out = self._forward_torch(x)
        else:  # the C++ kernels: routing, the experts and the combine (moe_cpu.cpp)
            weights, order, counts = g.kernels.moe_route(self.gate(x), self.top_k, self.norm_topk_prob)
            tokens = order // self.top_k
            if self.grouped_kernel:  # every expert in one call per projection (another rank's: zeros)
                h = g.kernels.grouped_linear(x, counts, g.gate_up, g.gate_up_features, g.quant_bf16, g.int8_rows,
                                             tokens)
                ys = g.kernels.grouped_linear(g.kernels.silu_and_mul(h), counts, g.down, g.down_features,
                                              g.quant_bf16, g.int8_rows)
            else:
                ys = self._experts_one_by_one(x.index_select(0, tokens), counts)
            out = g.kernels.moe_combine(ys, order, weights)
        if self.shared_expert is not None:
            out += torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """Any device: torch ops around one call per expert."""
        weights, ids = self.route(x)
        flat = ids.flatten()  # [T * k]: pair p is token p // k
        order = torch.argsort(flat, stable=True)
        tokens = order // self.top_k
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        ys = self._experts_one_by_one(x.index_select(0, tokens), counts)  # the pairs' inputs, grouped by expert
        ys.mul_(weights.flatten().index_select(0, order).unsqueeze(1))
        return torch.zeros_like(x).index_add_(0, tokens, ys)

    def _experts_one_by_one(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n:
                if str(e) in self.experts:
                    ys[start:start + n] = self.experts[str(e)](xs[start:start + n])
                else:  # another rank's expert (expert parallel): its share comes in the all-reduce
                    ys[start:start + n] = 0
                start += n
        return ys
