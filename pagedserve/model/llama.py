"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2; with moe.py's experts Mixtral,
Qwen2-MoE and OLMoE) over a flattened, paged batch.

Inputs are all the step's tokens concatenated (no padding) with their positions; attention
reads and writes K/V through the paged cache (see attention.py). Q/K/V and gate/up projections
are fused into one matmul each. Weights load by Hugging Face name.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.distributed.parallel import tp
from pagedserve.engine.cpu_memory import HugePageArena
from pagedserve.model.arch import ModelArch
from pagedserve.model.attention import AttentionBackend, AttentionMetadata, ScaledKV
from pagedserve.model.quantization.weight import QuantizedWeight


class Linear(nn.Linear):
    """nn.Linear that can run on weights re-laid once for our C++ GEMM (`use_cpu_kernels`): BLAS
    re-packs the weight on every call, which at decode batch sizes costs as much as the product.
    Every other device and shape uses F.linear."""

    packed = None  # C++ module whose packed_linear reads self.weight, set by use_cpu_kernels
    random_init = True  # False inside build_for_checkpoint(): the checkpoint fills every weight
    quant: QuantizedWeight | None = None  # a quantized checkpoint's weight (self.weight is then None)
    quant_bf16 = False  # packed quantized weights multiply in bf16 (the bf16 GEMM's precision)
    quant_int8_rows = 0  # batches of this many rows or more multiply int8 activations (--activation-dtype int8)

    def reset_parameters(self) -> None:
        if self.random_init:
            super().reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            if self.quant is not None:
                qw, scales = self.quant.pack()
                if self.quant.input_perm is not None:  # GPTQ act-order: x in the weight's column order
                    x = x.index_select(-1, self.quant.input_perm)
                return self.packed.quant_linear(x, qw, scales, self.bias, self.quant_bf16, self.quant_int8_rows)
            return self.packed.packed_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def set_quantized(self, w: QuantizedWeight) -> None:
        """Keep `w` quantized in place of the float weight (whose never-written memory is freed)."""
        _take_quantized(self, w)

    def in_cpp_calls(self, bias_ok: bool = False) -> bool:
        """Whether whole-layer C++ calls (llama_layers_cpu.cpp, moe_cpu.cpp) can take this Linear:
        packed, bias-free unless the call adds one, and not GPTQ act-order (its input permutation
        runs in Python)."""
        return (self.packed is not None and (bias_ok or self.bias is None)
                and (self.quant is None or self.quant.input_perm is None))

    def cpp_tensors(self) -> list[torch.Tensor]:
        """This Linear as those C++ calls take it: its packed float weight and an empty tensor, or its
        quantized weight and scales."""
        if self.quant is not None:
            return list(self.quant.pack())
        return [self.weight.detach(), torch.empty(0)]

    def dequantize(self, dtype: torch.dtype) -> None:
        """Back to a float weight (devices and shapes the quantized kernels do not cover)."""
        if self.quant is not None:
            self.weight = nn.Parameter(self.quant.dequantize().to(dtype), requires_grad=False)
            self.quant = None

    def pack(self, kernels, dtype: torch.dtype = torch.float32, int8_rows: int = 0) -> None:
        """Replace the weight [out, in] by its packed layout: float32 [out/16, in, 16], or bf16
        [out/16, in/2, 32] (k-pairs for AVX512_BF16's dot product). A weight shared with another
        module (the tied embedding) is copied, not changed. A quantized weight stays quantized,
        multiplied in `dtype`'s precision, or with int8 activations from `int8_rows` rows up."""
        if self.quant is not None:
            self.quant.pack()
            self.quant_bf16 = dtype == torch.bfloat16
            self.quant_int8_rows = int8_rows
            self.packed = kernels
            return
        w = self.weight.detach()
        packed = kernels.pack_linear_weight_bf16(w) if dtype == torch.bfloat16 else kernels.pack_linear_weight(w)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.packed = kernels


class Embedding(nn.Embedding):
    """nn.Embedding without the random init: the weights always come from the checkpoint (and a
    135M-parameter normal_ is a second of start-up). A quantized table (GGUF's token_embd) stays
    quantized: rows are dequantized as they are looked up, from the packed form the tied output
    head multiplies by when the kernels run (one copy)."""

    quant: QuantizedWeight | None = None
    kernels = None  # C++ module: look rows up in the packed quantized table

    def reset_parameters(self) -> None:
        pass

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.quant is None:
            return super().forward(ids)
        if self.kernels is not None:
            return self.kernels.quant_embedding(ids, *self.quant.pack())
        return self.quant.rows(ids.cpu()).to(ids.device)

    def set_quantized(self, w: QuantizedWeight) -> None:
        _take_quantized(self, w)


def _take_quantized(module: nn.Module, w: QuantizedWeight) -> None:
    """`module` (a Linear or Embedding) keeps `w` quantized in place of its float weight."""
    if w.shape != tuple(module.weight.shape):
        raise ValueError(f"quantized weight {w.source} has shape {w.shape}, expected {tuple(module.weight.shape)}")
    module.quant = w
    module.weight = None


@contextlib.contextmanager
def build_for_checkpoint(device: torch.device, dtype: torch.dtype):
    """Build modules directly on `device` in `dtype`, without random init (load_weights fills
    and checks every parameter). Not on the meta device: there every op runs Python reference
    kernels, and to_empty() alone imported torch's symbolic-shape machinery (~1 s per start)."""
    old = torch.get_default_dtype()
    Linear.random_init = False
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)
        Linear.random_init = True


# Packed weights in one buffer on huge pages (below); False leaves each where packing put it
# (benchmarks/huge_pages.py compares the two in one process).
WEIGHTS_ON_HUGE_PAGES = True


def use_cpu_kernels(model: nn.Module, kernels, pack: bool = True, weight_dtype: torch.dtype = torch.float32,
                    int8_activation_rows: int = 0) -> int:
    """Install the C++ CPU kernels (cpu_kernels.load()) in `model`: fused RMSNorm, rotary and
    SiLU*up everywhere, with `pack` the packed-weight GEMM on every float32 Linear whose output
    size is a multiple of 16 (its weights packed in `weight_dtype`: float32, or bfloat16 for the
    AVX512_BF16 GEMM) and the quantized GEMM on every quantized Linear whose shape it takes
    (multiplying in `weight_dtype`'s precision above its integer kernel's batch sizes, or from
    `int8_activation_rows` rows up in one-pass int8 activations: --activation-dtype int8), the
    quantized embedding lookup, and, when that covers every layer of a LlamaForCausalLM on the C++
    attention backend, its whole layer loop in one C++ call. Returns how many Linears were packed;
    dequantize_unpacked() then turns the quantized weights left over into float ones."""
    n = 0
    for m in list(model.modules()):
        if isinstance(m, (RMSNorm, RotaryEmbedding, MLP)):
            m.fused = kernels
        elif isinstance(m, Embedding) and m.quant is not None:
            m.kernels = kernels
        elif pack and isinstance(m, Linear) and m.packed is None and m.quant is not None and not m.quant.packable():
            m.pack(kernels, weight_dtype, int8_activation_rows)
            n += 1
        elif (pack and isinstance(m, Linear) and m.packed is None and m.out_features % 16 == 0
              and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"):
            m.pack(kernels, weight_dtype)
            n += 1
    if n and WEIGHTS_ON_HUGE_PAGES:
        _packed_weights_onto_huge_pages(model)
    if isinstance(model, LlamaForCausalLM):
        model.fuse_layers(kernels)
    return n


def _packed_weights_onto_huge_pages(model: nn.Module) -> None:
    """Every packed weight moved into one buffer on huge pages, in the order the layers stream
    them (engine/cpu_memory.py HugePageArena: 4-10% faster weight streaming). Before fuse_layers
    and the MoE grouped call take their references to the weights."""
    owners, seen = [], set()
    for m in model.modules():
        if isinstance(m, Linear) and m.packed is not None:
            if m.quant is None:
                owners.append(m)
            elif id(m.quant) not in seen:  # a tied embedding and head share one quantized weight
                seen.add(id(m.quant))
                owners.append(m.quant)
    sizes = [t.numel() * t.element_size() for o in owners
             for t in ((o.weight,) if isinstance(o, Linear) else o.pack())]
    arena = HugePageArena(sizes)
    for o in owners:  # each source is dropped as its copy is placed: ~one copy resident throughout
        if isinstance(o, Linear):
            o.weight = nn.Parameter(arena.place(o.weight.detach()), requires_grad=False)
        else:
            o.move_packed(arena.place)
    if arena.total >= 16 << 20 and (huge := arena.huge_fraction()) < 0.5:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
        logging.getLogger("pagedserve.runner").info(
            "packed weights: %.0f%% of %.0f MiB on huge pages (transparent_hugepage: %s); decode steps read them a "
            "few %% slower", 100 * huge, arena.total / 2**20,
            thp.read_text().strip() if thp.exists() else "not available")


def dequantize_unpacked(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Turn every quantized weight the kernels did not take (no C++ kernels on this device, or a
    shape they do not cover) back into a `dtype` float weight; returns their names for the log."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, Linear) and m.quant is not None and m.packed is None:
            names.append(f"{name} ({m.quant.packable() or 'no quantized kernel here'})")
            m.dequantize(dtype)
        elif isinstance(m, Embedding) and m.quant is not None and m.kernels is None:
            names.append(f"{name} (no quantized kernel here)")
            m.weight = nn.Parameter(m.quant.dequantize().to(dtype), requires_grad=False)
            m.quant = None
    return names


class RMSNorm(nn.Module):
    fused = None  # C++ kernels module (use_cpu_kernels), else the PyTorch ops below

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """The norm of x; given `residual`, the norm of x + residual and that sum (the next
        residual) as a pair. The fused kernel does the add and the norm in one pass, in place."""
        if self.fused is not None and x.is_contiguous():
            if residual is None:
                out = torch.empty_like(x)
                self.fused.rms_norm(out, x, self.weight, self.eps)
                return out
            self.fused.add_rms_norm(x, residual, self.weight, self.eps)
            return x, residual
        if residual is not None:
            residual = x = x + residual
        dtype = x.dtype
        h = x.float()
        h = self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        return h if residual is None else (h, residual)


class ShardedRMSNorm(RMSNorm):
    """RMSNorm over a vector split across the tensor-parallel ranks (OLMoE's q and k norms, over all
    heads): each rank holds its heads' slice of x and of the weight; the mean of squares is summed
    over the ranks (one small all-reduce) before each rank scales its slice. On one rank, RMSNorm."""

    def __init__(self, dim: int, eps: float, ranks: int):
        super().__init__(dim, eps)
        self.ranks = ranks

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.ranks == 1:
            return super().forward(x, residual)
        assert residual is None
        h = x.float()
        sq = tp().all_reduce(h.pow(2).sum(-1, keepdim=True))
        return self.weight * (h * torch.rsqrt(sq / (x.shape[-1] * self.ranks) + self.eps)).to(x.dtype)


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    d = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = arch.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    # llama3: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables precomputed for every position (HF's rotate-half convention)."""

    fused = None  # C++ kernels module: rotates q and k in place

    def __init__(self, arch: ModelArch, max_positions: int):
        super().__init__()
        # float32 tables, on the CPU (the runner moves them): built under a device context such as
        # "meta" this math would run Python reference kernels that import torch._dynamo (2.5 s).
        with torch.device("cpu"):
            inv_freq = rope_inv_freq(arch)
            t = torch.arange(max_positions, dtype=torch.float32)
            freqs = torch.outer(t, inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        if self.fused is not None:
            self.fused.rotary_embedding(q, k, positions, self.cos, self.sin)
            return q, k
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, arch: ModelArch, backend: AttentionBackend):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(arch.hidden_size, self.q_size + 2 * self.kv_size, bias=arch.attention_bias)
        self.o_proj = Linear(self.q_size, arch.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5
        self.backend = backend
        # OLMoE: RMSNorm over all of q and of k before RoPE (over every rank's heads under tensor
        # parallelism, whose KV heads split evenly: shard.py), and an optional clamp of q, k, v
        ranks = tp().size
        self.q_norm = ShardedRMSNorm(self.q_size, arch.rms_norm_eps, ranks) if arch.qk_norm else None
        self.k_norm = ShardedRMSNorm(self.kv_size, arch.rms_norm_eps, ranks) if arch.qk_norm else None
        self.clip_qkv = arch.clip_qkv

    def forward(self, x, positions, rotary: RotaryEmbedding, kv_cache, meta: AttentionMetadata, rows=None):
        """Every token's K and V go to the cache; the output is only for `rows` when given."""
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            q, k = self.q_norm(q.contiguous()), self.k_norm(k.contiguous())
        if self.clip_qkv is not None:
            q, k, v = (y.clamp(-self.clip_qkv, self.clip_qkv) for y in (q, k, v))
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = rotary(positions, q, k)
        o = self.backend.forward(q, k, v, kv_cache, meta, self.scale).reshape(t, self.q_size)
        return self.o_proj(o if rows is None else o[rows])


class MLP(nn.Module):
    fused = None  # C++ kernels module: silu(gate) * up in one pass

    def __init__(self, arch: ModelArch, intermediate: int | None = None):
        super().__init__()
        self.intermediate = intermediate or arch.intermediate_size  # experts have their own
        self.gate_up_proj = Linear(arch.hidden_size, 2 * self.intermediate, bias=False)
        self.down_proj = Linear(self.intermediate, arch.hidden_size, bias=False)

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        if self.fused is not None:
            return self.down_proj(self.fused.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, backend: AttentionBackend, index: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = Attention(arch, backend)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        if index in arch.moe_layers:
            from pagedserve.model.moe import SparseMoE

            self.mlp = SparseMoE(arch)
        else:
            self.mlp = MLP(arch)

    def forward(self, x, residual, positions, rotary, kv_cache, meta, rows=None):
        """Takes and returns the residual stream separately from the block's output, so each
        residual add fuses with the norm that follows it (x + residual is the usual x). With
        `rows`, only those tokens' outputs are computed past attention."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        # tensor parallel: each rank's o_proj and down_proj give partial sums (parallel.py)
        x = tp().all_reduce(self.self_attn(x, positions, rotary, kv_cache, meta, rows))
        if rows is not None:
            residual = residual[rows]
        x, residual = self.post_attention_layernorm(x, residual)
        return tp().all_reduce(self.mlp(x)), residual


class LlamaForCausalLM(nn.Module):
    fused = None  # C++ kernels module running every layer in one call (fuse_layers)

    def __init__(self, arch: ModelArch, backend: AttentionBackend, max_positions: int, full_vocab: int | None = None):
        super().__init__()
        self.arch = arch  # under tensor parallelism: this rank's shape (distributed/shard.py local_arch)
        self.full_vocab = full_vocab or arch.vocab_size
        self.embed_tokens = Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch, backend, i) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = Linear(arch.hidden_size, arch.vocab_size, bias=False)
        self.tie_weights()
        self.rotary = RotaryEmbedding(arch, max_positions)

    def tie_weights(self) -> None:
        """Share the embedding with the output head."""
        if self.arch.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: torch.Tensor | ScaledKV,  # [layers, 2, num_blocks, KVH, block_size, D]
        meta: AttentionMetadata,
        rows: torch.Tensor | None = None,  # [R] token indices whose hidden states are wanted
    ) -> torch.Tensor:  # hidden states [T, hidden], or [R, hidden] for `rows`
        """With `rows` (the tokens to sample from), the last layer computes its attention output
        projection and MLP for those tokens only: a prompt chunk's other tokens only needed their
        K and V, which every layer has written by then."""
        x, residual = self._embed(input_ids), None
        if self.fused is not None:
            return self._fused_layers(x, positions, kv_caches, meta, rows)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, positions, self.rotary, kv_caches[i], meta, rows if i == last else None)
        return self.norm(x, residual)[0]

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        t = tp()
        if t.size == 1:
            return self.embed_tokens(ids)
        n = self.arch.vocab_size  # this rank's rows: [rank * n, rank * n + n)
        local = ids - t.rank * n
        inside = (local >= 0) & (local < n)
        x = self.embed_tokens(torch.where(inside, local, torch.zeros_like(local)))
        return t.all_reduce(x * inside.unsqueeze(1).to(x.dtype))

    def fuse_layers(self, kernels) -> bool:
        """Run the layer loop above in one C++ call (csrc/llama_layers_cpu.cpp: the same kernels in
        the same order, bitwise-equal results, no Python between them) when every kernel it needs is
        installed: packed bias-free Linears (the QKV bias aside), fused norms and rotary, the C++
        attention backend. Returns whether it now does."""
        none = torch.empty(0)
        ok = tp().size == 1 and self.rotary.fused is not None and self.norm.fused is not None and all(
            isinstance(layer.mlp, MLP) and layer.self_attn.q_norm is None and layer.self_attn.clip_qkv is None
            and layer.self_attn.backend.name == "cpp" and layer.input_layernorm.fused is not None
            and layer.post_attention_layernorm.fused is not None and layer.self_attn.qkv_proj.in_cpp_calls(True)
            and all(lin.in_cpp_calls() for lin in (layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj))
            for layer in self.layers)
        if not ok:
            self.fused = None
            return False
        weights = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv_bias = attn.qkv_proj.bias if attn.qkv_proj.bias is not None else none
            weights += [layer.input_layernorm.weight, *attn.qkv_proj.cpp_tensors(), qkv_bias,
                        *attn.o_proj.cpp_tensors(), layer.post_attention_layernorm.weight,
                        *mlp.gate_up_proj.cpp_tensors(), *mlp.down_proj.cpp_tensors()]
        weights.append(self.norm.weight)
        self._layer_weights = [w.detach() for w in weights]
        self._quant_bf16 = any(lin.quant_bf16 for lin in self.modules() if isinstance(lin, Linear))
        self._quant_int8_rows = max((lin.quant_int8_rows for lin in self.modules() if isinstance(lin, Linear)), default=0)
        self.fused = kernels
        return True

    def _fused_layers(self, x, positions, kv_caches, meta: AttentionMetadata, rows):
        a, pf = self.arch, meta.prefills
        scaled = isinstance(kv_caches, ScaledKV)
        return self.fused.llama_layers(
            x, positions, kv_caches.data if scaled else kv_caches, self._layer_weights, self.rotary.cos, self.rotary.sin,
            meta.slot_blocks, meta.slot_offsets, meta.num_decodes, meta.decode_block_tables, meta.decode_context_lens,
            [p.block_table for p in pf], [p.start for p in pf], [p.num_tokens for p in pf],
            [p.context_len for p in pf], rows, a.num_heads, a.num_kv_heads, self.norm.eps,
            self.layers[0].self_attn.scale, self.layers[0].self_attn.backend.bf16_math,
            kv_caches.scales if scaled else None, self._quant_bf16, self._quant_int8_rows)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        if tp().size > 1:  # each rank's vocabulary shard, side by side; padding rows cut off
            logits = tp().gather_last_dim(logits)[:, :self.full_vocab]
        return logits

    # -- weights ---------------------------------------------------------------------------
    @torch.inference_mode()
    def init_dummy_weights(self, seed: int) -> None:
        """--load-format dummy: every weight random where it lives (normal, std 0.02; norms 1;
        biases 0), for runs of a model whose checkpoint cannot be read (vLLM's dummy format)."""
        norms = {id(m.weight) for m in self.modules() if isinstance(m, RMSNorm)}
        for i, (name, p) in enumerate(sorted(self.named_parameters())):
            if id(p) in norms:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:  # drawn where the tensor lives (an 8B model's weights in seconds on a GPU)
                p.normal_(0, 0.02, generator=torch.Generator(device=p.device).manual_seed(seed * 100_003 + i))

    @torch.inference_mode()
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Load from Hugging Face names ("model.layers.0.self_attn.q_proj.weight", ...),
        fusing q/k/v and gate/up. Every parameter must be filled; extras are an error."""
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        quantized: dict[str, dict[int, QuantizedWeight]] = {}  # fused target -> its quantized shards
        filled: set[str] = set()
        fused = {
            "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
            "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
        }
        for hf_name, tensor in weights.items():
            if "rotary_emb.inv_freq" in hf_name:
                continue
            name = _mixtral_names(hf_name.removeprefix("model."))
            if name == "lm_head.weight" and self.arch.tie_word_embeddings:
                continue
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in fused:
                target, shard = fused[parts[-2]]
                name = ".".join(parts[:-2] + [target, parts[-1]])
                param = params.get(name)
                if param is None:
                    raise ValueError(f"unexpected weight {hf_name!r}")
                sizes = self._shard_sizes(name)
                if isinstance(tensor, QuantizedWeight):
                    if tensor.shape[0] != sizes[shard]:
                        raise ValueError(f"weight {hf_name!r} has {tensor.shape[0]} rows, expected {sizes[shard]}")
                    quantized.setdefault(name, {})[shard] = tensor
                else:
                    start = sum(sizes[:shard])
                    param.data[start : start + sizes[shard]].copy_(tensor)
                filled.add(f"{name}#{shard}")
                continue
            if isinstance(tensor, QuantizedWeight) and name.endswith(".weight") and \
                    hasattr(modules.get(name.removesuffix(".weight")), "set_quantized"):
                modules[name.removesuffix(".weight")].set_quantized(tensor)
                filled.add(name)
                continue
            param = params.get(name)
            if param is None:
                raise ValueError(f"unexpected weight {hf_name!r} for {self.arch.architecture}")
            if param.shape != tensor.shape:
                raise ValueError(f"weight {hf_name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
            param.data.copy_(tensor)
            filled.add(name)
        expected: set[str] = set()
        for name in params:
            target = name.split(".")[-2] if "." in name else ""
            if target in ("qkv_proj", "gate_up_proj"):
                expected.update(f"{name}#{i}" for i in range(len(self._shard_sizes(name))))
            elif not (name == "lm_head.weight" and self.arch.tie_word_embeddings):
                expected.add(name)
        missing = sorted(expected - filled)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:3]}")
        for name, shards in quantized.items():
            module = modules[name.removesuffix(".weight")]
            sizes = self._shard_sizes(name)
            if len(shards) == len(sizes):  # all quantized: one fused quantized weight
                module.set_quantized(QuantizedWeight.cat([shards[i] for i in range(len(sizes))]))
            else:  # some shards float: the quantized ones join them dequantized
                for i, w in shards.items():
                    start = sum(sizes[:i])
                    module.weight.data[start : start + sizes[i]].copy_(w.dequantize())
        if self.arch.tie_word_embeddings and self.embed_tokens.quant is not None:
            self.lm_head.set_quantized(self.embed_tokens.quant)

    def _shard_sizes(self, name: str) -> list[int]:
        """The row blocks fused into the parameter `name` (q/k/v, or gate/up of its own MLP)."""
        a = self.arch
        if name.split(".")[-2] == "qkv_proj":
            return [a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.head_dim]
        half = self.get_submodule(name.rsplit(".", 1)[0]).out_features // 2
        return [half, half]


def _mixtral_names(name: str) -> str:
    """Mixtral's checkpoint names in the Qwen2-MoE / OLMoE spelling the modules use:
    block_sparse_moe -> mlp, experts.E.w1 / w3 / w2 -> gate_proj / up_proj / down_proj."""
    if ".block_sparse_moe." not in name:
        return name
    name = name.replace(".block_sparse_moe.", ".mlp.")
    for old, new in ((".w1.", ".gate_proj."), (".w3.", ".up_proj."), (".w2.", ".down_proj.")):
        name = name.replace(old, new)
    return name
