"""What the planner computes with: a model's shape and a device's figures.

ModelSpec is read from a config.json (dense or MoE; GQA; tied embeddings). HardwareSpec comes
from the catalog (hardware.yaml, vendor datasheets) or from measuring this machine.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pagedserve.config import KV_SCALE_BYTES, SCALED_KV_DTYPES
from pagedserve.model.arch import moe_fields

HERE = Path(__file__).parent


def read_yaml(path: Path):
    """A YAML file's data, parsed once per version of the file (a sweep of plans parsed the
    catalogs hundreds of times: pure-Python YAML was 80% of its time). A copy: callers may change it."""
    st = path.stat()
    return copy.deepcopy(_parsed_yaml(str(path), st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=16)
def _parsed_yaml(path: str, mtime_ns: int, size: int):
    return yaml.safe_load(Path(path).read_text())

# Bits per weight of the decoder's linear layers. Embeddings and the output head stay 16-bit
# (fp32 for fp32 models), as vLLM's fp8/int8/AWQ/GPTQ checkpoints keep them. int4 = 4 bits plus a
# 16-bit scale and 16-bit zero point per group of 128 weights.
WEIGHT_BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "int8": 8, "awq": 4.25, "gptq": 4.25, "int4": 4.25}
KV_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}


@dataclass
class ModelSpec:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    experts: int = 0  # 0: dense
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0  # an always-on shared expert's width (Qwen2-MoE; DeepSeek: n_shared x width)

    @classmethod
    def from_config(cls, cfg: dict, name: str = "model") -> "ModelSpec":
        need = ["num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size"]
        missing = [k for k in need if k not in cfg]
        if "intermediate_size" not in cfg and "moe_intermediate_size" not in cfg:
            missing.append("intermediate_size")
        if missing:
            raise ValueError(f"config for {name!r} lacks {missing}: the planner needs a transformer decoder's "
                             "config.json (num_hidden_layers, hidden_size, num_attention_heads, "
                             "intermediate_size, vocab_size)")
        heads = cfg["num_attention_heads"]
        moe = moe_fields(cfg)  # the engine's own reading of the expert counts
        return cls(
            name=name, layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"], heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate=cfg.get("intermediate_size") or cfg["moe_intermediate_size"], vocab=cfg["vocab_size"],
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)), experts=moe.num_experts,
            experts_per_token=moe.num_experts_per_tok, expert_intermediate=moe.expert_intermediate_size,
            shared_intermediate=moe.shared_expert_intermediate_size,
        )

    # -- parameter counts ------------------------------------------------------------------
    @property
    def attn_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.hidden * (q + 2 * kv) + q * self.hidden

    def mlp_params(self, active: bool) -> int:
        if not self.experts:
            return 3 * self.hidden * self.intermediate
        per_expert = 3 * self.hidden * self.expert_intermediate
        n = self.experts_per_token if active else self.experts
        shared = 3 * self.hidden * self.shared_intermediate + (self.hidden if self.shared_intermediate else 0)
        return n * per_expert + shared + self.hidden * self.experts  # + router (+ the shared expert's gate)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def layer_params(self) -> int:  # all experts
        return self.layers * (self.attn_params + self.mlp_params(False) + 2 * self.hidden)

    @property
    def total_params(self) -> int:
        return self.layer_params + self.embedding_params + self.hidden

    @property
    def active_params(self) -> int:
        """Parameters one token multiplies through (the output head counted once)."""
        return self.layers * (self.attn_params + self.mlp_params(True)) + self.vocab * self.hidden

    def weight_bytes(self, dtype: str) -> float:
        bits = WEIGHT_BITS[dtype]
        emb_bytes = 4 if dtype == "fp32" else 2
        return self.layer_params * bits / 8 + (self.embedding_params + self.hidden) * emb_bytes

    def kv_bytes_per_token(self, kv_dtype: str) -> int:
        """As the engine allocates it (model/arch.py): int8 and fp8 keep a float32 scale per kv head row."""
        scale = KV_SCALE_BYTES if kv_dtype in SCALED_KV_DTYPES else 0
        return 2 * self.layers * self.kv_heads * (self.head_dim * KV_BYTES[kv_dtype] + scale)


def load_model_spec(model: str) -> ModelSpec:
    """A config.json path, a known model name (known_models.yaml), a model folder, a GGUF or a hub id."""
    known = read_yaml(HERE / "known_models.yaml")
    if model in known:
        return ModelSpec.from_config(known[model], model)
    p = Path(model).expanduser()
    if p.is_file() and p.suffix == ".json":
        return ModelSpec.from_config(json.loads(p.read_text()), p.parent.name or model)
    if p.is_dir() and (p / "config.json").exists():
        return ModelSpec.from_config(json.loads((p / "config.json").read_text()), p.name)
    if p.is_file() and p.suffix == ".gguf":
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name).to_dict()
        return ModelSpec.from_config(cfg, p.stem)
    if model in ("default", "SmolLM2-135M-Instruct"):
        from pagedserve.model.loader import resolve_model

        folder = resolve_model(None)
        return ModelSpec.from_config(json.loads((folder / "config.json").read_text()), "SmolLM2-135M-Instruct")
    from pagedserve.model.loader import resolve_model

    try:
        folder = resolve_model(model)
    except FileNotFoundError as e:
        raise ValueError(f"{e} Known model names: {sorted(known)}; or pass a config.json path.") from None
    return ModelSpec.from_config(json.loads((folder / "config.json").read_text()), model)


@dataclass
class HardwareSpec:
    name: str
    memory_gb: float
    bandwidth_gbs: float
    fp32_tflops: float
    bf16_tflops: float
    fp8_tflops: float | None
    int8_tops: float | None
    usd_per_hour: float
    interconnect_gbs: float | None = None  # GPU-to-GPU, both directions together (NVLink, PCIe); None: unknown
    source: str = ""
    # What the device itself reports (nvidia-smi's total, in MiB), with where that figure was seen:
    # more than the datasheet's decimal GB (an "80 GB" H100 reports 81,559 MiB = 85.5e9 bytes).
    memory_mib: float | None = None
    memory_source: str = ""
    # Fractions of the datasheet peaks a tuned engine reaches (measured hardware: 1.0).
    compute_efficiency: float = 0.6
    bandwidth_efficiency: float = 0.8
    step_overhead_s: float = 0.003  # scheduling, sampling, launches per decode step
    allreduce_latency_s: float = 10e-6  # per all-reduce, on top of its bytes (NCCL's small-message latency)
    measured: dict = field(default_factory=dict)

    @property
    def memory_bytes(self) -> float:
        """Device memory in bytes: as the device reports it where the catalog has that figure, else
        the datasheet's decimal GB (the smaller, safe side)."""
        return self.memory_mib * 2**20 if self.memory_mib else self.memory_gb * 1e9

    def allreduce_s(self, nbytes: float, tp: int) -> float:
        """One ring all-reduce of nbytes over tp GPUs: each GPU sends and receives 2 (tp - 1) / tp x
        nbytes, over half the quoted (two-way) interconnect bandwidth. 0 for one GPU; PCIe Gen4's
        64 GB/s where the link is unknown."""
        if tp <= 1:
            return 0.0
        one_way = (self.interconnect_gbs or 64) / 2 * 1e9
        return self.allreduce_latency_s + 2 * (tp - 1) / tp * nbytes / one_way

    def peak_flops(self, weight_dtype: str) -> float:
        """FLOP/s the matmuls run at for this weight format (weight-only int4 computes in bf16;
        fp8 without fp8 tensor cores falls back to bf16 compute)."""
        if weight_dtype == "fp32":
            return self.fp32_tflops * 1e12
        if weight_dtype == "fp8" and self.fp8_tflops:
            return self.fp8_tflops * 1e12
        if weight_dtype == "int8" and self.int8_tops:
            return self.int8_tops * 1e12
        return self.bf16_tflops * 1e12

    @property
    def ops_per_byte(self) -> float:
        return self.bf16_tflops * 1e12 / (self.bandwidth_gbs * 1e9)


def load_catalog(path: Path | None = None) -> dict[str, HardwareSpec]:
    data = read_yaml(path or HERE / "hardware.yaml")
    return {name: HardwareSpec(name=name, **fields) for name, fields in data.items()}


def get_hardware(name: str, catalog: dict[str, HardwareSpec] | None = None) -> HardwareSpec:
    catalog = catalog or load_catalog()
    by_lower = {k.lower(): v for k, v in catalog.items()}
    hw = by_lower.get(name.lower())
    if hw is None:
        raise ValueError(f"unknown hardware {name!r}; known: {', '.join(catalog)}. Or describe it: "
                         "--hw-custom memory_gb=24,bandwidth_gbs=600,bf16_tflops=125,usd_per_hour=1")
    return hw


CUSTOM_HW_KEYS = ("memory_gb", "memory_mib", "bandwidth_gbs", "bf16_tflops", "fp32_tflops", "fp8_tflops", "int8_tops",
                  "usd_per_hour", "interconnect_gbs")


def custom_hardware(spec: str) -> HardwareSpec:
    fields_ = {}
    for part in spec.split(","):
        if "=" not in part:
            raise ValueError(f"--hw-custom takes key=value pairs separated by commas, got {part[:80]!r}")
        k, v = (x.strip() for x in part.split("=", 1))
        if k not in CUSTOM_HW_KEYS:  # a typo would otherwise be dropped silently
            raise ValueError(f"--hw-custom: unknown key {k[:40]!r}; known: {', '.join(CUSTOM_HW_KEYS)}")
        try:
            fields_[k] = float(v)
        except ValueError:
            raise ValueError(f"--hw-custom {k} must be a number, got {v[:40]!r}") from None
    need = ("bandwidth_gbs", "bf16_tflops")
    missing = [k for k in need if k not in fields_] + (
        [] if "memory_gb" in fields_ or "memory_mib" in fields_ else ["memory_gb (or memory_mib)"])
    if missing:
        raise ValueError(f"--hw-custom needs {missing}")
    for k, v in fields_.items():
        if not (math.isfinite(v) and (v > 0 or k == "usd_per_hour" and v == 0)):
            raise ValueError(f"--hw-custom {k} must be a finite number > 0, got {v}")
    mib = fields_.get("memory_mib")
    return HardwareSpec(name="custom", memory_gb=fields_.get("memory_gb", (mib or 0) * 2**20 / 1e9),
                        memory_mib=mib, memory_source="user figures" if mib else "",
                        bandwidth_gbs=fields_["bandwidth_gbs"],
                        fp32_tflops=fields_.get("fp32_tflops", fields_["bf16_tflops"] / 8),
                        bf16_tflops=fields_["bf16_tflops"], fp8_tflops=fields_.get("fp8_tflops"),
                        int8_tops=fields_.get("int8_tops"), usd_per_hour=fields_.get("usd_per_hour", 0.0),
                        interconnect_gbs=fields_.get("interconnect_gbs"),
                        source="user figures")


def linear_shapes(model: "ModelSpec") -> list[tuple[int, int]]:
    """(out, in) of one decoder layer's fused projections, as our engine runs them."""
    q, kv = model.heads * model.head_dim, model.kv_heads * model.head_dim
    inter = model.expert_intermediate * model.experts_per_token if model.experts else model.intermediate
    return [(q + 2 * kv, model.hidden), (model.hidden, q), (2 * inter, model.hidden), (model.hidden, inter)]


def _best_time(fn, reps: int, cuda: bool) -> float:
    """Best of three timed rounds of `reps` calls (noise on a shared machine only adds time)."""
    import torch

    fn()
    best = float("inf")
    for _ in range(3):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / reps)
    return best


class MachineProbe:
    """Times the engine's own building blocks on this device at any batch size M:
    - the linear layers with the model's shapes, as seconds per weight byte: the packed-weight C++
      GEMM on CPU when it is built (what the engine runs), BLAS otherwise. Real BLAS libraries are
      far from the roofline at small M, so the planner uses this curve for the weight part of a
      decode step instead of max(F/peak, B/bw);
    - one decoder layer's elementwise work (two residual-add + RMSNorms, rotary on q and k, SiLU
      times up, the KV-cache write), with the engine's fused C++ kernels when built: timing plain
      PyTorch ops instead put a batch-128 step's elementwise cost at ~5x what the engine spends.
    The weights stay below `budget_bytes` (whole layers, at least two) plus the output head."""

    def __init__(self, model: "ModelSpec | None" = None, budget_bytes: int = 1 << 30, gemv_shape=(8192, 1024)):
        import torch

        self.model = model
        self.cuda = torch.cuda.is_available()
        self.dev = "cuda" if self.cuda else "cpu"
        # the engine's default compute type on the device: bf16 on CUDA (fp32 there would time the
        # GPU's far slower fp32 GEMMs), float32 on CPU
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        size = torch.empty((), dtype=self.dtype).element_size()
        shapes = linear_shapes(model) if model is not None else [gemv_shape]
        per_layer = sum(o * i for o, i in shapes) * size
        n_layers = max(2, min(model.layers if model is not None else 8, budget_bytes // per_layer))
        self.layers = [[torch.randn(o, i, device=self.dev, dtype=self.dtype) for o, i in shapes]
                       for _ in range(n_layers)]
        self.head = (torch.randn(model.vocab, model.hidden, device=self.dev, dtype=self.dtype)
                     if model is not None else None)
        self.total_bytes = n_layers * per_layer + (self.head.numel() * size if self.head is not None else 0)
        self.kernels = None
        if not self.cuda:
            from pagedserve.model import cpu_kernels

            self.kernels = cpu_kernels.load()
            packed = cpu_kernels.packed_linear()
            if packed is not None:
                pack = lambda w: packed.pack_linear_weight(w) if w.shape[0] % 16 == 0 else w  # noqa: E731
                self.layers = [[pack(w) for w in layer] for layer in self.layers]
                self.head = pack(self.head) if self.head is not None else None
        self.in_sizes = {s[1] for s in shapes} | ({self.head.shape[1]} if self.head is not None else set())
        self._blas_linear = torch.nn.functional.linear

    def _lin(self, x, w):  # [N/16, K, 16] packed or [N, K]: shape[1] is the input size in both
        return self.kernels.packed_linear(x, w) if w.dim() == 3 else self._blas_linear(x, w)

    def linear_s_per_byte(self, m_rows: int) -> float:
        import torch

        xs = {i: torch.randn(m_rows, i, device=self.dev, dtype=self.dtype) for i in self.in_sizes}

        def forward():
            for layer in self.layers:
                for w in layer:
                    self._lin(xs[w.shape[1]], w)
            if self.head is not None:
                self._lin(xs[self.head.shape[1]], self.head)

        return _best_time(forward, 1 if m_rows >= 128 else 2, self.cuda) / self.total_bytes

    def layer_elementwise_s(self, m_rows: int) -> float:
        return _best_time(self._elementwise_step(m_rows), 20, self.cuda)

    def layer_host_s(self) -> float:
        """A decoder layer of the engine's own model code (model/llama.py, its attention backend
        and kernels, and on CPU its C++ layer loop) for a single token at miniature widths: the
        time left is what every layer of every step costs the host whatever the batch (kernel
        calls, allocations, and without the C++ loop Python and module calls). Left out of the
        planner, it made batch-1 steps ~30% faster than the engine's. Measured on a 4-layer
        miniature model, per layer (its embedding and final norm included)."""
        import torch

        from pagedserve.model.arch import ModelArch
        from pagedserve.model.attention import AttentionMetadata, get_attention_backend
        from pagedserve.model.llama import LlamaForCausalLM, use_cpu_kernels

        m, dev, d, bs, layers = self.model, torch.device(self.dev), 16, 16, 4
        dtype = torch.bfloat16 if self.cuda else torch.float32
        arch = ModelArch(architecture="LlamaForCausalLM", vocab_size=16, hidden_size=m.heads * d, intermediate_size=32,
                         num_layers=layers, num_heads=m.heads, num_kv_heads=m.kv_heads, head_dim=d, rms_norm_eps=1e-6,
                         rope_theta=10000.0, rope_scaling=None, max_position_embeddings=64, tie_word_embeddings=False,
                         attention_bias=False, sliding_window=None, bos_token_id=None, eos_token_ids=[])
        backend = get_attention_backend(dev, dtype)
        model = LlamaForCausalLM(arch, backend, 64)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        model = model.to(dev, dtype)
        model.rotary = model.rotary.to(dev)  # its tables stay float32
        if self.kernels is not None and backend.name == "cpp":
            from pagedserve.model import cpu_kernels

            use_cpu_kernels(model, self.kernels, pack=cpu_kernels.packed_linear() is not None)
        cache = torch.zeros(layers, 2, 1, m.kv_heads, bs, d, device=dev, dtype=dtype)
        one = lambda v: torch.tensor([v], device=dev)  # noqa: E731
        meta = AttentionMetadata(slot_blocks=one(0), slot_offsets=one(5), num_decodes=1,
                                 decode_block_tables=one(0).view(1, 1), decode_context_lens=one(6), decode_max_context=6,
                                 prefills=[], block_size=bs)
        ids, pos = one(3), one(5)
        return _best_time(lambda: model(ids, pos, cache, meta, one(0)), 100, self.cuda) / layers

    def _elementwise_step(self, m_rows: int):
        import torch

        m, dev, dt = self.model, self.dev, self.dtype
        h, d = m.hidden, m.head_dim
        x, res = torch.randn(m_rows, h, device=dev, dtype=dt), torch.randn(m_rows, h, device=dev, dtype=dt)
        w = torch.ones(h, device=dev, dtype=dt)
        q = torch.randn(m_rows, m.heads, d, device=dev, dtype=dt)
        k, v = (torch.randn(m_rows, m.kv_heads, d, device=dev, dtype=dt),
                torch.randn(m_rows, m.kv_heads, d, device=dev, dtype=dt))
        gu = torch.randn(m_rows, 2 * (m.expert_intermediate or m.intermediate), device=dev, dtype=dt)
        pos = torch.arange(m_rows, device=dev)
        cos, sin = torch.randn(m_rows, d, device=dev), torch.randn(m_rows, d, device=dev)
        bs = 16
        cache = torch.zeros(2, -(-m_rows // bs), m.kv_heads, bs, d, device=dev, dtype=dt)
        slots = torch.arange(m_rows, device=dev)
        ops = self.kernels
        if ops is not None:  # what the engine's layer runs on CPU (model/llama.py, model/attention.py)
            blocks, offsets = slots // bs, slots % bs

            def step():
                ops.add_rms_norm(x, res, w, 1e-6)
                ops.rotary_embedding(q, k, pos, cos, sin)
                ops.write_kv(k, v, cache[0], cache[1], blocks, offsets)
                ops.add_rms_norm(x, res, w, 1e-6)
                ops.silu_and_mul(gu)

            return step

        def step():  # the PyTorch path of the same layer
            for _ in range(2):
                y = x + res
                y.float() * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * w
            half = d // 2
            for t in (q, k):
                t * cos[:, None] + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * sin[:, None]
            cache[0].view(-1, m.kv_heads, d).index_copy_(0, slots, k)
            cache[1].view(-1, m.kv_heads, d).index_copy_(0, slots, v)
            g, u = gu.chunk(2, dim=-1)
            torch.nn.functional.silu(g) * u

        return step


LINEAR_CURVE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def measure_this_machine(model: "ModelSpec | None" = None, budget_bytes: int = 1 << 30) -> HardwareSpec:
    """Measure the local device: fp32 (CPU) or bf16 (CUDA) matmul rate, the bandwidth at which
    weights stream through a matrix-vector product (what decode at batch 1 does), and, through
    MachineProbe, the engine's linear layers and elementwise work at each batch size. With
    `model`, the layers have the model's own shapes (a CPU's GEMV speed depends on them); weights
    stay below `budget_bytes`."""
    import psutil
    import torch

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dt_mm = torch.bfloat16 if cuda else torch.float32
    n = 4096 if cuda else 1536
    a, b = torch.randn(n, n, device=dev, dtype=dt_mm), torch.randn(n, n, device=dev, dtype=dt_mm)
    mm = 2 * n**3 / _best_time(lambda: a @ b, 20 if cuda else 8, cuda)
    # Weight streaming: a matrix-vector product over matrices larger than the caches, cycled.
    rows, cols, copies = 8192, 1024, 8
    ws = [torch.randn(rows, cols, device=dev) for _ in range(copies)]
    x = torch.randn(1, cols, device=dev)
    it = iter(range(10**9))
    gemv_t = _best_time(lambda: torch.nn.functional.linear(x, ws[next(it) % copies]), 40, cuda)
    bw = rows * cols * 4 / gemv_t
    del ws

    probe = MachineProbe(model, budget_bytes, (rows, cols))
    curve, other = [], []
    for m_rows in LINEAR_CURVE_BATCHES:
        curve.append((m_rows, probe.linear_s_per_byte(m_rows)))
        if model is not None:
            other.append((m_rows, probe.layer_elementwise_s(m_rows)))
    host = probe.layer_host_s() if model is not None else None
    del probe
    # Dispatch cost of one small op: a decode step issues ~45 per layer regardless of batch.
    tiny = torch.randn(64, device=dev)
    op_s = _best_time(lambda: tiny.add(1.0), 2000, cuda)
    mem_bytes = torch.cuda.get_device_properties(0).total_memory if cuda else psutil.virtual_memory().total
    mem = mem_bytes / 1e9
    name = torch.cuda.get_device_name(0) if cuda else f"this machine (CPU, {torch.get_num_threads()} threads)"
    tf = mm / 1e12
    return HardwareSpec(
        name=name, memory_gb=mem, bandwidth_gbs=bw / 1e9, fp32_tflops=tf if not cuda else tf / 16,
        bf16_tflops=tf, fp8_tflops=None, int8_tops=None, usd_per_hour=0.0, source="measured by pagedserve plan --measure",
        memory_mib=mem_bytes / 2**20, memory_source="reported by the device (torch)" if cuda else "this machine's RAM",
        compute_efficiency=1.0, bandwidth_efficiency=1.0, step_overhead_s=0.0,
        measured={"matmul_tflops": tf, "weight_stream_gbs": bw / 1e9, "matmul_n": n, "linear_curve": curve,
                  "op_dispatch_s": op_s, "layer_elementwise_curve": other,
                  **({"layer_host_s": host} if host is not None else {}),
                  **({"kv_read_gbs": _kv_read_gbs(model, dev)}
                     if model is not None else {})},
    )


def _kv_read_gbs(model: "ModelSpec", dev: str) -> float:
    """How fast decode attention reads a paged KV cache here: the engine's own attention backend
    over scattered 16-token blocks (block reads are not a stream, so this is below the streaming
    bandwidth)."""
    import torch

    from pagedserve.model.attention import AttentionMetadata, get_attention_backend

    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    backend = get_attention_backend(torch.device(dev), dtype)
    bs, ctx, batch, sets = 16, 256, 64, 8
    nblocks = batch * ctx // bs
    # Blocks scattered over a region far larger than any cache (a real KV cache spans GBs), written
    # so every page is real (never-written pages all read the one shared zero page), and calls
    # cycle through `sets` disjoint block sets: repeating one set (25 MB here) read partly from L3
    # and measured 22-27 GB/s where the engine reads ~18.
    block_bytes = 2 * model.kv_heads * bs * model.head_dim * (4 if dtype == torch.float32 else 2)
    pool = max(nblocks * sets, (512 << 20) // block_bytes)
    kv = torch.empty(2, pool, model.kv_heads, bs, model.head_dim, device=dev, dtype=dtype).fill_(0.01)
    perm = torch.randperm(pool, device=dev)
    q = torch.randn(batch, model.heads, model.head_dim, device=dev, dtype=dtype)
    lens = torch.full((batch,), ctx, device=dev, dtype=torch.long)
    metas = [AttentionMetadata(slot_blocks=None, slot_offsets=None, num_decodes=batch,
                               decode_block_tables=blocks.view(batch, ctx // bs).contiguous(), decode_context_lens=lens,
                               decode_max_context=ctx, prefills=[], block_size=bs)
             for blocks in perm[: sets * nblocks].split(nblocks)]
    it = iter(range(10**9))
    t = _best_time(lambda: backend._decode(q, kv[0], kv[1], metas[next(it) % sets], model.head_dim**-0.5), 2 * sets,
                   dev == "cuda")
    return batch * ctx * 2 * model.kv_heads * model.head_dim * kv.element_size() / t / 1e9
