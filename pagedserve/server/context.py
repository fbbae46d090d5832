"""What every endpoint module shares: the engine, settings, metrics, and the request checks and
helpers that turn an HTTP body into engine requests."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Depends, Request

from pagedserve.batch.limits import BatchLimits
from pagedserve.batch.manager import BatchManager
from pagedserve.engine.async_engine import AsyncEngine
from pagedserve.engine.sampling_params import OutputKind, SamplingParams
from pagedserve.engine.structured_output import StructuredOutputsParams
from pagedserve.server import protocol as P
from pagedserve.server.errors import APIError, quote
from pagedserve.server.metrics import ServerMetrics
from pagedserve.server.middleware import bearer_token


@dataclass
class ServerSettings:
    served_model_names: list[str]
    api_key: str | None = None
    max_waiting_requests: int = 1024
    max_request_body_bytes: int = 4 << 20
    request_timeout: float = 600.0  # seconds for one request, start to end
    root_model: str | None = None
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None  # a tool_parsers.PARSERS name
    batch_dir: str | None = None  # the Files and Batches API's files and database; None: the API is off
    batch_limits: BatchLimits = field(default_factory=BatchLimits)
    extra: dict = field(default_factory=dict)


class ServingContext:
    def __init__(self, engine: AsyncEngine, settings: ServerSettings, metrics: ServerMetrics):
        self.engine = engine
        self.core = engine.engine
        self.tokenizer = self.core.tokenizer
        self.settings = settings
        self.metrics = metrics
        self.model_name = settings.served_model_names[0]
        self.auth = [Depends(self.check_key)]
        self.batches: BatchManager | None = None  # build_app sets it where settings.batch_dir is

    # -- checks ----------------------------------------------------------------------------
    async def check_key(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        token = bearer_token(request.headers.get("authorization")) or ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    def check_model(self, name: str | None) -> None:
        names = self.settings.served_model_names
        if name is not None and name not in names:
            raise APIError(404, f"The model {quote(name)} does not exist. Served: {names}",
                           param="model", code="model_not_found")

    def check_capacity(self) -> None:
        waiting, limit = self.engine.num_waiting, self.settings.max_waiting_requests
        if waiting >= limit:
            raise APIError(503, f"server overloaded: {waiting} requests waiting (--max-waiting-requests={limit}); "
                                "retry shortly", code="overloaded", headers={"Retry-After": "1"})

    # -- building requests -----------------------------------------------------------------
    def make_params(self, body: P._SamplingFields, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None, structured: StructuredOutputsParams | None = None) -> SamplingParams:
        bias = None
        if body.logit_bias:
            try:
                bias = {int(k): float(v) for k, v in body.logit_bias.items()}
            except ValueError:
                raise APIError(400, "logit_bias keys must be token ids (integers as strings)", param="logit_bias")
        try:
            return SamplingParams(
                n=body.n, temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
                min_p=body.min_p or 0.0, seed=None if body.seed is None else body.seed % (2**63),
                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty or 1.0, stop=body.stop,
                stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos, max_tokens=max_tokens,
                min_tokens=body.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                logit_bias=bias, skip_special_tokens=body.skip_special_tokens,
                include_stop_str_in_output=body.include_stop_str_in_output,
                output_kind=OutputKind.DELTA if body.stream else OutputKind.FINAL_ONLY,
                structured_outputs=structured,
            )
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_request")

    async def compile_constraint(self, params: SamplingParams, field: str | None) -> None:
        """Wait (without blocking the event loop) for the request's grammar to compile, so a bad
        schema/regex/grammar is a 400 before any request is queued or any stream starts."""
        so = params.structured_outputs
        if so is None:
            return
        try:
            await asyncio.wrap_future(self.core.structured.grammar(so))
        except ValueError as e:
            raise APIError(400, f"{field}: {e}" if field else str(e), param=field, code="invalid_request") from None

    def start(self, rid: str, prompts: list[str | list[int]], params: SamplingParams, priority: int) -> list[AsyncIterator]:
        self.check_capacity()
        streams, ids = [], []
        try:
            for i, prompt in enumerate(prompts):
                ids.append(f"{rid}-{i}")
                streams.append(self.engine.generate(ids[-1], prompt, params, priority))
        except ValueError as e:
            for r in ids[: len(streams)]:
                self.engine.abort(r)
            raise APIError(400, str(e), param="prompt" if "prompt" in str(e) else None, code="invalid_request")
        return streams

    # -- responses -------------------------------------------------------------------------
    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> P.Usage:
        return P.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                       total_tokens=prompt_tokens + completion_tokens,
                       prompt_tokens_details={"cached_tokens": cached} if cached else None)

    def decode_tok(self, t: int) -> str:
        return self.tokenizer.decode([t])
