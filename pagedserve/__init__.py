"""pagedserve: self-hosted LLM serving — paged KV cache engine, OpenAI server, gateway, planner."""

from pagedserve.engine.outputs import CompletionOutput, RequestOutput
from pagedserve.engine.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name):  # LLM pulls in torch and transformers: import it only when asked for
    if name == "LLM":
        from pagedserve.llm import LLM

        return LLM
    raise AttributeError(name)
