"""Structured outputs: a manager (manager.py) and one file per grammar backend (xgrammar, guidance).

The manager pulls in torch; it is imported on first use, so `SamplingParams` (and with it
`import pagedserve`, the CLI's --help) stays light.
"""

from pagedserve.engine.structured_output.params import StructuredOutputsParams

__all__ = ["RequestGrammar", "StructuredOutputManager", "StructuredOutputsParams"]


def __getattr__(name):
    if name in ("RequestGrammar", "StructuredOutputManager"):
        from pagedserve.engine.structured_output import manager

        return getattr(manager, name)
    raise AttributeError(name)
