"""One rank's share of a checkpoint (Megatron's split; see parallel.py):

  q/k/v projections (and biases)   rows by attention head; KV heads split when the rank count
                                   divides them, else each rank keeps the one its query heads read
  OLMoE's q/k norm weights         by head, as q/k (the norm's mean of squares: an all-reduce)
  o_proj                           columns by query head (a row-parallel matmul: partial sums)
  gate/up (dense, experts, shared) rows by intermediate channel
  down (dense, experts, shared)    columns by intermediate channel
  embed_tokens / lm_head           rows by vocabulary (padded so every rank has as many)
  norms, the MoE router, Qwen2-MoE's shared-expert gate   whole on every rank
With --enable-expert-parallel the experts are not cut: each rank keeps whole experts. Quantized
weights are cut the same way and stay quantized (columns in whole groups of their quantization).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from pagedserve.model.arch import ModelArch

log = logging.getLogger("pagedserve.distributed")

_ROWS = ("q_proj", "q_norm", "gate_proj", "up_proj", "w1", "w3")  # split by output rows (OLMoE's q_norm: per q channel)
_COLS = ("o_proj", "down_proj", "w2")  # split by input columns


def check_tensor_parallel(arch: ModelArch, size: int, expert_parallel: bool = False) -> None:
    """Refuse, at start, a rank count the model's shape cannot be cut into."""
    if expert_parallel and not arch.moe.num_experts:
        raise ValueError("--enable-expert-parallel is for Mixture-of-Experts models; this one is dense")
    if size == 1:
        return
    h, kv = arch.num_heads, arch.num_kv_heads
    problems = []
    if h % size:
        problems.append(f"its {h} attention heads")
    if kv % size and size % kv:
        problems.append(f"its {kv} KV heads (neither divides the other)")
    if arch.intermediate_size % size and len(arch.moe_layers) < arch.num_layers:  # a dense MLP to split
        problems.append(f"its MLP width {arch.intermediate_size}")
    for name, width in (("expert width", 0 if expert_parallel else arch.moe.expert_intermediate_size),
                        ("shared expert width", arch.moe.shared_expert_intermediate_size)):
        if width and width % size:
            problems.append(f"its {name} {width}")
    if problems:
        raise ValueError(f"--tensor-parallel-size {size} does not divide {', '.join(problems)}: pick a size that "
                         f"divides them (this model: {h} heads, {kv} KV heads)")
    if arch.qk_norm and kv % size:
        raise ValueError(f"{arch.architecture} normalizes k over all its {kv} KV heads, which {size} ranks can only "
                         "share when the count divides them (a replicated head would count twice): pick a "
                         "--tensor-parallel-size that divides it")


def local_arch(arch: ModelArch, size: int, rank: int = 0, expert_parallel: bool = False) -> ModelArch:
    """The shape one rank builds: its heads, widths and vocabulary shard (and, expert parallel,
    which whole experts it holds)."""
    if size == 1:
        return arch
    m = arch.moe
    if expert_parallel and m.num_experts:
        return dataclasses.replace(local_arch(arch, size), moe=dataclasses.replace(
            local_arch(arch, size).moe, expert_intermediate_size=m.expert_intermediate_size), expert_ranks=(rank, size))
    return dataclasses.replace(
        arch, num_heads=arch.num_heads // size, num_kv_heads=max(1, arch.num_kv_heads // size),
        # (an all-MoE model's unused dense width may not divide: check_tensor_parallel)
        intermediate_size=arch.intermediate_size // size if arch.intermediate_size % size == 0 else
        arch.intermediate_size, vocab_size=-(-arch.vocab_size // size),
        moe=dataclasses.replace(m, expert_intermediate_size=m.expert_intermediate_size // size,
                                shared_expert_intermediate_size=m.shared_expert_intermediate_size // size))


def _kv_rows(arch: ModelArch, rank: int, size: int) -> tuple[int, int]:
    """(first, count) rows of k/v projections this rank keeps."""
    kv, d = arch.num_kv_heads, arch.head_dim
    if kv % size == 0:
        per = kv // size
        return rank * per * d, per * d
    return (rank * kv // size) * d, d  # replicated: the KV head of this rank's query heads


def _rows(w, first: int, count: int, pad_to: int | None = None):
    """Rows [first, first + count) of a float or quantized weight, zero rows appended up to pad_to."""
    from pagedserve.model.quantization.weight import QuantizedWeight

    if isinstance(w, QuantizedWeight):
        return w.slice_rows(first, count, pad_to)
    rows = w[first:first + count]
    if pad_to is not None and rows.shape[0] < pad_to:  # the last vocabulary shard: zero rows past the end
        rows = torch.cat([rows, rows.new_zeros(pad_to - rows.shape[0], *rows.shape[1:])])
    return rows.contiguous()


def shard_weights(weights: dict, arch: ModelArch, rank: int, size: int,
                  expert_parallel: bool = False) -> dict[str, torch.Tensor]:
    """Cut each tensor (Hugging Face names) to this rank's part. Quantized weights stay quantized:
    output rows cut anywhere, input columns in whole groups; a cut through a group (or through
    GPTQ act-order's permuted columns) dequantizes that weight first, with a log line. Expert
    parallel: experts are not cut; a rank keeps the whole experts e % size == rank and drops the others."""
    if size == 1:
        return weights
    from pagedserve.model.quantization.weight import QuantizedWeight

    out, dequantized = {}, []
    vocab_rows = -(-arch.vocab_size // size)
    for name, w in weights.items():
        parts = name.split(".")
        module = parts[-2] if len(parts) >= 2 else ""
        if expert_parallel and ".experts." in name:
            expert = int(parts[parts.index("experts") + 1])
            if expert % size == rank:
                out[name] = w
            continue
        if module in ("embed_tokens", "lm_head"):
            n = max(0, min(vocab_rows, w.shape[0] - rank * vocab_rows))
            out[name] = _rows(w, rank * vocab_rows, n, vocab_rows)
        elif module in ("k_proj", "v_proj", "k_norm"):  # OLMoE's k_norm: per k channel
            out[name] = _rows(w, *_kv_rows(arch, rank, size))
        elif module in _ROWS:
            per = w.shape[0] // size
            out[name] = _rows(w, rank * per, per)
        elif module in _COLS:
            per = w.shape[1] // size
            if isinstance(w, QuantizedWeight):
                cut = w.slice_cols(rank * per, per)
                if cut is not None:
                    out[name] = cut
                    continue
                w = w.dequantize()
                dequantized.append(name)
            out[name] = w[:, rank * per:(rank + 1) * per].contiguous()
        else:
            out[name] = w
    if dequantized:
        log.warning("tensor parallelism: %d quantized weights dequantized to float to be split (a cut through their "
                    "groups, or act-order columns): %s", len(dequantized), ", ".join(dequantized[:4]))
    return out

