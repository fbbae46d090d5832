"""StructuredOutputManager: compiles grammars off the step loop and fills each step's bitmask.

- Compiles run on one background thread; a cache keyed by (kind, canonical spec, whitespace)
  shares one compile among every request that asks for the same constraint (failures are cached
  too, so a bad schema sent in a loop costs one compile).
- A request whose grammar is still compiling stays in the waiting queue (the scheduler skips it);
  the batch keeps running.
- Each step, one bitmask holds every sampled row: constrained rows get their matcher's mask,
  the others all ones.
- A matcher follows the request's output tokens. Preemption here recomputes the KV of tokens
  already generated and keeps them, so a matcher never has to roll back.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from pagedserve.config import STRUCTURED_OUTPUTS_BACKENDS
from pagedserve.engine.structured_output.backend import Backend, Grammar, Matcher, bitmask_words
from pagedserve.engine.structured_output.params import StructuredOutputsParams
from pagedserve.engine.structured_output.schema_check import check_schema, unsupported_keywords

log = logging.getLogger("pagedserve.structured_output")

CACHE_ENTRIES = 512


class RequestGrammar:
    """One sequence's constraint: the compile future, then its matcher."""

    def __init__(self, future: Future):
        self._future = future
        self.matcher: Matcher | None = None
        self.error: str | None = None

    def ready(self) -> bool:
        """Compiled (or failed: see `error`); builds the matcher on first success."""
        if self.matcher is not None or self.error is not None:
            return True
        if not self._future.done():
            return False
        try:
            self.matcher = self._future.result().matcher()
        except ValueError as e:
            self.error = str(e)
        return True


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids, backend: str = "auto"):
        if backend not in STRUCTURED_OUTPUTS_BACKENDS:
            raise ValueError(f"structured_outputs_backend must be one of {list(STRUCTURED_OUTPUTS_BACKENDS)}, "
                             f"got {backend!r}")
        self.backend_name = backend
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop_ids = sorted(stop_token_ids)
        self._backends: dict[str, Backend] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._mask: torch.Tensor | None = None
        self._compiled = threading.Event()  # set after each compile: wakes an idle engine loop
        self.compiles = 0  # compiles run (cache misses), for tests and logs

    # -- compiling (any thread) ------------------------------------------------------------
    def grammar(self, params: StructuredOutputsParams) -> Future:
        """The compile of `params`: cached, or started now on the compile thread."""
        key = params.key
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                return fut
            fut = self._pool.submit(self._compile, params)
            self._cache[key] = fut
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
            return fut

    def preload(self) -> None:
        """Build the default backend (its tokenizer tables: ~0.1-0.5 s with the GIL held in
        parts) on the compile thread now, so the first constrained request under load does not
        pay for it. The server calls this once it is ready."""

        def build():
            try:
                self._backend("guidance" if self.backend_name == "guidance" else "xgrammar")
            except Exception as e:  # reported again, as a 400, by the first request that needs it
                log.warning("structured outputs: backend not preloaded: %s", e)

        self._pool.submit(build)

    def new_request(self, params: StructuredOutputsParams) -> RequestGrammar:
        return RequestGrammar(self.grammar(params))

    def _backend(self, name: str) -> Backend:
        b = self._backends.get(name)
        if b is None:
            hf = getattr(self._tokenizer, "hf", self._tokenizer)  # the transformers tokenizer
            if name == "xgrammar":
                from pagedserve.engine.structured_output.xgrammar_backend import XGrammarBackend as cls
            else:
                from pagedserve.engine.structured_output.guidance_backend import GuidanceBackend as cls
            b = self._backends[name] = cls(hf, self.vocab_size, self._stop_ids)
            log.info("structured outputs: %s backend ready", name)
        return b

    def _pick(self, params: StructuredOutputsParams) -> str:
        if self.backend_name != "auto":
            return self.backend_name
        if params.kind == "json" and unsupported_keywords(params.json, "xgrammar"):
            return "guidance"
        return "xgrammar"

    def _compile(self, params: StructuredOutputsParams) -> Grammar:
        try:
            return self._compile_now(params)
        finally:
            self._compiled.set()

    def wait_for_compile(self, timeout: float) -> None:
        """Block until a compile finishes (or `timeout`): an engine with nothing else to run."""
        if self._compiled.wait(timeout):
            self._compiled.clear()

    def _compile_now(self, params: StructuredOutputsParams) -> Grammar:
        self.compiles += 1
        if params.kind == "json":
            check_schema(params.json)
        try:
            return self._backend(self._pick(params)).compile(params)
        except ValueError:
            raise
        except ImportError as e:
            raise ValueError(f"structured outputs need the {self._pick(params)} package: {e}") from None
        except Exception as e:  # any other failure of a backend is still about this input
            raise ValueError(f"{params.kind} could not be compiled: {type(e).__name__}: {e}") from None

    # -- each step (engine thread) ---------------------------------------------------------
    def bitmask(self, grammars: list[RequestGrammar | None]) -> torch.Tensor | None:
        """One mask for a step's sampled rows, or None when no row is constrained."""
        rows = [i for i, g in enumerate(grammars) if g is not None and g.matcher is not None]
        if not rows:
            return None
        n = len(grammars)
        if self._mask is None or self._mask.shape[0] < n:
            self._mask = torch.empty((max(n, 64), bitmask_words(self.vocab_size)), dtype=torch.int32)
        mask = self._mask[:n]
        mask.fill_(-1)
        for i in rows:
            grammars[i].matcher.fill_bitmask(mask, i)
        return mask

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
