"""LLMEngine: one step = schedule -> run the model -> sample -> update requests -> outputs.

Also the front door for requests: validation happens in add_request, before anything is
scheduled, and `n > 1` is expanded into n sequences that share one parent id.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pagedserve.config import EngineConfig
from pagedserve.engine.cpu_threads import container_threads
from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.kv_cache import KVCacheManager
from pagedserve.engine.model_runner import ModelRunner, PendingStep
from pagedserve.engine.outputs import CompletionOutput, Logprob, RequestOutput
from pagedserve.engine.request import Request, RequestStatus
from pagedserve.engine.sampling_params import OutputKind, SamplingParams
from pagedserve.engine.scheduler import Scheduler, SchedulerOutput
from pagedserve.engine.structured_output import StructuredOutputManager
from pagedserve.engine.thread_tuner import ThreadTuner
from pagedserve.distributed.shard import check_tensor_parallel
from pagedserve.model.arch import ModelArch
from pagedserve.model.loader import (checkpoint_quantization, dummy_or_weights, load_checkpoint, load_hf_config,
                                     resolve_tokenizer)
from pagedserve.model.tokenizer import load_tokenizer

log = logging.getLogger("pagedserve.engine")


@dataclass
class _Parent:
    """A user request: n sequences that report together."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[Request]
    detoks: list[IncrementalDetokenizer]
    pending: list[Request] = field(default_factory=list)  # siblings admitted after the first's prefill
    prompt_logprobs: list | None = None
    num_finished: int = 0
    lp_sent: list[int] = field(default_factory=list)  # logprob entries already sent per child (DELTA)
    tok_sent: list[int] = field(default_factory=list)
    covered_sent: list[int] = field(default_factory=list)  # tokens sent as text_token_ids per child (DELTA)


@dataclass
class EngineStats:
    """Counters read by the metrics exporter; the engine only increments them."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})
    steps: int = 0
    last_step_time: float = field(default_factory=time.monotonic)


def _reads_own_tokens(params: SamplingParams) -> bool:
    """Whether sampling for these params reads the request's own tokens on the host (penalties
    count them; a grammar's mask follows them)."""
    return params.structured_outputs is not None or params.needs_penalties


class LLMEngine:
    def __init__(self, cfg: EngineConfig):
        t0 = time.monotonic()
        self.cfg = cfg
        self.threads_why = "--num-threads"
        tp_size = cfg.tensor_parallel_size
        if tp_size > 1:
            self._check_ranks(cfg)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        elif tp_size > 1 and cfg.resolve_device().type == "cpu":
            from pagedserve.distributed.workers import threads_per_rank

            torch.set_num_threads(threads_per_rank(cfg.ranks_per_node))  # every rank its share of the cores
            self.threads_why = f"cores / {cfg.ranks_per_node} ranks on this node"
        elif cfg.resolve_device().type == "cpu":
            # A pod's CPU limit, not the node's cores (cpu_threads.py); only ever fewer threads.
            n, why = container_threads()
            self.threads_why = why
            if n < torch.get_num_threads():
                torch.set_num_threads(n)
        self.model_path, gguf_file = load_checkpoint(cfg.model)
        self.weights_path = gguf_file or self.model_path  # what the weights load from (start-up log)
        hf_cfg = load_hf_config(self.model_path)
        self.quantization = cfg.resolve_quantization(checkpoint_quantization(hf_cfg, gguf_file))
        self.arch = ModelArch.from_hf_config(hf_cfg)
        self.tokenizer = load_tokenizer(resolve_tokenizer(cfg.tokenizer) if cfg.tokenizer else self.model_path,
                                        cfg.chat_template)
        self.max_model_len = cfg.max_model_len or self.arch.max_position_embeddings
        if self.arch.sliding_window and self.max_model_len > self.arch.sliding_window:
            raise ValueError(
                f"this model uses sliding-window attention ({self.arch.sliding_window} tokens), which "
                f"pagedserve does not implement: set --max-model-len <= {self.arch.sliding_window}"
            )
        self.eos_token_ids = frozenset(self._eos_ids(hf_cfg))
        check_tensor_parallel(self.arch, tp_size, cfg.enable_expert_parallel)  # before any weight loads
        self.runner = ModelRunner(cfg, self.arch, dummy_or_weights(cfg, self.model_path, gguf_file),
                                  self.max_model_len)
        self.kv = KVCacheManager(self.runner.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.tuner: ThreadTuner | None = None  # 1 or N threads, measured (thread_tuner.py)
        self.planned_threads = n = torch.get_num_threads()
        if cfg.adaptive_threads and self.runner.kernels is not None and n > 1 and tp_size == 1:
            self.runner.kernels.set_planned_threads(n)
            self.tuner = ThreadTuner(n, torch.set_num_threads, ready=lambda: not self.runner.kv_populating)
        device = self.runner.device
        self.max_num_batched_tokens = cfg.resolve_max_num_batched_tokens(device)
        self.scheduler = Scheduler(self.kv, cfg.max_num_seqs, self.max_num_batched_tokens,
                                   None if cfg.ttft_target_ms is None else cfg.ttft_target_ms / 1000,
                                   background=cfg.background_policy())
        self.structured = StructuredOutputManager(
            self.tokenizer, self.arch.vocab_size, self.eos_token_ids, cfg.structured_outputs_backend)
        self.parents: dict[str, _Parent] = {}
        self.req_to_parent: dict[str, _Parent] = {}
        self.stats = EngineStats()
        self._seq = itertools.count()
        self._ids = itertools.count()
        self._pending_outputs: list[RequestOutput] = []  # e.g. aborts, reported on the next step
        self._inflight: tuple[SchedulerOutput, PendingStep] | None = None  # --async-scheduling: launched, not processed
        self._host_token_parents = 0  # requests whose sampling reads their own tokens on the host (see below)
        if cfg.async_scheduling and self.runner.device.type == "cpu":
            log.warning("--async-scheduling on a CPU: the model runs on the host, so nothing overlaps and each token "
                        "reaches its client one step later; it is meant for GPUs")
        self.served_model_name = cfg.served_model_name or (cfg.model or "SmolLM2-135M-Instruct")
        self.startup_seconds = time.monotonic() - t0
        r = self.runner
        log.info(
            "engine ready in %.1fs: model=%s arch=%s params=%.1fM dtype=%s weights=%s (%.0f MiB) device=%s attention=%s "
            "kv_cache=%.0fMiB kv_cache_dtype=%s blocks=%d block_size=%d tokens=%d max_model_len=%d "
            "max_concurrency=%.1f (at max_model_len) max_num_batched_tokens=%d prefix_caching=%s "
            "threads=%d (%s%s) tensor_parallel=%d",
            self.startup_seconds, self.weights_path, self.arch.architecture, self.arch.num_parameters() / 1e6,
            str(r.dtype).removeprefix("torch."), r.weights_description(), r.weight_bytes / 2**20, device,
            r.model.layers[0].self_attn.backend.name,
            r.kv_bytes / 2**20, str(r.kv_dtype).removeprefix("torch.") + ("+row-scales" if cfg.kv_cache_scaled else ""),
            r.num_blocks, cfg.block_size,
            r.num_blocks * cfg.block_size,
            self.max_model_len, r.max_concurrency, self.max_num_batched_tokens, cfg.enable_prefix_caching,
            torch.get_num_threads(), self.threads_why, "; 1 when a probe finds the CPU shared" if self.tuner else "",
            tp_size,
        )

    @staticmethod
    def _check_ranks(cfg: EngineConfig) -> None:
        """More ranks than devices (CUDA) or cores (CPU) would only queue behind each other."""
        size, device = cfg.ranks_per_node, cfg.resolve_device()  # the ranks this machine runs
        if device.type == "cuda" and size > torch.cuda.device_count():
            raise ValueError(f"{size} tensor-parallel ranks on this node need {size} GPUs; this machine has "
                             f"{torch.cuda.device_count()}")
        if device.type == "cpu":
            cores, _ = container_threads()
            if size > cores:
                raise ValueError(f"--tensor-parallel-size {cfg.tensor_parallel_size} puts {size} ranks on this node: "
                                 f"more ranks than this process's {cores} CPU cores; use at most {cores}")

    def close(self) -> None:
        """Stop the tensor-parallel workers (nothing to do with one rank)."""
        self.runner.close()

    def _eos_ids(self, hf_cfg: dict) -> set[int]:
        ids = set(self.arch.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        gen = self.model_path / "generation_config.json"
        if gen.exists():
            e = json.loads(gen.read_text()).get("eos_token_id")
            ids.update([e] if isinstance(e, int) else (e or []))
        return ids

    # -- requests --------------------------------------------------------------------------
    def tokenize(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # e.g. a lone surrogate from a JSON "\ud800" escape
            raise ValueError(f"prompt is not valid Unicode text: {e.reason} at position {e.start}") from None
        return self.tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids

    def add_request(
        self,
        request_id: str | None,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> str:
        """Validate and queue a request. Raises ValueError (naming the field) on bad input."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        parent = self.make_request(request_id, prompt, params, priority, arrival_time)
        self.wait_for_grammar(parent)
        self.enqueue(parent)
        return request_id

    def wait_for_grammar(self, parent: _Parent, timeout: float | None = None) -> None:
        """Wait for a request's grammar to compile; ValueError (the backend's reason) if it does not.
        add_request waits so that a bad grammar is its error; make_request + enqueue do not."""
        if parent.params.structured_outputs is not None:
            self.structured.grammar(parent.params.structured_outputs).result(timeout)

    def make_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> _Parent:
        """Validate and build a request without touching engine state, so the server can call it
        from its own thread and answer 400 before anything is queued."""
        if isinstance(prompt, str):
            text = prompt
            token_ids = self.tokenize(prompt) if prompt else []
        else:
            text, token_ids = None, [int(t) for t in prompt]
        if not token_ids:
            raise ValueError("prompt must not be empty")
        V = self.arch.vocab_size
        bad = [t for t in token_ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt has token ids outside [0, {V}): {bad[:5]}")
        params.validate_token_ids(V)
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(token_ids)} tokens, but max_model_len is {self.max_model_len}: "
                "shorten the prompt or raise --max-model-len"
            )
        room = self.max_model_len - len(token_ids)
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if max_tokens > room:
            raise ValueError(
                f"this model's maximum context length is {self.max_model_len} tokens, but "
                f"{len(token_ids) + max_tokens} were requested ({len(token_ids)} in the prompt, "
                f"{max_tokens} in max_tokens): reduce the prompt or max_tokens"
            )
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        eos = frozenset() if params.ignore_eos else self.eos_token_ids
        children = []
        for i in range(params.n):
            req = Request(
                request_id=request_id if params.n == 1 else f"{request_id}#{i}",
                prompt_token_ids=token_ids,
                sampling_params=params,
                max_tokens=max_tokens,
                eos_token_ids=eos,
                priority=priority,
                arrival_time=arrival,
                parent_id=request_id,
                index=i,
                seq_no=next(self._seq),
            )
            if params.structured_outputs is not None:
                req.grammar = self.structured.new_request(params.structured_outputs)
            if params.seed is not None:
                req.generator = torch.Generator(device=self.runner.device).manual_seed(params.seed + i)
            children.append(req)
        parent = _Parent(
            request_id, text, token_ids, params, children,
            [IncrementalDetokenizer(self.tokenizer, params) for _ in children],
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
            lp_sent=[0] * params.n, tok_sent=[0] * params.n, covered_sent=[0] * params.n,
        )
        return parent

    def enqueue(self, parent: _Parent) -> None:
        if parent.request_id in self.parents:
            raise ValueError(f"request_id {parent.request_id!r} is already in use")
        g = parent.children[0].grammar
        if g is not None and g.ready() and g.error is not None:
            raise ValueError(g.error)
        self.parents[parent.request_id] = parent
        self._host_token_parents += _reads_own_tokens(parent.params)
        for c in parent.children:
            self.req_to_parent[c.request_id] = parent
        # With prefix caching, siblings wait for the first one's prompt and then share its blocks.
        if len(parent.children) > 1 and self.cfg.enable_prefix_caching:
            parent.pending = parent.children[1:]
            self.scheduler.add(parent.children[0])
        else:
            for c in parent.children:
                self.scheduler.add(c)

    def abort_request(self, request_id: str) -> None:
        parent = self.parents.get(request_id)
        if parent is None:
            return
        for req in parent.children:
            if not req.finished:
                self._finish(parent, req, RequestStatus.FINISHED_ABORTED)
        parent.pending.clear()
        self._pending_outputs.extend(self._make_outputs({parent.request_id: set(range(len(parent.children)))}))

    @property
    def cpu_threads(self) -> int:
        """Threads the steps run on now (the tuner's choice, else the planned count)."""
        return self.tuner.chosen if self.tuner is not None else self.planned_threads

    def has_unfinished_requests(self) -> bool:
        return bool(self.parents) or bool(self._pending_outputs)

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting + sum(len(p.pending) for p in self.parents.values())

    # -- the step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """schedule -> launch the model -> process its tokens. With --async-scheduling the tokens
        processed are the last step's: this step is launched first, so on a GPU the host plans,
        prepares and launches it while the device still finishes the last one (one step in flight)."""
        outputs, self._pending_outputs = self._pending_outputs, []
        if self._inflight is not None and self._needs_host_tokens():
            outputs.extend(self._process(*self._take_inflight()))  # penalties / grammars read every token
        sched = self.scheduler.schedule()
        self.stats.last_step_time = time.monotonic()
        if sched.grammar_failed:
            failed: dict[str, set[int]] = {}
            for req in sched.grammar_failed:
                parent = self.req_to_parent[req.request_id]
                req.stop_reason = req.grammar.error
                self._finish(parent, req, RequestStatus.FINISHED_ABORTED)
                failed.setdefault(parent.request_id, set()).add(req.index)
            outputs.extend(self._make_outputs(failed))
        launched = None
        if sched.requests:
            now = time.monotonic()
            for r in sched.requests:
                if r.metrics.first_scheduled_time is None:
                    r.metrics.first_scheduled_time = now
            if self.tuner is not None:
                self.tuner.before_step()
            launched = (sched, self.runner.launch(sched, self.kv, self.structured))
            if self.tuner is not None:
                self.tuner.after_step(sched.total_tokens)
            self.scheduler.update_after_step(sched)
            self.stats.steps += 1
        if self._inflight is not None:  # the last step's tokens, while this one runs
            outputs.extend(self._process(*self._take_inflight()))
        if launched is not None:
            if self.cfg.async_scheduling:
                for r in launched[1].sample_reqs:
                    r.num_inflight += 1
                self._inflight = launched
            else:
                outputs.extend(self._process(*launched))
        elif self.scheduler.num_waiting and not self.scheduler.num_running:
            self.structured.wait_for_compile(0.05)  # only compiling requests: do not spin
        self.stats.last_step_time = time.monotonic()
        return outputs

    def _take_inflight(self) -> tuple[SchedulerOutput, PendingStep]:
        launched, self._inflight = self._inflight, None
        for r in launched[1].sample_reqs:
            r.num_inflight -= 1
        return launched

    def _needs_host_tokens(self) -> bool:
        """A request that may be scheduled reads its own tokens on the host to sample: penalties
        count them, a grammar's mask follows them. Its last token must have come back first.
        (A count kept at enqueue and removal: not a walk over every waiting request each step.)"""
        return self._host_token_parents > 0

    def _process(self, sched: SchedulerOutput, pending: PendingStep) -> list[RequestOutput]:
        """A step's tokens (waited for on the host) into the requests: stop checks, outputs."""
        result = pending.result()
        now = time.monotonic()
        changed: dict[str, set[int]] = {}
        for req in sched.requests:
            if req.finished:  # aborted, or stopped by the token before this one (a step in flight)
                continue
            parent = self.req_to_parent[req.request_id]
            if req.request_id in result.prompt_logprobs and req.index == 0:
                for tok, lp in result.prompt_logprobs[req.request_id]:
                    parent.prompt_logprobs.append(self._logprob_entry(tok, lp))
            tok = result.sampled.get(req.request_id)
            if tok is None:
                continue
            self._append(parent, req, tok, result.logprobs.get(req.request_id), now)
            changed.setdefault(parent.request_id, set()).add(req.index)
            if req.num_output_tokens == 1 and parent.pending and req.index == 0:
                for sib in parent.pending:
                    self.scheduler.add(sib)
                parent.pending = []
        return self._make_outputs(changed)

    def _append(self, parent: _Parent, req: Request, tok: int, lp, now: float) -> None:
        p = req.sampling_params
        req.append_token(tok)
        self.stats.generation_tokens += 1
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
            self.stats.prompt_tokens += req.num_prompt_tokens
        req.metrics.last_token_time = now
        if lp is not None:
            req.cumulative_logprob += lp[0]
            req.logprobs.append(self._logprob_entry(tok, lp))
        may_stop = req.num_output_tokens >= p.min_tokens
        stop_str = parent.detoks[req.index].add_token(tok, check_stop=may_stop)
        status = None
        if req.grammar is not None and not req.grammar.matcher.accept(tok):
            # Only when something outside the mask picked the token (a -inf row, a backend bug).
            log.error("request %s: token %d is not allowed by its grammar; ending it", req.request_id, tok)
            status, req.stop_reason = RequestStatus.FINISHED_ABORTED, "token rejected by the grammar"
        elif req.grammar is not None and req.grammar.matcher.is_terminated():
            status = RequestStatus.FINISHED_STOPPED  # the grammar is complete (its stop token taken)
        elif may_stop and tok in req.eos_token_ids:
            status = RequestStatus.FINISHED_STOPPED
        elif may_stop and tok in p.stop_token_ids:
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, tok
        elif may_stop and stop_str is not None:
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop_str
        elif req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            self._finish(parent, req, status)

    def _finish(self, parent: _Parent, req: Request, status: RequestStatus) -> None:
        self.scheduler.finish(req, status)
        req.metrics.finished_time = time.monotonic()
        parent.num_finished += 1
        self.stats.finished[status.value] += 1

    def _logprob_entry(self, tok: int, lp) -> dict[int, Logprob]:
        chosen, rank, ids, vals = lp
        entry = {tok: Logprob(chosen, rank, self.tokenizer.decode([tok]))}
        for r, (i, v) in enumerate(zip(ids, vals), start=1):
            if i not in entry:
                entry[i] = Logprob(v, r, self.tokenizer.decode([i]))
        return entry

    def _make_outputs(self, changed: dict[str, set[int]]) -> list[RequestOutput]:
        outs = []
        for pid, indexes in changed.items():
            parent = self.parents[pid]
            done = parent.num_finished == len(parent.children)
            delta = parent.params.output_kind is OutputKind.DELTA
            if not delta and not done:
                continue
            comps = []
            for i in sorted(indexes) if delta else range(len(parent.children)):
                req, detok = parent.children[i], parent.detoks[i]
                finish = req.status.value if req.finished else None
                want_lp = parent.params.logprobs is not None
                if delta:
                    toks = req.output_token_ids[parent.tok_sent[i] :]
                    lps = req.logprobs[parent.lp_sent[i] :] if want_lp else None
                    parent.tok_sent[i] = req.num_output_tokens
                    parent.lp_sent[i] = len(req.logprobs)
                    text = detok.delta(req.finished)
                    text_toks = req.output_token_ids[parent.covered_sent[i] : detok.covered]
                    parent.covered_sent[i] = detok.covered
                else:
                    toks, lps, text = list(req.output_token_ids), (req.logprobs if want_lp else None), detok.text
                    text_toks = toks
                comps.append(
                    CompletionOutput(
                        index=i, text=text, token_ids=toks,
                        cumulative_logprob=req.cumulative_logprob if want_lp else None,
                        logprobs=lps, finish_reason=finish, stop_reason=req.stop_reason, text_token_ids=text_toks,
                    )
                )
            first = parent.children[0]
            outs.append(
                RequestOutput(
                    request_id=pid, prompt=parent.prompt, prompt_token_ids=parent.prompt_token_ids,
                    outputs=comps, finished=done, prompt_logprobs=parent.prompt_logprobs,
                    metrics=first.metrics, num_cached_tokens=first.metrics.num_cached_tokens,
                )
            )
            if done:
                del self.parents[pid]
                self._host_token_parents -= _reads_own_tokens(parent.params)
                for c in parent.children:
                    self.req_to_parent.pop(c.request_id, None)
        return outs
