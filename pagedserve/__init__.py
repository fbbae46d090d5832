"""pagedserve: self-hosted LLM serving — paged KV cache engine, OpenAI server, gateway, planner."""

import os

# libgomp (torch's OpenMP runtime) reads this once, as torch loads: how many times an idle worker
# spins before it sleeps. At its default (300,000) a worker keeps burning its core between kernels;
# on a CPU shared with another process the scheduler then charges us for that spinning and hands
# the core to the other process when our next kernel needs it. 1,000 spins kept the quiet
# throughput and raised the contended one ~1.4x (benchmarks/cpu_contention.py). Set before torch
# is imported (import pagedserve first); a wait policy the user chose wins.
if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "1000"

from pagedserve.engine.outputs import CompletionOutput, RequestOutput
from pagedserve.engine.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name):  # LLM pulls in torch and transformers: import it only when asked for
    if name == "LLM":
        from pagedserve.llm import LLM

        return LLM
    raise AttributeError(name)
