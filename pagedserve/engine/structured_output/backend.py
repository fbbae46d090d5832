"""The interface every grammar backend implements, and the one bitmask format they share.

A bitmask is int32 [rows, ceil(vocab / 32)]: bit j of word w allows token 32*w + j. xgrammar and
llguidance both fill this layout, so the sampler applies one mask whatever filled it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from pagedserve.engine.structured_output.params import StructuredOutputsParams


class Matcher(ABC):
    """One request's position in its grammar."""

    @abstractmethod
    def accept(self, token: int) -> bool:
        """Advance by a sampled token; False when the grammar does not allow it."""

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]`."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted: nothing more may follow."""


class Grammar(ABC):
    """A compiled constraint: immutable, shared by every request that asks for the same one."""

    @abstractmethod
    def matcher(self) -> Matcher: ...


class Backend(ABC):
    name: str

    @abstractmethod
    def compile(self, params: StructuredOutputsParams) -> Grammar:
        """Compile; ValueError (saying what to change) when the backend cannot."""


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


_xgrammar_apply = None  # xgrammar's C++ kernel (~0.2 ms for 64 rows x 49k tokens), found on first use


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set disallowed tokens' logits to -inf in place (rows of `logits` and `bitmask` line up)."""
    global _xgrammar_apply
    if _xgrammar_apply is None:
        try:
            from xgrammar import apply_token_bitmask_inplace as _xgrammar_apply
        except ImportError:
            _xgrammar_apply = False
    if _xgrammar_apply and logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous():
        _xgrammar_apply(logits, bitmask)
        return
    V = logits.shape[-1]
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    bits = (bitmask.to(logits.device).unsqueeze(-1) >> shifts) & 1
    allowed = bits.reshape(bitmask.shape[0], -1)[:, :V].bool()
    logits.masked_fill_(~allowed, float("-inf"))
