"""This process's place in the tensor-parallel group, and the two collectives the model needs.

Megatron-style: attention heads and MLP widths (each expert's too) are split over the ranks, so
each rank's attention output projection and MLP down projection give partial sums: one all-reduce
after attention and one after the MLP make every rank's residual stream whole again. The
vocabulary is split too: the embedding lookup is a masked lookup plus an all-reduce, the output
head's logits are gathered. With one rank (the default) every call here is free.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass

import torch

# Seconds this process has spent in the model's collectives (benchmarks/tensor_parallel.py reads it).
COMM_SECONDS = [0.0]


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place (partial sums of a split matmul)."""
        if self.size > 1:
            import torch.distributed as dist

            t0 = time.perf_counter()
            dist.all_reduce(x)
            COMM_SECONDS[0] += time.perf_counter() - t0
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x [..., n] side by side: [..., size * n] (vocabulary shards of the logits)."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def min_int(self, n: int) -> int:
        """The smallest of every rank's n (a KV block count all ranks can hold)."""
        if self.size == 1:
            return n
        import torch.distributed as dist

        t = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


_STATE = TensorParallel()


def tp() -> TensorParallel:
    return _STATE


def init_tensor_parallel(rank: int, size: int, master_addr: str, master_port: int, backend: str,
                         timeout_s: float = 120.0) -> TensorParallel:
    """Join the group (rank 0 is the engine's process); gloo on CPU, NCCL on CUDA."""
    import torch.distributed as dist

    global _STATE
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                                world_size=size, timeout=datetime.timedelta(seconds=timeout_s))
    _STATE = TensorParallel(rank, size)
    return _STATE


def shutdown_tensor_parallel() -> None:
    """Leave the group (after the workers stopped): a later engine in this process starts afresh.
    One tensor-parallel engine per process at a time: the group is this process's."""
    import torch.distributed as dist

    global _STATE
    if dist.is_initialized():
        dist.destroy_process_group()
    _STATE = TensorParallel()
