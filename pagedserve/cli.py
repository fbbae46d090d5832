"""`pagedserve serve | bench | plan | gateway ...` — flags follow `vllm serve` where they apply."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path

from pagedserve.config import (ACTIVATION_DTYPES, DEFAULT_TTFT_TARGET_MS, LOAD_FORMATS, QUANTIZATION_METHODS,
                               QUANTIZE_METHODS, STRUCTURED_OUTPUTS_BACKENDS)
from pagedserve.server.tool_parsers import PARSERS as _TOOL_PARSERS

T0 = time.monotonic()
TOOL_CALL_PARSERS = tuple(_TOOL_PARSERS)
log = logging.getLogger("pagedserve")


def parse_bytes(s: str) -> int:
    """'4294967296', '4GiB', '512MiB', '2G', '1.5GB' -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?b?)\s*", s.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {s!r} (use bytes, or e.g. 512MiB, 4GiB)")
    num, unit, ib = float(m.group(1)), m.group(2), m.group(3)
    base = 1024 if ib.startswith("i") or not ib else 1000
    return int(num * base ** " kmgt".index(unit or " "))


def parse_ttft_target(s: str) -> float | None:
    """'500' (ms) or 'off'."""
    if s.strip().lower() in ("off", "none"):
        return None
    try:
        v = float(s)
    except ValueError:
        v = -1.0
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"not a TTFT target: {s!r} (use milliseconds >= 0, e.g. 500, or 'off')")
    return v


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' only where the help does not already say what the default is, and
    not for flags whose default is 'not set'."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or any(action.default is d for d in (None, False, argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


def add_batch_args(p: argparse.ArgumentParser) -> None:
    """The Files and Batches API (batch/manager.py)."""
    from pagedserve.batch.limits import BatchLimits

    d = BatchLimits()
    p.add_argument("--batch-dir", default=None,
                   help="turns on /v1/files and /v1/batches: uploaded files, outputs and batch state (SQLite) "
                        "live here and survive restarts (a volume in Kubernetes)")
    p.add_argument("--max-batch-file-bytes", type=parse_bytes, default=d.max_file_bytes,
                   help="largest batch input file accepted (default 200MiB, OpenAI's)")
    p.add_argument("--max-batch-lines", type=int, default=d.max_lines, help="most requests in one batch")
    p.add_argument("--batch-priority", type=int, default=d.priority,
                   help="engine priority of batch lines; interactive requests are 0 and lower runs first, so "
                        "batches soak up what interactive traffic leaves")
    p.add_argument("--batch-concurrency", type=int, default=d.concurrency, help="batch lines in flight at once, all batches together")
    from pagedserve.config import EngineConfig

    e = EngineConfig()
    p.add_argument("--batch-share", type=float, default=e.background_share,
                   help="while interactive requests run, batch requests (priority >= --batch-priority) step only up "
                        "to this many sequences per interactive one (at least 1; the others pause): on a CPU each "
                        "extra sequence lengthens every step")
    p.add_argument("--batch-prefill-tokens", type=int, default=e.background_prefill_tokens,
                   help="while interactive requests run, batch prompts get at most this many tokens of a step")


def batch_limits(args: argparse.Namespace):
    from pagedserve.batch.limits import BatchLimits

    if args.max_batch_lines < 1 or args.batch_concurrency < 1:
        raise ValueError("--max-batch-lines and --batch-concurrency must be at least 1")
    return BatchLimits(max_file_bytes=args.max_batch_file_bytes, max_lines=args.max_batch_lines,
                       priority=args.batch_priority, concurrency=args.batch_concurrency)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_tag", nargs="?", default=None, help="model: HF folder, .gguf file, or hub id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--model", default=None, help="same as the positional MODEL")
    p.add_argument("--served-model-name", nargs="+", default=None, help="name(s) clients use in 'model' (default: the model path/id)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (the Helm chart passes 0.0.0.0)")
    p.add_argument("--port", type=int, default=8000, help="listen port")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA and on CPUs with AVX512_BF16, float32 on other CPUs), float32, bfloat16, float16")
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="KV cache element type: auto (the model's dtype), float16 or bfloat16 (half the memory "
                        "and attention reads of a float32 cache), int8 or fp8/fp8_e4m3 (~a quarter: one byte per "
                        "value plus a float32 scale per token and kv head), fp8_e5m2 (a quarter; 2 mantissa bits, "
                        "unscaled, as vLLM's CPU backend)")
    p.add_argument("--quantization", "-q", default=None, choices=list(QUANTIZATION_METHODS),
                   help="how the checkpoint's weights are quantized (default: read from the checkpoint): gguf, awq, "
                        "gptq, compressed-tensors (int4/int8) stay quantized in memory on CPUs with the kernels, fp8 "
                        "and any other device dequantize to --dtype at load (the start-up log says which)")
    p.add_argument("--activation-dtype", default="auto", choices=list(ACTIVATION_DTYPES),
                   help="inputs of quantized-weight matmuls: int8 (quantized to int8 per group of the weights' "
                        "groups, as llama.cpp and OpenVINO's CPU default do: ~1.3-2x the quantized GEMMs on "
                        "AVX512_VNNI CPUs for ~+0.5%% perplexity), float (--dtype's precision), or auto: int8 for "
                        "a GGUF where the CPU has AVX512_VNNI and tensor parallelism is off, float otherwise "
                        "(AWQ/GPTQ/compressed-tensors compute as vLLM's W4A16/W8A16 do)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (prompt + output); default: the model's")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="fraction of device memory for weights + KV cache (CUDA default 0.9; on CPU, of available RAM)")
    p.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                   help="KV cache size in bytes (e.g. 4GiB); overrides --gpu-memory-utilization. CPU default 4GiB")
    p.add_argument("--max-num-seqs", type=int, default=256, help="max sequences in one batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget of one step (default 512 CPU, 2048 CUDA)")
    p.add_argument("--ttft-target-ms", type=parse_ttft_target, default=DEFAULT_TTFT_TARGET_MS,
                   help="a prompt that has waited this long goes ahead of running decodes for a step ('off': "
                        "decodes always first); bounds time to first token under bursts at some inter-token latency")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse KV blocks of shared prompt prefixes (default on)")
    p.add_argument("--api-key", default=os.environ.get("PAGEDSERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (or env PAGEDSERVE_API_KEY)")
    p.add_argument("--chat-template", default=None, help="chat template file or Jinja string (default: the tokenizer's)")
    p.add_argument("--seed", type=int, default=0, help="random seed for unseeded sampling")
    p.add_argument("--uvicorn-log-level", default="warning", choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's own log level (pagedserve logs at INFO)")
    p.add_argument("--max-waiting-requests", type=int, default=1024, help="queue depth before answering 503 + Retry-After")
    p.add_argument("--max-request-body-bytes", type=parse_bytes, default=4 << 20, help="larger bodies get 413 (default 4MiB)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds one request may take before 504")
    add_batch_args(p)
    p.add_argument("--engine-stall-timeout", type=float, default=10.0, help="seconds one engine step may take before /health says 503")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="on SIGTERM, seconds to finish in-flight requests")
    p.add_argument("--attention-backend", default=None, help="attention kernel: auto (default: cpp on CPU, triton on CUDA), cpp, triton or torch")
    p.add_argument("--num-threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    p.add_argument("--adaptive-threads", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: measure one thread against all of them while serving and keep the faster "
                        "(one wins when other processes share the cores)")
    p.add_argument("--structured-outputs-backend", default="auto", choices=STRUCTURED_OUTPUTS_BACKENDS,
                   help="grammar engine for response_format/structured_outputs/tools: auto (xgrammar; guidance for "
                        "JSON schemas with keywords xgrammar does not enforce), xgrammar or guidance (llguidance)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='let the model decide to call tools (tool_choice "auto"); needs --tool-call-parser')
    p.add_argument("--tool-call-parser", default=None, choices=TOOL_CALL_PARSERS,
                   help="how tool calls are read from the model's text with tool_choice auto (vLLM's names); "
                        "hermes matches the built-in tool prompt used for templates without tool support")
    # vllm serve flags accepted for compatibility.
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over this many ranks (processes started here: one GPU each on CUDA, "
                        "the cores shared out on CPU); heads, KV heads and MLP widths must divide by it")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="MoE models under tensor parallelism: each rank holds whole experts instead of a slice of "
                        "every expert")
    p.add_argument("--distributed-executor-backend", default="mp", choices=["mp"],
                   help="how tensor-parallel ranks run: mp, local processes (gloo on CPU, NCCL on CUDA)")
    # Several machines, spelled as torchrun spells them: every node runs `pagedserve serve` with the
    # same model and flags; node 0 serves the API, the others only run their ranks.
    p.add_argument("--nnodes", type=int, default=1, help="machines the tensor-parallel ranks span (default 1)")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's index, 0 = the one serving the API")
    p.add_argument("--master-addr", default=None, help="node 0's address, reachable from every node (nnodes > 1)")
    p.add_argument("--master-port", type=int, default=None, help="a free port on node 0 for the rendezvous")
    p.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                   help="auto: the checkpoint's weights; dummy: random weights of config.json's shapes, made on the "
                        "device (benchmarks where the checkpoint cannot be read; the folder still needs a tokenizer)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: run every decode step eagerly instead of replaying CUDA graphs (no effect on CPU)")
    p.add_argument("--async-scheduling", action="store_true",
                   help="keep one step in flight: launch each step before the last one's tokens reach the host, so "
                        "a GPU's host work (scheduling, inputs, outputs) overlaps its kernels; stop strings and stop "
                        "tokens then cost one extra step. Penalties and structured outputs wait for their tokens")
    p.add_argument("--cuda-graph-sizes", type=int, nargs="+", default=None,
                   help="CUDA: decode batch sizes captured as graphs; one value N: 1, 2, 4 and multiples of 8 up to "
                        "N; several: exactly those (default: up to --max-num-seqs, at most 512)")
    p.add_argument("--tokenizer", default=None,
                   help="where the tokenizer is, when not beside the weights: a folder with tokenizer.json or "
                        "tokenizer_config.json, or anything --model takes")
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=None,
                   help="accepted: long prompts are always chunked by --max-num-batched-tokens (as in vLLM V1); "
                        "--no-enable-chunked-prefill is refused")
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                   help="1 only: pipeline parallelism is not implemented (split a model with --tensor-parallel-size)")
    p.add_argument("--swap-space", type=float, default=None,
                   help="accepted for vllm compatibility; no effect (preempted requests are recomputed, not swapped "
                        "to CPU memory, as in vLLM V1): a warning says so")
    for flag in ("--trust-remote-code", "--disable-log-requests", "--disable-log-stats"):
        p.add_argument(flag, action="store_true", help="accepted for vllm compatibility; no effect")


def build_server_app(args: argparse.Namespace):
    """The engine (built and stepped on its own thread) and the FastAPI app over it, from serve's
    flags: (async engine, settings, app). `pagedserve run-batch` runs the same app in-process."""
    from pagedserve.config import EngineConfig
    from pagedserve.model.loader import locate_model

    if args.tensor_parallel_size < 1:
        raise ValueError(f"--tensor-parallel-size must be >= 1, got {args.tensor_parallel_size}")
    if args.pipeline_parallel_size != 1:
        raise ValueError(f"--pipeline-parallel-size {args.pipeline_parallel_size}: pipeline parallelism is not "
                         "implemented; split the model over ranks with --tensor-parallel-size instead")
    if args.enable_chunked_prefill is False:
        raise ValueError("--no-enable-chunked-prefill: pagedserve always chunks long prompts by "
                         "--max-num-batched-tokens (as vLLM V1 does); to run whole prompts in one step, set "
                         "--max-num-batched-tokens to at least --max-model-len")
    if args.swap_space is not None:
        log.warning("--swap-space has no effect: preempted requests are recomputed, not swapped to CPU memory")
    model = args.model or args.model_tag
    locate_model(model)  # a bad path or flag is reported now, not after torch and the model load
    limits = batch_limits(args)
    cfg = EngineConfig(
        model=model, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization,
        activation_dtype=args.activation_dtype, device=args.device,
        max_model_len=args.max_model_len,
        block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=args.enable_prefix_caching,
        seed=args.seed, chat_template=args.chat_template, tokenizer=args.tokenizer, attention_backend=args.attention_backend,
        num_threads=args.num_threads, structured_outputs_backend=args.structured_outputs_backend,
        ttft_target_ms=args.ttft_target_ms, adaptive_threads=args.adaptive_threads,
        background_priority=args.batch_priority, background_share=args.batch_share,
        background_prefill_tokens=args.batch_prefill_tokens, tensor_parallel_size=args.tensor_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel, nnodes=args.nnodes, node_rank=args.node_rank,
        master_addr=args.master_addr, master_port=args.master_port, enforce_eager=args.enforce_eager,
        cuda_graph_sizes=args.cuda_graph_sizes, load_format=args.load_format, async_scheduling=args.async_scheduling,
    )
    if cfg.node_rank > 0:  # this node only runs ranks: no engine, no API (serve() sees args.node_rank)
        return None, None, cfg
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (one of: " + ", ".join(TOOL_CALL_PARSERS) + ")")
    from pagedserve.engine.async_engine import AsyncEngine
    from pagedserve.engine.engine import LLMEngine
    from pagedserve.server.app import ServerSettings, build_app

    def make_engine() -> LLMEngine:
        import torch

        torch.manual_seed(args.seed)
        return LLMEngine(cfg)

    # Built on the thread that steps it: one thread owns torch's CPU thread pool (async_engine.py).
    async_engine = AsyncEngine.build(make_engine, stall_timeout=args.engine_stall_timeout)
    engine = async_engine.engine
    names = args.served_model_name or [model or "SmolLM2-135M-Instruct"]
    settings = ServerSettings(
        served_model_names=names, api_key=args.api_key, max_waiting_requests=args.max_waiting_requests,
        max_request_body_bytes=args.max_request_body_bytes, request_timeout=args.request_timeout,
        root_model=str(engine.model_path), enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser, batch_dir=args.batch_dir, batch_limits=limits,
    )
    return async_engine, settings, build_app(async_engine, settings)


def serve(args: argparse.Namespace) -> int:
    async_engine, settings, app = build_server_app(args)  # checks the model and flags before heavy imports
    if async_engine is None:  # --node-rank > 0: this machine's tensor-parallel ranks, no API server
        from pagedserve.distributed.workers import run_node

        return run_node(app)
    import uvicorn

    from pagedserve.engine.async_engine import ShuttingDownError

    engine = async_engine.engine
    cfg = engine.cfg
    names = settings.served_model_names
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout, access_log=False)
    server = uvicorn.Server(config)

    orig_startup = server.startup

    async def end_unfinished_at_shutdown_deadline():
        """uvicorn cancels the connections still open when --shutdown-timeout runs out: streams were
        cut mid-event, without [DONE], and each logged a CancelledError traceback. A second before
        that, every unfinished request ends with an error (an error event and [DONE] for a stream,
        503 otherwise), so clients see why and connections close cleanly."""
        import asyncio

        while not server.should_exit:
            await asyncio.sleep(0.1)
        if app.state.batches is not None:  # batch lines stop where they are: the next start resumes them
            await app.state.batches.stop()
        await asyncio.sleep(max(0.0, args.shutdown_timeout - 1.0))
        n = async_engine.fail_all(ShuttingDownError(
            f"the server is shutting down and this request did not finish within {args.shutdown_timeout:g}s "
            "(--shutdown-timeout); retry it"))
        if n:
            log.warning("shutdown: ended %d unfinished request(s) after %.0fs", n, args.shutdown_timeout)

    async def startup(sockets=None):
        await orig_startup(sockets)
        if server.started:
            import asyncio

            server.cut_task = asyncio.get_running_loop().create_task(end_unfinished_at_shutdown_deadline())
            r = engine.runner
            log.info(
                "ready url=http://%s:%d model=%s served_as=%s dtype=%s device=%s kv_blocks=%d kv_tokens=%d "
                "max_model_len=%d max_concurrency=%.1f auth=%s ready_in=%.1fs",
                args.host, args.port, engine.model_path, ",".join(names), str(r.dtype).removeprefix("torch."),
                r.device, r.num_blocks, r.num_blocks * cfg.block_size, engine.max_model_len, r.max_concurrency,
                "api-key" if args.api_key else "none", time.monotonic() - T0,
            )
            if hasattr(engine.tokenizer, "preload"):  # chat templates need transformers: import it now
                engine.tokenizer.preload()
            engine.structured.preload()  # the grammar backend's tokenizer tables, off the request path
            r.start_kv_populate()  # now, not while loading: it would slow the start
            if r.workers is not None:
                asyncio.get_running_loop().create_task(exit_when_a_rank_dies())

    failed = []

    async def exit_when_a_rank_dies():
        """A tensor-parallel rank that exits leaves the model unusable: /health answers 503 (the
        engine's error), then the server exits non-zero, so a supervisor restarts the replica
        instead of leaving it up and broken."""
        import asyncio

        while not server.should_exit:
            await asyncio.sleep(0.5)
            if async_engine.error is not None:  # the engine loop saw the rank gone (async_engine.py)
                log.error("stopping: %s", async_engine.error)
                failed.append(str(async_engine.error))
                await asyncio.sleep(2.0)  # health checks see the 503 first
                server.should_exit = True
                return

    server.startup = startup
    # uvicorn re-raises SIGTERM after its graceful shutdown; a no-op handler makes that re-raise
    # harmless, so a drained server exits 0 (Kubernetes rolling updates read it as clean).
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        engine.close()  # tensor-parallel workers told to stop and waited for
    if failed:
        return 1
    log.info("stopped cleanly")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Every command and flag (the chart, the images and their tests parse with this, too)."""
    parser = argparse.ArgumentParser(prog="pagedserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="serve a model over the OpenAI API",
                             formatter_class=HelpFormatter)
    add_serve_args(p_serve)
    from pagedserve.bench.cli import add_bench_args

    p_bench = sub.add_parser("bench", help="load-test any OpenAI-compatible server",
                             formatter_class=HelpFormatter)
    add_bench_args(p_bench)
    from pagedserve.planner.cli import add_plan_args

    p_plan = sub.add_parser("plan", help="size GPUs, replicas and cost for a model and workload",
                            formatter_class=HelpFormatter)
    add_plan_args(p_plan)
    from pagedserve.gateway.cli import add_gateway_args

    p_gw = sub.add_parser("gateway", help="one front door for many replicas and providers (see examples/gateway.yaml)")
    add_gateway_args(p_gw)
    from pagedserve.batch.run_batch import add_run_batch_args

    p_rb = sub.add_parser("run-batch", help="run a JSONL file of requests (OpenAI batch format) through the engine "
                                            "or a server, results to a JSONL file", formatter_class=HelpFormatter)
    add_run_batch_args(p_rb)
    p_q = sub.add_parser("quantize", help="write a quantized checkpoint (compressed-tensors, GPTQ or AWQ) without a GPU",
                         formatter_class=HelpFormatter)
    p_q.add_argument("model", nargs="?", default=None, help="model folder, .gguf or hub id (default: the default model)")
    p_q.add_argument("--method", required=True, choices=QUANTIZE_METHODS,
                     help="int8: W8A16 per channel; int4-rtn: W4A16 round-to-nearest; gptq: int4 with GPTQ's "
                          "error-compensating rounding; awq: activation-aware int4 (scale search, then clip search)")
    p_q.add_argument("--out", required=True, type=Path, help="folder to write (replaced if it exists)")
    p_q.add_argument("--group-size", type=int, default=128, help="input features per scale (int4-rtn, gptq, awq)")
    p_q.add_argument("--calibration", type=Path, default=None,
                     help="gptq, awq: a text file to calibrate on (default: a built-in English text)")
    p_q.add_argument("--calibration-tokens", type=int, default=512, help="gptq, awq: tokens of it to use")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # it logs every request at INFO: costly in the gateway
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "bench":
            from pagedserve.bench.cli import run_bench

            return run_bench(args)
        if args.command == "plan":
            from pagedserve.planner.cli import run_plan

            return run_plan(args)
        if args.command == "gateway":
            from pagedserve.gateway.cli import run_gateway

            return run_gateway(args)
        if args.command == "run-batch":
            from pagedserve.batch.run_batch import run_batch

            return run_batch(args)
        if args.command == "quantize":
            from pagedserve.model.quantization.quantize import quantize_model

            quantize_model(args.model, args.method, args.out, args.group_size, args.calibration,
                           args.calibration_tokens)
            return 0
    except (ValueError, FileNotFoundError) as e:  # bad flags or model: say what to change, no traceback
        log.error("%s", e)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
