"""How much of a step background work (batch lines) may take while interactive requests run.

Priorities alone put interactive requests first in every step, but on a CPU every extra sequence
in the decode batch lengthens every step, and a background prompt's prefill chunk can hold a step
for tens of milliseconds: interactive latency would grow with the batch's size. So while any
foreground request (priority below `priority`) is running or waiting:
- background requests run only up to `share` sequences per foreground one (at least `min_seqs`,
  so a batch never stops): the oldest go on, the others pause with their KV kept (a batch that had
  the engine to itself does not hold the step's size when a chat arrives), and new ones wait;
- background prompts get at most `prefill_tokens` tokens of a step (chunked over more steps).
With no foreground request, background requests take the whole engine. The server's
--batch-priority, --batch-share and --batch-prefill-tokens set these.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackgroundPolicy:
    priority: int = 10  # requests at this priority or above (later) are background
    share: float = 0.5  # background sequences admitted per foreground sequence
    min_seqs: int = 1
    prefill_tokens: int = 64  # background prompt tokens per step while foreground runs

    def __post_init__(self):
        if not (self.share >= 0 and self.min_seqs >= 0 and self.prefill_tokens >= 1):
            raise ValueError(f"background policy: share >= 0, min_seqs >= 0 and prefill_tokens >= 1, got {self}")

    def is_background(self, priority: int) -> bool:
        return priority >= self.priority

    def seq_limit(self, foreground: int) -> int:
        """Background sequences allowed beside `foreground` foreground ones (> 0)."""
        return max(self.min_seqs, int(self.share * foreground))
