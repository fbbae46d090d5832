"""The Files and Batches API's limits: light (no web framework), so `pagedserve --help` builds its
flags from them without importing the server."""

from __future__ import annotations

from dataclasses import dataclass

from pagedserve.config import BACKGROUND_PRIORITY


@dataclass
class BatchLimits:
    max_file_bytes: int = 200 << 20  # OpenAI's limit for a batch input file
    max_lines: int = 50_000
    priority: int = BACKGROUND_PRIORITY  # engine priority of batch lines (interactive requests: 0, served first)
    concurrency: int = 32  # lines in flight, all batches together
