"""The shape of a Llama-family model, read from a Hugging Face config.json.

One dataclass covers Llama 2/3, SmolLM2, Mistral and Qwen2, and the Mixture-of-Experts models built
on the same decoder (Mixtral, Qwen2-MoE, OLMoE): they differ only in a few fields (q/k/v bias,
RoPE scaling, tied embeddings, GQA ratio; for MoE the experts, how many a token uses, a shared
expert, q/k norms), which are all here. `moe_fields` is also how the planner reads expert counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "OlmoeForCausalLM": "olmoe",
}
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "OlmoeForCausalLM")


@dataclass(frozen=True)
class MoEFields:
    num_experts: int = 0  # 0: dense
    num_experts_per_tok: int = 0
    expert_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert (0: none)
    norm_topk_prob: bool = False  # renormalize the chosen experts' probabilities to sum to 1


def moe_fields(cfg: dict[str, Any]) -> MoEFields:
    """The expert counts of a config.json as each family spells them (Mixtral num_local_experts,
    Qwen2-MoE / OLMoE num_experts, DeepSeek n_routed_experts + n_shared_experts); dense: zeros."""
    experts = cfg.get("num_local_experts") or cfg.get("n_routed_experts") or cfg.get("num_experts") or 0
    if not experts:
        return MoEFields()
    per_expert = cfg.get("moe_intermediate_size") or cfg.get("intermediate_size") or 0
    shared = cfg.get("shared_expert_intermediate_size") or (cfg.get("n_shared_experts") or 0) * per_expert
    mixtral = "MixtralForCausalLM" in (cfg.get("architectures") or []) or cfg.get("model_type") == "mixtral"
    return MoEFields(num_experts=int(experts), num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 2),
                     expert_intermediate_size=int(per_expert), shared_expert_intermediate_size=int(shared),
                     norm_topk_prob=True if mixtral else bool(cfg.get("norm_topk_prob", False)))
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _qkv_bias(arch: str, cfg: dict[str, Any]) -> bool:
    """Qwen2 always has q/k/v biases, Qwen2-MoE as qkv_bias says (default on); Llama-family
    configs call it attention_bias."""
    if arch == "Qwen2ForCausalLM":
        return True
    if arch == "Qwen2MoeForCausalLM":
        return bool(cfg.get("qkv_bias", True))
    return bool(cfg.get("attention_bias", False))


@dataclass
class ModelArch:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: list[int]
    moe: MoEFields = MoEFields()
    moe_layers: tuple[int, ...] = ()  # the layers whose MLP is the experts (the rest dense)
    qk_norm: bool = False  # OLMoE: RMSNorm over the whole q and k projections before RoPE
    clip_qkv: float | None = None  # OLMoE: q, k, v clamped to +-clip_qkv
    # --enable-expert-parallel: this rank holds whole experts e with e % expert_ranks[1] == expert_ranks[0]
    expert_ranks: tuple[int, int] = (0, 1)

    def owns_expert(self, e: int) -> bool:
        rank, size = self.expert_ranks
        return e % size == rank

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArch":
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            model_type = cfg.get("model_type")
            by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
            arch = by_type.get(model_type)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; pagedserve supports "
                f"{sorted(SUPPORTED_ARCHITECTURES)}"
            )
        missing = [
            k
            for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
            if k not in cfg
        ]
        if missing:
            raise ValueError(f"config.json is missing required fields: {missing}")
        num_heads = cfg["num_attention_heads"]
        # transformers >= 5 writes rope settings under rope_parameters; older files at top level.
        rope_params = dict(cfg.get("rope_parameters") or {})
        rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or rope_params or None
        if scaling is not None:
            scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ValueError(
                    f"unsupported rope_scaling type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}"
                )
            scaling["rope_type"] = rope_type
            if rope_type == "default":
                scaling = None
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        sliding = cfg.get("sliding_window")
        if arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM") and not cfg.get("use_sliding_window", False):
            sliding = None
        moe = moe_fields(cfg) if arch in MOE_ARCHITECTURES else MoEFields()
        layers = cfg["num_hidden_layers"]
        moe_layers: tuple[int, ...] = ()
        if moe.num_experts:
            if not 1 <= moe.num_experts_per_tok <= moe.num_experts:
                raise ValueError(f"num_experts_per_tok={moe.num_experts_per_tok} must be between 1 and the "
                                 f"{moe.num_experts} experts")
            if cfg.get("scoring_func", "softmax") != "softmax" or cfg.get("topk_method", "greedy") != "greedy":
                raise ValueError(f"unsupported MoE routing (scoring_func={cfg.get('scoring_func')!r}, topk_method="
                                 f"{cfg.get('topk_method')!r}): pagedserve routes by softmax then top-k")
            step = int(cfg.get("decoder_sparse_step") or 1)  # Qwen2-MoE: every step-th layer has experts
            dense = set(cfg.get("mlp_only_layers") or [])
            moe_layers = tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0)
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=layers,
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=_qkv_bias(arch, cfg),
            sliding_window=sliding,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            moe=moe,
            moe_layers=moe_layers,
            qk_norm=arch == "OlmoeForCausalLM",
            clip_qkv=cfg.get("clip_qkv") if arch == "OlmoeForCausalLM" else None,
        )

    def num_parameters(self) -> int:
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        attn = (h * (q + 2 * kv) + q * h + 2 * h + (q + kv if self.qk_norm else 0)
                + (q + 2 * kv if self.attention_bias else 0))
        m = self.moe
        moe_mlp = (m.num_experts * 3 * h * m.expert_intermediate_size + m.num_experts * h
                   + (3 * h * m.shared_expert_intermediate_size + h if m.shared_expert_intermediate_size else 0))
        mlps = len(self.moe_layers) * moe_mlp + (self.num_layers - len(self.moe_layers)) * 3 * h * i
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * attn + mlps + emb + h

    def kv_bytes_per_token(self, dtype_bytes: int, scale_bytes: int = 0) -> int:
        """K and V of one token in every layer: head_dim values of dtype_bytes per kv head, plus
        scale_bytes per kv head row for a scaled cache (config.KV_SCALE_BYTES)."""
        return 2 * self.num_layers * self.num_kv_heads * (self.head_dim * dtype_bytes + scale_bytes)
