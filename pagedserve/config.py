"""Typed engine configuration. Field names follow vLLM's engine arguments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a dtype is resolved: `plan` and `--help` answer without it
    import torch

CPU_DEFAULT_KV_CACHE_BYTES = 4 << 30  # like vLLM's VLLM_CPU_KVCACHE_SPACE default (4 GiB)
RUNTIME_RESERVE_FRACTION = 0.05  # of device memory, for activations and allocator slack
# --dtype / --kv-cache-dtype names -> torch's attribute names (torch_dtype() resolves them).
DTYPES = {
    "float32": "float32", "float": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "half": "float16", "fp16": "float16",
}
# KV cache only. fp8_e5m2 (vLLM's, the fp8 its CPU backend supports): K/V stored as they are,
# rounded to 2 mantissa bits, no scale factors. int8 and fp8 / fp8_e4m3 are scaled: each (token,
# kv head) row is stored as x / s with one float32 s = max|x| / qmax beside it
# (model/attention.py quantize_kv), ~1 byte per value plus KV_SCALE_BYTES per row.
KV_ONLY_DTYPES = {"fp8_e5m2": "float8_e5m2", "int8": "int8", "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn"}
SCALED_KV_DTYPES = ("int8", "fp8", "fp8_e4m3")
KV_SCALE_BYTES = 4  # one float32 per (token, kv head) row of a scaled cache, for K and again for V
# --quantization (vLLM's names), detected from the checkpoint when not given (config.json's
# quantization_config, or a GGUF). Integer weights stay quantized in memory on CPUs with the
# kernels (model/quantization/); FP8 weights, and any weight elsewhere, are dequantized at load.
QUANTIZATION_METHODS = ("awq", "gptq", "fp8", "compressed-tensors", "gguf")
LOADABLE_QUANTIZATION = QUANTIZATION_METHODS
# --activation-dtype: what the inputs of quantized-weight matmuls are multiplied as. int8: each group
# of activations quantized to int8 in one pass, as llama.cpp always does (and vLLM's GGUF kernels,
# and OpenVINO's CPU plugin by default: dynamic quantization, groups of 32): ~1.3-2x the quantized
# GEMM's rate on AVX512_VNNI for ~+0.5% perplexity on the default model (benchmarks/README.md).
# float: --dtype's precision (decode's small batches in two int8 passes, ~15 bits). auto: as the
# format's own engine computes — int8 for a GGUF (llama.cpp's numerics) where the CPU has
# AVX512_VNNI and the model runs on one rank; float for AWQ/GPTQ/compressed-tensors (vLLM's W4A16 /
# W8A16) and everywhere int8 cannot run.
ACTIVATION_DTYPES = ("auto", "int8", "float")
# `pagedserve quantize --method` (model/quantization/quantize.py): what it writes.
QUANTIZE_METHODS = ("int8", "int4-rtn", "gptq", "awq")
# --structured-outputs-backend (vLLM's names): auto = xgrammar, switching to guidance (llguidance)
# for JSON schemas with keywords xgrammar would not enforce.
STRUCTURED_OUTPUTS_BACKENDS = ("auto", "xgrammar", "guidance")
DEFAULT_TTFT_TARGET_MS = 1000.0  # --ttft-target-ms (benchmarks/ttft_target.py)
# Requests at this priority or above are background work (batch lines; engine/background.py):
# the batch manager sends its lines at it (--batch-priority), interactive requests come at 0.
BACKGROUND_PRIORITY = 10


def torch_dtype(name: str) -> torch.dtype:
    """A --dtype / --kv-cache-dtype name (DTYPES or KV_ONLY_DTYPES) as torch's dtype."""
    import torch

    return getattr(torch, {**DTYPES, **KV_ONLY_DTYPES}[name])


# --load-format (vLLM's names): the checkpoint's weights, or random ones of the config's shapes
# (benchmarks of large models where no checkpoint can be read, as on a GPU machine without network).
LOAD_FORMATS = ("auto", "dummy")
# Prompt tokens + decodes one engine step may carry (--max-num-batched-tokens) when not given; the
# planner models prefill with the same budget.
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cuda": 2048, "cpu": 512}


@dataclass
class EngineConfig:
    model: str | None = None  # None: the default model (SmolLM2-135M-Instruct)
    served_model_name: str | None = None
    dtype: str = "auto"  # auto: bfloat16 on CUDA and on CPUs with AVX512_BF16, float32 on other CPUs
    kv_cache_dtype: str = "auto"  # auto: the model's dtype; float16/bfloat16 halve a float32 cache; fp8_e5m2, int8, fp8 ~quarter it
    quantization: str | None = None  # None: what the checkpoint says (config.json quantization_config, or a GGUF)
    activation_dtype: str = "auto"  # ACTIVATION_DTYPES: auto = int8 for a GGUF where it can run, else float
    device: str = "auto"  # auto: cuda if available, else cpu
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    block_size: int = 16
    gpu_memory_utilization: float | None = None  # fraction of device memory (CPU: of available RAM)
    kv_cache_memory: int | None = None  # bytes; overrides gpu_memory_utilization
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # default: 2048 on CUDA, 512 on CPU
    enable_prefix_caching: bool = True
    seed: int = 0
    chat_template: str | None = None  # a path or a template string
    tokenizer: str | None = None  # vLLM's --tokenizer: a folder (or cached hub id, or model spec) with the tokenizer
    attention_backend: str | None = None
    num_threads: int | None = None  # CPU threads for torch; default: all cores
    adaptive_threads: bool = True  # CPU: probe 1 vs num_threads while stepping, keep the faster (thread_tuner.py)
    structured_outputs_backend: str = "auto"  # STRUCTURED_OUTPUTS_BACKENDS
    # A prompt waiting this long goes ahead of decodes (scheduler.py); None: never. 1000 ms measured best at 64
    # chat streams: TTFT p50 -26% and p99 -13% at the same ITL and throughput; lower only raised ITL p99.
    ttft_target_ms: float | None = DEFAULT_TTFT_TARGET_MS
    # Background requests (priority >= background_priority: batch lines) beside foreground ones
    # (engine/background.py): at most background_share sequences per foreground one, and
    # background_prefill_tokens of prompt a step. background_priority None: priorities only order.
    background_priority: int | None = BACKGROUND_PRIORITY
    background_share: float = 0.5
    background_prefill_tokens: int = 64
    # Tensor parallelism (distributed/): ranks started by this process (mp), gloo on CPU, NCCL on CUDA;
    # over several machines, torchrun's rendezvous (--nnodes, --node-rank, --master-addr/--master-port).
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False  # MoE under tensor parallelism: whole experts per rank, not split ones
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    # CUDA graphs for decode steps (engine/cuda_graphs.py): off with enforce_eager; the batch sizes
    # captured follow vLLM's --cuda-graph-sizes (None: [1, 2, 4] + multiples of 8 to max_num_seqs).
    enforce_eager: bool = False
    cuda_graph_sizes: list[int] | None = None
    # vLLM's --async-scheduling: one step in flight. Each step is launched before the last one's
    # tokens reach the host (the next inputs take them on the device), so on a GPU the host's
    # planning, input preparation and output processing overlap the device's work. Steps wait for
    # the last tokens while a request with penalties or a grammar may run (they read every token).
    # Off by default, as in vLLM. On a CPU nothing overlaps (the model runs on the host): tokens
    # only reach clients a step later.
    async_scheduling: bool = False
    load_format: str = "auto"  # LOAD_FORMATS: auto = the checkpoint's files; dummy = random weights from config.json

    @property
    def ranks_per_node(self) -> int:
        return self.tensor_parallel_size // self.nnodes

    def background_policy(self):
        from pagedserve.engine.background import BackgroundPolicy

        if self.background_priority is None:
            return None
        return BackgroundPolicy(self.background_priority, self.background_share,
                                prefill_tokens=self.background_prefill_tokens)

    def __post_init__(self) -> None:
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be a power of two in [1, 128], got {self.block_size}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.ttft_target_ms is not None and self.ttft_target_ms < 0:
            raise ValueError(f"ttft_target_ms must be >= 0 (or None: off), got {self.ttft_target_ms}")
        self.background_policy()  # its checks, now
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}")
        self.resolve_cuda_graph_sizes()  # its checks, now
        if self.nnodes < 1 or self.tensor_parallel_size % self.nnodes:
            raise ValueError(f"--nnodes {self.nnodes} must divide --tensor-parallel-size {self.tensor_parallel_size} "
                             "(the same number of ranks on every node)")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in [0, {self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1 and (not self.master_addr or not self.master_port):
            raise ValueError("--nnodes > 1 needs --master-addr and --master-port: node 0's address, reachable "
                             "from every node")
        if self.dtype != "auto" and self.dtype not in DTYPES:  # bad names fail here, before the model loads
            raise ValueError(f"dtype must be one of {sorted(DTYPES) + ['auto']}, got {self.dtype!r}")
        self._check_kv_cache_dtype()
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {list(QUANTIZATION_METHODS)} (or left out: detected "
                             f"from the checkpoint), got {self.quantization!r}")
        if self.activation_dtype not in ACTIVATION_DTYPES:
            raise ValueError(f"activation_dtype must be one of {list(ACTIVATION_DTYPES)}, got {self.activation_dtype!r}")
        if self.activation_dtype == "int8" and self.tensor_parallel_size > 1:  # before any rank starts
            raise ValueError("--activation-dtype int8 does not run under tensor parallelism yet: use one of the two")
        if self.structured_outputs_backend not in STRUCTURED_OUTPUTS_BACKENDS:
            raise ValueError(f"structured_outputs_backend must be one of {list(STRUCTURED_OUTPUTS_BACKENDS)}, "
                             f"got {self.structured_outputs_backend!r}")

    def resolve_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu")
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        return dev

    def resolve_cuda_graph_sizes(self) -> list[int]:
        """The decode batch sizes captured as CUDA graphs, as vLLM reads --cuda-graph-sizes: none ->
        [1, 2, 4] + multiples of 8 up to max_num_seqs (at most 512); one value N -> the same pattern
        up to N; several -> exactly those. Sizes above max_num_seqs are dropped (no decode step is
        larger)."""
        given = self.cuda_graph_sizes
        if given is not None and (not given or min(given) < 1):
            raise ValueError(f"--cuda-graph-sizes must be positive batch sizes, got {given}")
        if given is None or len(given) == 1:
            top = min(self.max_num_seqs, 512) if given is None else given[0]
            given = [s for s in (1, 2, 4) if s <= top] + list(range(8, top + 1, 8))
        return sorted({s for s in given if s <= self.max_num_seqs})

    def resolve_max_num_batched_tokens(self, device: torch.device) -> int:
        return self.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS["cuda" if device.type == "cuda" else "cpu"]

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        import torch

        if self.dtype == "auto":
            if device.type == "cuda":
                return torch.bfloat16
            # CPU: bf16 only where the CPU multiplies it natively (AVX512_BF16: ~2x float32's
            # GEMM rate); emulated, bf16 is far slower than float32.
            from pagedserve.model import cpu_kernels

            return torch.bfloat16 if cpu_kernels.bf16_gemm() is not None else torch.float32
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES) + ['auto']}, got {self.dtype!r}")
        return torch_dtype(self.dtype)

    def resolve_kv_cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV cache's element type. 16-bit K/V under float32 weights halves the cache (twice
        the tokens in the same memory) and the bytes decode attention reads each step; fp8_e5m2
        quarters them, at 2 mantissa bits per value; int8 and fp8 (e4m3) about quarter them too,
        with a scale per row (kv_cache_scaled)."""
        self._check_kv_cache_dtype()
        return model_dtype if self.kv_cache_dtype == "auto" else torch_dtype(self.kv_cache_dtype)

    def resolve_quantization(self, detected: str | None) -> str | None:
        """The checkpoint's quantization method (`detected`: its config.json quantization_config,
        or "gguf") checked against --quantization, at startup: a flag naming another method is an
        error, and so is a method pagedserve does not know, by name."""
        if self.quantization is not None and self.quantization != detected:
            raise ValueError(f"--quantization {self.quantization} was given, but the checkpoint is "
                             + (f"quantized with {detected!r}" if detected else "not quantized")
                             + ": leave the flag out (the method is read from the checkpoint)")
        if detected is None or detected in LOADABLE_QUANTIZATION:
            return detected
        raise ValueError(f"the checkpoint is quantized with {detected!r} (config.json quantization_config."
                         f"quant_method), a method pagedserve does not know (known: {list(QUANTIZATION_METHODS)}); "
                         "serve the model's float16/bfloat16 original, or a GGUF of it")

    @property
    def kv_cache_scaled(self) -> bool:
        """Whether the KV cache keeps a scale per (token, kv head) row (int8, fp8 / fp8_e4m3)."""
        return self.kv_cache_dtype in SCALED_KV_DTYPES

    def _check_kv_cache_dtype(self) -> None:
        if self.kv_cache_dtype == "auto" or self.kv_cache_dtype in KV_ONLY_DTYPES:
            return
        if self.kv_cache_dtype not in DTYPES:
            names = sorted(DTYPES) + sorted(KV_ONLY_DTYPES) + ["auto"]
            raise ValueError(f"kv_cache_dtype must be one of {names}, got {self.kv_cache_dtype!r}")
