"""A request's state as the scheduler and engine see it.

Block ids are not here: the KV cache manager is their only owner (it maps request ids to blocks).
One Request is one sequence; `n > 1` becomes n Requests that share a parent id.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from pagedserve.engine.outputs import PositionLogprobs, RequestMetrics
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.structured_output.manager import RequestGrammar  # noqa: F401 (a field type)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # resolved: never None here
    eos_token_ids: frozenset[int] = frozenset()  # empty when the request ignores EOS
    priority: int = 0  # lower runs first, as in vLLM
    arrival_time: float = field(default_factory=time.monotonic)
    parent_id: str | None = None
    index: int = 0  # which of the parent's n samples this is
    seq_no: int = 0  # admission order; tie-break after (priority, arrival_time)

    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    # --async-scheduling: tokens sampled on the device whose values the host has not seen yet (0 or
    # 1: the step in flight). The scheduler plans with them; the runner reads them on the device.
    num_inflight: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    grammar: RequestGrammar | None = None  # structured outputs: the constraint's matcher
    cumulative_logprob: float = 0.0
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] = field(default_factory=list)
    metrics: RequestMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_planned_tokens(self) -> int:
        """Tokens with the one in flight (what the next step continues from)."""
        return len(self.all_token_ids) + self.num_inflight

    @property
    def num_sampled_tokens(self) -> int:
        """Output tokens with the one in flight."""
        return len(self.output_token_ids) + self.num_inflight

    @property
    def sort_key(self) -> tuple[int, float, int]:
        return (self.priority, self.arrival_time, self.seq_no)

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    @property
    def finished(self) -> bool:
        return self.status.finished
