"""Helpers for tests and benchmarks: tiny random-weight models in real Hugging Face folders.

The tiny models reuse the default model's tokenizer, so their text round-trips, and are built
with transformers' own config and model classes, which makes them the reference in parity tests.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TINY_COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
)


def make_tiny_model(path: Path, kind: str = "llama", seed: int = 0, tokenizer_from: Path | None = None) -> Path:
    """Write a tiny model folder of `kind` in llama | llama3 | qwen2 | mistral, or a Mixture of
    Experts: mixtral (top-2 of 4), qwen2_moe (top-2 of 8 beside a shared expert; layer 1 dense, as
    mlp_only_layers allows), olmoe (top-4 of 16, q/k norms). The tokenizer files come from
    `tokenizer_from` (a folder), else from the default model's converted GGUF."""
    import torch
    from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, MixtralConfig, OlmoeConfig,
                              Qwen2Config, Qwen2MoeConfig)

    path = Path(path)
    if (path / "config.json").exists():
        return path
    if tokenizer_from is None:
        from pagedserve.model.loader import default_model_gguf, gguf_to_hf_folder

        tok_src = gguf_to_hf_folder(default_model_gguf())
    else:
        tok_src = Path(tokenizer_from)
    vocab = 49152
    common = dict(TINY_COMMON, vocab_size=vocab, bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        cfg = LlamaConfig(**common, tie_word_embeddings=True, rope_theta=10000.0)
    elif kind == "llama3":
        cfg = LlamaConfig(
            **common, tie_word_embeddings=False, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
        )
    elif kind == "qwen2":
        cfg = Qwen2Config(**common, tie_word_embeddings=False, rope_theta=1000000.0)
    elif kind == "mistral":
        cfg = MistralConfig(**common, tie_word_embeddings=False, sliding_window=None)
    elif kind == "mixtral":
        cfg = MixtralConfig(**common, tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2,
                            sliding_window=None)
    elif kind == "qwen2_moe":
        cfg = Qwen2MoeConfig(**common, tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2,
                             moe_intermediate_size=32, shared_expert_intermediate_size=96, mlp_only_layers=[1],
                             norm_topk_prob=False)
    elif kind == "olmoe":
        cfg = OlmoeConfig(**common, tie_word_embeddings=False, num_experts=16, num_experts_per_tok=4,
                          norm_topk_prob=False)
        cfg.intermediate_size = 32  # OLMoE's experts are intermediate_size wide
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # larger than default init so outputs are not near-uniform
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    for f in tok_src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy(f, path / f.name)
    return path
