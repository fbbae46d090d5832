"""Decode steps replayed from CUDA graphs (issue 27): one launch per step instead of hundreds.

A decode step on a GPU is hundreds of small kernels (a few per layer), each launched from Python:
at small batches the launches, not the GPU, set the step time. Here each decode batch size in
`sizes` is captured once at start as a CUDA graph, and a pure-decode step of n requests replays
the smallest captured size >= n, padded.

What a graph needs, and how the step meets it:
  - fixed addresses: the inputs live in static device buffers: per size b, the first 5b entries
    of one int64 buffer are [ids | positions | slot blocks | slot offsets | context lens], and the
    block tables are the first b rows of a [max size, W] table, W the blocks of a max_model_len
    sequence. A step fills [those 5b | its tables, b x w] in a pinned host buffer (w: its longest
    table, not W: a 128k-token model has W = 8192), copies it in one transfer, spreads the w
    columns into the static table on the device, then replays. Columns past a row's context are
    never read, so they are left as they were;
  - fixed shapes: the padding rows (n..b) have slot block PAD_SLOT (-1: the K/V store writes
    nothing), context length 1 over an all-zero table row (they read block 0's first slot and are
    thrown away), token and position 0;
  - fixed launch grids: the Triton decode kernel's split count comes from the longest context,
    taken as max_model_len at capture (the splits past a sequence's end exit at once);
  - no host work inside: graphs apply to the Triton attention backend with one rank and dense
    MLPs (a MoE layer's expert loop reads its routing on the host), and to pure decode steps;
    prefill and mixed steps, prompt logprobs, and the LM head and sampler run eagerly.

Without a GPU (`capture=False`, the CPU tests) the same static buffers and padding run eagerly
through the same function, with the Triton kernels in the interpreter: what is checked on every
CI run is everything but the capture itself, which `scripts/check_cuda.py` checks on a GPU
(replay == eager, greedy token for token).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from pagedserve.model.attention import PAD_SLOT, AttentionMetadata

log = logging.getLogger("pagedserve.graphs")


def graphs_unsupported(model, backend_name: str, tp_size: int) -> str | None:
    """Why this model cannot be captured (None: it can)."""
    from pagedserve.model.moe import SparseMoE

    if backend_name != "triton":
        return f"the {backend_name} attention backend (graphs need --attention-backend triton)"
    if tp_size > 1:
        return "tensor parallelism (each rank would need its own graphs and NCCL inside them)"
    if any(isinstance(m, SparseMoE) for m in model.modules()):
        return "a Mixture-of-Experts layer (its expert loop reads the routing on the host)"
    return None


@dataclass
class _Graph:
    size: int
    graph: object | None  # torch.cuda.CUDAGraph, or None: replay runs the function eagerly
    out: torch.Tensor | None  # the captured output: hidden states [size, hidden]


class DecodeGraphs:
    def __init__(self, model, kv_caches, sizes: list[int], max_model_len: int, block_size: int,
                 device: torch.device, capture: bool = True):
        if not sizes:
            raise ValueError("no CUDA graph batch sizes to capture")
        self.model, self.kv_caches, self.sizes = model, kv_caches, sorted(sizes)
        self.max_model_len, self.block_size, self.device = max_model_len, block_size, device
        self.width = -(-max_model_len // block_size)  # block table columns
        top = self.sizes[-1]
        n = top * (5 + self.width)  # the most a step sends: 5 per row and full-width tables
        self.inputs = torch.zeros(n, dtype=torch.int64, device=device)
        self.tables = torch.zeros(top, self.width, dtype=torch.int64, device=device)
        hosts = [torch.zeros(n, dtype=torch.int64) for _ in range(2)]
        self.host = [h.pin_memory() for h in hosts] if device.type == "cuda" else hosts
        self.host_np = [h.numpy() for h in self.host]
        self._turn, self._copied = 0, [None, None]  # which host buffer is next; its transfer's event
        self.graphs: dict[int, _Graph] = {}
        self.capture_seconds = 0.0
        t0 = time.perf_counter()
        if capture:
            self._capture()
        else:
            self.graphs = {b: _Graph(b, None, None) for b in self.sizes}
        self.capture_seconds = time.perf_counter() - t0
        self.replays = 0

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def _views(self, b: int) -> tuple[torch.Tensor, ...]:
        """Size b's inputs in the static buffer: ids, positions, blocks, offsets, lens, tables."""
        x = self.inputs
        return x[0:b], x[b:2 * b], x[2 * b:3 * b], x[3 * b:4 * b], x[4 * b:5 * b], self.tables[:b]

    def _forward(self, b: int) -> torch.Tensor:
        ids, pos, blocks, offsets, lens, tables = self._views(b)
        meta = AttentionMetadata(slot_blocks=blocks, slot_offsets=offsets, num_decodes=b, decode_block_tables=tables,
                                 decode_context_lens=lens, decode_max_context=self.max_model_len, prefills=[],
                                 block_size=self.block_size)
        return self.model(ids, pos, self.kv_caches, meta, None)

    def _pad_inputs(self, b: int) -> None:
        """Size b's inputs as padding only (capture and warm-up write nothing to the cache)."""
        self.run(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64),
                 np.zeros(0, np.int64), [], size=b, replay=False)

    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        for b in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
            self._pad_inputs(b)
            # warm-up on a side stream, as torch's graph docs do: Triton compiles and library
            # workspaces are made outside the graph
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._forward(b)
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = self._forward(b)
            self.graphs[b] = _Graph(b, g, out)
        torch.cuda.synchronize(self.device)

    def fits(self, num_decodes: int) -> bool:
        return 0 < num_decodes <= self.max_size

    def run(self, ids: np.ndarray, positions: np.ndarray, blocks: np.ndarray, offsets: np.ndarray,
            lens: np.ndarray, tables: list[np.ndarray], size: int | None = None,
            replay: bool = True, fill=None) -> torch.Tensor | None:
        """One decode step of n = len(ids) requests: hidden states [n, hidden]. (`size`/`replay`:
        the inputs of a given size set up without running, for capture. `fill(ids)`: writes the
        tokens still in flight into the ids on the device, --async-scheduling.)"""
        n = len(ids)
        b = size or next(s for s in self.sizes if s >= n)
        # Two pinned host buffers in turn: with a step in flight (--async-scheduling) the last
        # step's transfer may not have run yet when this one is written.
        turn = self._turn
        self._turn ^= 1
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()
        w, h = max([len(t) for t in tables], default=1), self.host_np[turn]
        used = 5 * b + b * w
        h[:used] = 0  # padding rows: token 0 at position 0, context 1 over block 0 (read, never written)
        h[0:n], h[b:b + n] = ids, positions
        h[2 * b:3 * b] = PAD_SLOT
        h[2 * b:2 * b + n], h[3 * b:3 * b + n] = blocks, offsets
        h[4 * b:5 * b] = 1
        h[4 * b:4 * b + n] = lens
        rows = h[5 * b:used].reshape(b, w)
        for i, t in enumerate(tables):
            rows[i, :len(t)] = t
        # One transfer: pinned and asynchronous on a GPU (its buffer is refilled two steps later,
        # after the event says the transfer ran), then the tables' w columns into the static
        # table, on the device.
        self.inputs[:used].copy_(self.host[turn][:used], non_blocking=True)
        if self.device.type == "cuda":
            self._copied[turn] = torch.cuda.Event()
            self._copied[turn].record()
        if fill is not None:
            fill(self.inputs[0:b])
        self.tables[:b, :w].copy_(self.inputs[5 * b:used].view(b, w))
        if not replay:
            return None
        g = self.graphs[b]
        self.replays += 1
        if g.graph is None:
            return self._forward(b)[:n]
        g.graph.replay()
        return g.out[:n]
