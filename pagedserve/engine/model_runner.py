"""Runs one scheduled step on the model: flatten inputs, forward, sample.

Owns the model weights and the KV cache tensor. The KV budget is decided once here, at start.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
import psutil
import torch

from pagedserve.config import CPU_DEFAULT_KV_CACHE_BYTES, KV_SCALE_BYTES, RUNTIME_RESERVE_FRACTION, EngineConfig
from pagedserve.distributed.parallel import init_tensor_parallel, tp
from pagedserve.distributed.shard import local_arch, shard_weights
from pagedserve.engine.cuda_graphs import DecodeGraphs, graphs_unsupported
from pagedserve.engine.cpu_memory import keep_freed_memory, lazily_zeroed_cpu_tensor, populate
from pagedserve.engine.kv_cache import KVCacheManager
from pagedserve.engine.request import Request
from pagedserve.engine.scheduler import SchedulerOutput
from pagedserve.engine.structured_output import StructuredOutputManager
from pagedserve.model.arch import ModelArch
from pagedserve.model import cpu_kernels
from pagedserve.model.attention import AttentionMetadata, PrefillChunk, ScaledKV, get_attention_backend
from pagedserve.model.llama import LlamaForCausalLM, build_for_checkpoint, dequantize_unpacked, use_cpu_kernels
from pagedserve.model.sampler import PendingSample, Sampler, to_device, top_logprobs

log = logging.getLogger("pagedserve.runner")


@dataclass
class StepResult:
    sampled: dict[str, int]  # request id -> new token (only requests that finished their tokens)
    logprobs: dict[str, tuple]  # request id -> sampler logprob tuple
    prompt_logprobs: dict[str, list]  # request id -> list of (token, logprob tuple) for this chunk


@dataclass
class PendingStep:
    """A step launched on the device: `result()` waits for its sampled tokens on the host. Until
    then the host is free to plan and prepare the next step (--async-scheduling)."""

    sample_reqs: list[Request]  # the requests that sample a token in this step, in row order
    sample: PendingSample | None
    prompt_logprobs: dict[str, list]

    def result(self) -> StepResult:
        res = StepResult({}, {}, self.prompt_logprobs)
        if self.sample is not None:
            s = self.sample.host()
            for r, tok, lp in zip(self.sample_reqs, s.token_ids, s.logprobs):
                res.sampled[r.request_id] = tok
                if lp is not None:
                    res.logprobs[r.request_id] = lp
        return res


def kv_cache_bytes(cfg: EngineConfig, device: torch.device, weight_bytes: int, activation_bytes: int | None = None,
                   used_before: int = 0) -> int:
    """The KV budget: explicit bytes, else a fraction of device memory minus what else lives there.

    CUDA, profiled (activation_bytes given, vLLM's accounting): --gpu-memory-utilization of the
    device minus what torch holds now (weights, buffers), the largest step's activations, and the
    memory outside torch's allocator this process added since the runner started (library
    workspaces such as cuBLAS's; `used_before`, measured then, is other processes' and the CUDA
    context's). Unprofiled: minus weights and a fixed reserve."""
    if cfg.kv_cache_memory is not None:
        return cfg.kv_cache_memory
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        frac = cfg.gpu_memory_utilization or 0.9
        if activation_bytes is None:
            budget = int(total * frac) - weight_bytes - int(total * RUNTIME_RESERVE_FRACTION)
        else:
            free, _ = torch.cuda.mem_get_info(device)
            outside_torch = max(0, (total - free) - used_before - torch.cuda.memory_reserved(device))
            budget = int(total * frac) - torch.cuda.memory_allocated(device) - activation_bytes - outside_torch
    elif cfg.gpu_memory_utilization is not None:
        avail = psutil.virtual_memory().available
        budget = int(avail * cfg.gpu_memory_utilization) - int(avail * RUNTIME_RESERVE_FRACTION)
    else:
        budget = CPU_DEFAULT_KV_CACHE_BYTES
    if budget <= 0:
        raise ValueError(
            f"no memory left for the KV cache after {weight_bytes / 2**30:.2f} GiB of weights: "
            "raise --gpu-memory-utilization or set --kv-cache-memory"
        )
    return budget


class ModelRunner:
    def __init__(self, cfg: EngineConfig, arch: ModelArch, weights: dict[str, torch.Tensor] | None, max_model_len: int,
                 rank: int = 0, master: tuple[str, int] | None = None):
        self.cfg = cfg
        self.arch = arch
        self.device = cfg.resolve_device()
        # what the GPU held before this engine (other processes' share): not ours to count
        used_before = 0
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used_before = total - free
        # Tensor parallelism (distributed/): rank 0 (this engine) starts the other ranks, every
        # rank keeps its shard of the weights and of the KV cache.
        self.rank, self.tp_size, self.workers = rank, cfg.tensor_parallel_size, None
        if self.tp_size > 1:  # the shapes were checked by the engine before any weight loaded
            if self.device.type == "cuda":  # this node's GPU for this rank
                self.device = torch.device("cuda", rank % cfg.ranks_per_node)
                torch.cuda.set_device(self.device)
            if rank == 0:
                from pagedserve.distributed.workers import WorkerGroup, free_port

                master = (cfg.master_addr, cfg.master_port) if cfg.nnodes > 1 else ("127.0.0.1", free_port())
                self.workers = WorkerGroup(cfg, self.tp_size, *master)
            init_tensor_parallel(rank, self.tp_size, *master, "nccl" if self.device.type == "cuda" else "gloo")
            if weights is not None:  # None: --load-format dummy, each rank makes its own shard
                weights = shard_weights(weights, arch, rank, self.tp_size, cfg.enable_expert_parallel)
        self.model_arch = local_arch(arch, self.tp_size, rank, cfg.enable_expert_parallel)  # what this rank builds
        self.dtype = cfg.resolve_dtype(self.device)
        self.kv_dtype = cfg.resolve_kv_cache_dtype(self.dtype)
        # bfloat16 on a CPU with AVX512_BF16: the GEMMs run in bf16 (weights packed once, float32
        # accumulation), and so do attention's q.k and p.v on the bf16 KV cache (decode and
        # prefill); activations, norms and the softmax stay float32. Without the instruction (or
        # the kernels), bf16 runs through PyTorch.
        self.bf16_gemm = self.device.type == "cpu" and self.dtype == torch.bfloat16 and cpu_kernels.bf16_gemm() is not None
        if self.device.type == "cpu" and self.dtype == torch.bfloat16 and not self.bf16_gemm:
            log.warning("--dtype bfloat16 on a CPU without AVX512_BF16 (or without the x86-64-v4 kernels) runs "
                        "through PyTorch's emulated bf16, much slower than float32: use --dtype float32 (or auto)")
        compute = torch.float32 if self.bf16_gemm else self.dtype
        self.block_size = cfg.block_size
        self.max_model_len = max_model_len
        backend = get_attention_backend(self.device, compute, cfg.attention_backend, self.kv_dtype)
        if self.bf16_gemm and self.kv_dtype == torch.bfloat16 and backend.name == "cpp":
            backend.bf16_math = True
        with build_for_checkpoint(self.device, compute):
            model = LlamaForCausalLM(self.model_arch, backend, max_model_len, arch.vocab_size)
        if weights is None:  # --load-format dummy
            model.init_dummy_weights(cfg.seed + rank)
        else:
            model.load_weights(weights)
        model.rotary = model.rotary.to(self.device)  # tables are built on the CPU, in float32
        self.model = model.eval()
        kernels = cpu_kernels.load() if backend.name == "cpp" else None
        self.kernels = kernels
        self.int8_activation_rows = int8_rows = self._int8_activation_rows(cfg, kernels)
        if kernels is not None:  # the C++ CPU kernels built: fused elementwise ops, packed-weight GEMM
            use_cpu_kernels(self.model, kernels, pack=cpu_kernels.packed_linear() is not None,
                            weight_dtype=torch.bfloat16 if self.bf16_gemm else torch.float32,
                            int8_activation_rows=int8_rows)
        if int8_rows and not any(getattr(m, "quant_int8_rows", 0) for m in self.model.modules()):
            if cfg.activation_dtype == "auto":  # nothing took it (no quantized weight packed): float it is
                self.int8_activation_rows = 0
            else:
                raise ValueError("--activation-dtype int8 multiplies quantized weights kept quantized (a GGUF, AWQ, "
                                 "GPTQ or compressed-tensors int4/int8 checkpoint, tensor parallel size 1), and this "
                                 "model has none: leave it at auto or float")
        expanded = dequantize_unpacked(self.model, compute)
        if expanded:
            log.warning("%d quantized weights run dequantized to %s: %s", len(expanded), str(compute).removeprefix("torch."),
                        "; ".join(expanded[:4]) + (" ..." if len(expanded) > 4 else ""))
        if self.device.type != "cpu":
            self.model.to(self.device)
        self.quantized_weights = {id(m.quant): m.quant for m in model.modules() if getattr(m, "quant", None) is not None}
        self.weight_bytes = (sum(p.numel() * p.element_size() for p in model.parameters())
                             + sum(w.nbytes() for w in self.quantized_weights.values()))
        self.sampler = Sampler(arch.vocab_size, argmax=kernels.argmax_rows if kernels is not None else None)

        per_token = self.model_arch.kv_bytes_per_token(torch.empty((), dtype=self.kv_dtype).element_size(),
                                                       KV_SCALE_BYTES if cfg.kv_cache_scaled else 0)
        self.max_num_batched_tokens = cfg.resolve_max_num_batched_tokens(self.device)
        graph_sizes, why_eager = [], "enforce_eager"
        if self.device.type == "cuda" and not cfg.enforce_eager:
            why_eager = graphs_unsupported(self.model, backend.name, self.tp_size)
            graph_sizes = [] if why_eager else cfg.resolve_cuda_graph_sizes()
        # CUDA, one rank: the largest step's activations measured, not guessed (vLLM's profile run);
        # the graphs' own pool is about a decode step at their largest size (activations scale with
        # the tokens of a step).
        self.profiled_activation_bytes = activation_bytes = None
        if self.device.type == "cuda" and cfg.kv_cache_memory is None and self.tp_size == 1:
            self.profiled_activation_bytes = self._profile_activations()
            tokens = self.max_num_batched_tokens
            activation_bytes = self.profiled_activation_bytes * (1 + max(graph_sizes, default=0) / tokens)
        budget = kv_cache_bytes(cfg, self.device, self.weight_bytes,
                                None if activation_bytes is None else int(activation_bytes), used_before)
        self.num_blocks = tp().min_int(budget // (per_token * self.block_size))  # every rank the same count
        blocks_per_seq = -(-max_model_len // self.block_size)
        if self.num_blocks < blocks_per_seq:
            raise ValueError(
                f"the KV cache holds {self.num_blocks * self.block_size} tokens "
                f"({budget / 2**20:.0f} MiB), fewer than one sequence of max_model_len={max_model_len}: "
                "lower --max-model-len, or raise --kv-cache-memory / --gpu-memory-utilization"
            )
        shape = (arch.num_layers, 2, self.num_blocks, self.model_arch.num_kv_heads, self.block_size, arch.head_dim)
        # Zeroed: padded attention reads must see finite numbers (0 * NaN would poison outputs).
        def zeros(shape, dtype):
            if self.device.type == "cpu":
                return lazily_zeroed_cpu_tensor(shape, dtype)
            return torch.zeros(shape, dtype=dtype, device=self.device)

        if self.device.type == "cpu":
            keep_freed_memory()
        self.kv_caches = zeros(shape, self.kv_dtype)
        self.kv_bytes = self.kv_caches.numel() * self.kv_caches.element_size()
        if cfg.kv_cache_scaled:  # int8 / fp8: a float32 scale per (token, kv head) row beside the values
            self.kv_caches = ScaledKV(self.kv_caches, zeros(shape[:-1], torch.float32))
            self.kv_bytes += self.kv_caches.scales.numel() * 4
        self._populating: threading.Thread | None = None
        self.max_concurrency = self.num_blocks / blocks_per_seq
        self.graphs: DecodeGraphs | None = None
        self._last_tokens: torch.Tensor | None = None  # the last launch's samples, on the device
        self._last_reqs: list[Request] = []  # the requests of its rows, in order
        if graph_sizes:
            self.use_decode_graphs(graph_sizes)
            log.info("decode steps of up to %d requests replay CUDA graphs: %d batch sizes captured in %.1fs",
                     graph_sizes[-1], len(graph_sizes), self.graphs.capture_seconds)
        elif self.device.type == "cuda":
            log.info("decode steps run eagerly (no CUDA graphs): %s", why_eager)

    def use_decode_graphs(self, sizes: list[int], capture: bool = True) -> DecodeGraphs:
        """Pure decode steps of up to max(sizes) requests go through cuda_graphs.py from now on:
        captured graphs, or with capture=False (no GPU: tests, gpu_session's dry run) the same static
        buffers and padding run eagerly."""
        self.graphs = DecodeGraphs(self.model, self.kv_caches, sizes, self.max_model_len, self.block_size, self.device,
                                   capture)
        return self.graphs

    def _int8_activation_rows(self, cfg, kernels) -> int:
        """quant_linear's int8_rows for --activation-dtype: 0 (float), or 1 (int8: every batch); a CPU
        or build that cannot is refused here, at start, by name. auto (config.ACTIVATION_DTYPES): int8
        where every quantized weight came from a GGUF and it can run, else float."""
        can = self.device.type == "cpu" and kernels is not None and kernels.quant_linear_vnni_supported()
        if cfg.activation_dtype == "float":
            return 0
        if cfg.activation_dtype == "auto":
            sources = {m.quant.source for m in self.model.modules() if getattr(m, "quant", None) is not None}
            gguf = bool(sources) and all(part.startswith("gguf") for s in sources for part in s.split("+"))  # fused: "a+b"
            return int(can and gguf and cfg.tensor_parallel_size == 1)
        if not can:
            raise ValueError("--activation-dtype int8 runs on the CPU kernels' integer (AVX512_VNNI) path, and "
                             + ("this device is " + self.device.type if self.device.type != "cpu"
                                else "this CPU or kernel build has no AVX512_VNNI")
                             + ": leave it at auto or float")
        return 1

    def largest_step(self) -> tuple[torch.Tensor, int]:
        """The largest step the scheduler can make, on dummy tokens into a scratch KV cache (the
        real one is untouched or not there yet): max_num_batched_tokens of prompt in chunks of at
        most max_model_len, max_num_seqs rows of logits, and the sampler's largest temporaries (a
        softmax and the full sort of top-k / top-p). One rank. Returns (logits, the scratch
        cache's bytes)."""
        bs, dev, tokens = self.block_size, self.device, self.max_num_batched_tokens
        chunks = [min(self.max_model_len, tokens - s) for s in range(0, tokens, self.max_model_len)]
        blocks = sum(-(-n // bs) for n in chunks)
        shape = (self.arch.num_layers, 2, blocks, self.model_arch.num_kv_heads, bs, self.arch.head_dim)
        cache = torch.zeros(shape, dtype=self.kv_dtype, device=dev)
        scratch = cache.numel() * cache.element_size()
        if self.cfg.kv_cache_scaled:
            cache = ScaledKV(cache, torch.zeros(shape[:-1], dtype=torch.float32, device=dev))
            scratch += cache.scales.numel() * 4
        pos = np.concatenate([np.arange(n, dtype=np.int64) for n in chunks])
        first = np.cumsum([0] + [-(-n // bs) for n in chunks])  # each chunk's first block
        slot_blocks = np.concatenate([first[i] + np.arange(n) // bs for i, n in enumerate(chunks)])
        starts = np.cumsum([0] + chunks)
        prefills = [PrefillChunk(int(starts[i]), n, n, torch.arange(first[i], first[i + 1], device=dev))
                    for i, n in enumerate(chunks)]
        on_dev = self._to_device({"ids": np.zeros(tokens, np.int64), "pos": pos, "blocks": slot_blocks,
                                  "offsets": pos % bs,
                                  "rows": np.linspace(0, tokens - 1, min(self.cfg.max_num_seqs, tokens)).astype(np.int64)})
        meta = AttentionMetadata(on_dev["blocks"], on_dev["offsets"], 0, None, None, 0, prefills, bs)
        logits = self.model.compute_logits(self.model(on_dev["ids"], on_dev["pos"], cache, meta, on_dev["rows"]))
        torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)
        return logits, scratch

    def _profile_activations(self) -> int:
        """CUDA: the bytes the largest step allocates beyond what is resident (weights, buffers),
        its scratch KV cache not counted. The KV budget leaves this much free."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        logits, scratch = self.largest_step()
        torch.cuda.synchronize(self.device)
        peak = max(0, torch.cuda.max_memory_allocated(self.device) - base - scratch)
        del logits
        torch.cuda.empty_cache()
        log.info("profiled the largest step (%d tokens, %d sampled rows): %.0f MiB of activations",
                 self.max_num_batched_tokens, min(self.cfg.max_num_seqs, self.max_num_batched_tokens), peak / 2**20)
        return peak

    def weights_description(self) -> str:
        """What the weights are kept as, for the start-up log: "gguf Q4_1+gguf Q8_0 (quantized)" or
        the float dtype."""
        if not self.quantized_weights:
            return str(self.dtype).removeprefix("torch.") + (" (--load-format dummy: random)"
                                                             if self.cfg.load_format == "dummy" else "")
        kinds = sorted({part for w in self.quantized_weights.values() for part in w.source.split("+")})  # fused: "a+b"
        return "+".join(kinds) + (" (quantized, int8 activations)" if self.int8_activation_rows else " (quantized)")

    def start_kv_populate(self) -> None:
        """Fault the CPU KV cache in on a background thread (cpu_memory.populate), so steps do not
        stall on first touches of cache pages. The server calls this once it is ready (during
        start-up the thread would compete with loading); idempotent; nothing to do on a GPU."""
        if self.device.type == "cpu" and self._populating is None:
            self._populating = threading.Thread(target=self._populate_kv, name="kv-populate", daemon=True)
            self._populating.start()

    def _populate_kv(self) -> None:
        caches = self.kv_caches
        secs = sum(populate(t) for t in ((caches.data, caches.scales) if isinstance(caches, ScaledKV) else (caches,)))
        log.info("KV cache faulted in: %.0f MiB in %.2fs", self.kv_bytes / 2**20, secs)

    @property
    def kv_populating(self) -> bool:
        """The KV cache is being faulted in now (a thread taking a core)."""
        return self._populating is not None and self._populating.is_alive()

    def wait_kv_populated(self) -> None:
        """Fault the KV cache in and wait for it (offline runs: before their work starts)."""
        self.start_kv_populate()
        if self._populating is not None:
            self._populating.join()

    # ------------------------------------------------------------------------------------------
    def launch(self, out: SchedulerOutput, kv: KVCacheManager, structured: StructuredOutputManager | None = None) -> PendingStep:
        """The step's work queued on the device (on a CPU: done) without waiting for its tokens.
        A request with a token in flight (Request.num_inflight: the previous launch sampled it and
        the host has not seen it) takes it on the device from that launch's samples."""
        bs = self.block_size
        decodes: list[Request] = []
        prefills: list[Request] = []
        for r in out.requests:
            (decodes if out.num_scheduled_tokens[r.request_id] == 1 else prefills).append(r)
        ordered = decodes + prefills

        tokens: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        chunk_specs: list[tuple[int, int, int]] = []  # (first row, tokens, context after) per prefill chunk
        sample_idx: list[int] = []
        sample_reqs: list[Request] = []
        plp_spans: list[tuple[Request, int, int, int]] = []  # req, first row, rows, first position
        inflight_rows: list[int] = []  # rows whose token is in flight, and where it is in the last samples
        inflight_src: list[int] = []
        tables = [np.asarray(kv.block_ids(r.request_id), dtype=np.int64) for r in ordered]
        t = 0
        for r, table in zip(ordered, tables):
            n = out.num_scheduled_tokens[r.request_id]
            c = r.num_computed_tokens
            pos = np.arange(c, c + n, dtype=np.int64)
            tokens.extend(r.all_token_ids[c : c + n])
            if c + n > r.num_tokens:  # its last token is in flight: a placeholder, filled on the device
                tokens.append(0)
                inflight_rows.append(t + n - 1)
                if not inflight_src:  # the last launch's rows by request (only when a token is in flight)
                    last_rows = {q.request_id: i for i, q in enumerate(self._last_reqs)}
                inflight_src.append(last_rows[r.request_id])
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            if n > 1:
                chunk_specs.append((t, n, c + n))
            if r.sampling_params.prompt_logprobs is not None and c < r.num_prompt_tokens:
                plp_spans.append((r, t, min(n, r.num_prompt_tokens - c), c))
            if c + n == r.num_planned_tokens:
                sample_idx.append(t + n - 1)
                sample_reqs.append(r)
            t += n

        nd = len(decodes)
        slot = np.concatenate(slots)
        fill = self._inflight_fill(inflight_rows, inflight_src)
        if self.graphs is not None and not prefills and not plp_spans and self.graphs.fits(nd):
            # a pure decode step: replayed from the CUDA graph of its padded size (cuda_graphs.py)
            # (every decode samples: its hidden rows are the sampled ones, in order)
            hidden = self.graphs.run(np.asarray(tokens, dtype=np.int64), np.concatenate(positions), slot // bs,
                                     slot % bs, np.array([r.num_computed_tokens + 1 for r in decodes], dtype=np.int64),
                                     tables, fill=fill)
            sample_rows = None
        else:
            hidden, sample_rows = self._eager_step(tokens, positions, slot, tables, decodes, chunk_specs, sample_idx,
                                                   plp_spans, fill)
        prompt_lps = self._prompt_logprobs(hidden, plp_spans) if plp_spans else {}
        pending = None
        if sample_reqs:
            logits = self._logits(hidden[sample_rows] if plp_spans else hidden)
            mask = None
            if structured is not None and any(r.grammar is not None for r in sample_reqs):
                mask = structured.bitmask([r.grammar for r in sample_reqs])
            pending = self.sampler.sample(logits, sample_reqs, mask)
        # what the next launch reads its in-flight tokens from
        self._last_tokens = pending.tokens if pending is not None else None
        self._last_reqs = sample_reqs
        return PendingStep(sample_reqs, pending, prompt_lps)

    def _inflight_fill(self, rows: list[int], src: list[int]):
        """The step's in-flight tokens as a function that writes them into its input ids on the
        device (from the last launch's samples), or None when it has none."""
        if not rows:
            return None
        dev_rows, dev_src = to_device([rows, src], self.device, torch.int64)  # queued behind the last launch
        last = self._last_tokens

        def fill(ids: torch.Tensor) -> None:
            ids.index_copy_(0, dev_rows, last.index_select(0, dev_src))

        return fill

    def _eager_step(self, tokens, positions, slot, tables, decodes, chunk_specs, sample_idx, plp_spans, fill=None):
        """The step's forward without graphs: (hidden states of the sampled rows, or of every row
        when prompt logprobs want them; the sampled rows' indices on the device)."""
        bs, nd = self.block_size, len(decodes)
        parts = {"ids": np.asarray(tokens, dtype=np.int64), "pos": np.concatenate(positions), "blocks": slot // bs,
                 "offsets": slot % bs, "rows": np.asarray(sample_idx, dtype=np.int64)}
        max_ctx = width = 0
        if nd:
            width = max(len(tb) for tb in tables[:nd])
            padded = np.zeros((nd, width), dtype=np.int64)
            for i, tb in enumerate(tables[:nd]):
                padded[i, : len(tb)] = tb
            lens = np.array([r.num_computed_tokens + 1 for r in decodes], dtype=np.int64)
            max_ctx = int(lens.max())
            parts.update(dec_tables=padded.ravel(), dec_lens=lens)
        for i in range(len(chunk_specs)):
            parts[f"chunk{i}"] = tables[nd + i]
        on_dev = self._to_device(parts)  # one host -> device copy for the whole step
        if fill is not None:
            fill(on_dev["ids"])
        meta = AttentionMetadata(
            slot_blocks=on_dev["blocks"],
            slot_offsets=on_dev["offsets"],
            num_decodes=nd,
            decode_block_tables=on_dev["dec_tables"].view(nd, width) if nd else None,
            decode_context_lens=on_dev["dec_lens"] if nd else None,
            decode_max_context=max_ctx,
            prefills=[PrefillChunk(start, n, ctx, on_dev[f"chunk{i}"]) for i, (start, n, ctx) in enumerate(chunk_specs)],
            block_size=bs,
        )
        # Past the last layer's attention only the sampled tokens are needed, unless prompt
        # logprobs want every token's hidden state.
        rows = on_dev["rows"]
        return self._forward(on_dev["ids"], on_dev["pos"], meta, None if plp_spans else rows), rows

    def _to_device(self, parts: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """The step's int64 inputs as views of one tensor on the device: one copy (from pinned
        memory, asynchronous) instead of one per input, where the device is not the CPU."""
        sizes = [a.size for a in parts.values()]
        buf = to_device(torch.from_numpy(np.concatenate(list(parts.values())) if parts else np.zeros(0, np.int64)),
                        self.device)
        return dict(zip(parts, buf.split(sizes)))

    # -- tensor parallelism: rank 0 tells the other ranks what to run, then runs it itself ------
    def _forward(self, input_ids, positions, meta, rows):
        if self.workers is not None:
            self.workers.send(("forward", input_ids, positions, meta, rows))
        return self.model(input_ids, positions, self.kv_caches, meta, rows)

    def _logits(self, hidden):
        if self.workers is not None:
            self.workers.send(("logits", hidden))
        return self.model.compute_logits(hidden)

    def follow(self) -> None:
        """A worker rank's life: run what rank 0 broadcasts until it says stop (or goes away)."""
        from pagedserve.distributed.workers import receive

        while True:
            cmd = receive(self.device)
            if cmd[0] == "forward":
                _, input_ids, positions, meta, rows = cmd
                self.model(input_ids, positions, self.kv_caches, meta, rows)
            elif cmd[0] == "logits":
                self.model.compute_logits(cmd[1])
            elif cmd[0] == "stop":
                import torch.distributed as dist

                dist.barrier()  # rank 0 waits here for every rank before the group is left
                return

    def tp_health(self) -> str | None:
        """Why the tensor-parallel group is broken (a worker exited), or None."""
        return self.workers.dead() if self.workers is not None else None

    def close(self) -> None:
        if self.workers is not None and not self.workers.stopped:
            from pagedserve.distributed.parallel import shutdown_tensor_parallel

            self.workers.stop()
            shutdown_tensor_parallel()

    def _prompt_logprobs(self, hidden, spans) -> dict[str, list]:
        """Logprob of each prompt token given the tokens before it (the first has none)."""
        res: dict[str, list] = {}
        for r, row, rows, first_pos in spans:
            k = r.sampling_params.prompt_logprobs
            lps = torch.log_softmax(self._logits(hidden[row : row + rows]), dim=-1)
            entries = []
            for j in range(rows):
                nxt = first_pos + j + 1  # the prompt token this row predicts
                if nxt < r.num_prompt_tokens:
                    tok = r.prompt_token_ids[nxt]
                    entries.append((tok, top_logprobs(lps[j], tok, k)))
            res[r.request_id] = entries
        return res
