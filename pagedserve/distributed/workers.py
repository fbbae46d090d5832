"""The tensor-parallel ranks besides the engine's own (rank 0): processes started here, each
loading its shard of the model and its shard of the KV cache, then repeating what rank 0 tells it.

Rank 0 runs the scheduler and sampler; every step it broadcasts the step's inputs ("forward":
token ids, positions, attention metadata, rows) and, for sampling, the hidden rows whose logits it
needs ("logits"); every rank runs the same model code on its weights and meets the others in the
collectives inside (parallel.py). A worker that dies is seen before the next step (and by
/health): the step raises instead of waiting in a collective.
"""

from __future__ import annotations

import atexit
import logging
import pickle
import signal
import socket
import subprocess
import sys

log = logging.getLogger("pagedserve.distributed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_per_rank(ranks_here: int) -> int:
    """CPU: the cores this process may use (a pod's CPU limit included), shared evenly by this
    node's ranks (one each on two)."""
    from pagedserve.engine.cpu_threads import container_threads

    return max(1, container_threads()[0] // ranks_here)


class WorkerDied(RuntimeError):
    pass


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the engine's process dies, even by kill -9,
    so no rank outlives it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class WorkerGroup:
    """Ranks 1..size-1 as processes (--distributed-executor-backend mp): fresh interpreters
    (`python -m pagedserve.distributed.workers`, the engine config on stdin), so nothing of the
    engine's threads or of the caller's __main__ is copied or re-run."""

    def __init__(self, cfg, size: int, master_addr: str, master_port: int, ranks: range | None = None):
        self.procs = []
        self.ranks = ranks if ranks is not None else range(1, cfg.ranks_per_node)  # this node's, but rank 0
        for rank in self.ranks:
            p = subprocess.Popen([sys.executable, "-m", "pagedserve.distributed.workers"], stdin=subprocess.PIPE,
                                 preexec_fn=_die_with_parent if sys.platform == "linux" else None)
            p.stdin.write(pickle.dumps((cfg, rank, size, master_addr, master_port)))
            p.stdin.close()
            self.procs.append(p)
        self.stopped = False
        atexit.register(self.stop)

    def dead(self) -> str | None:
        """Why the group cannot step (a worker exited), or None."""
        for rank, p in zip(self.ranks, self.procs):
            if p.poll() is not None:
                return f"tensor-parallel worker rank {rank} exited (code {p.returncode})"
        return None

    def send(self, cmd: tuple) -> None:
        import torch.distributed as dist

        why = self.dead()
        if why:
            raise WorkerDied(why)
        dist.broadcast_object_list([to_device(cmd, "cpu", copy=True)], src=0)

    def stop(self, timeout: float = 10.0) -> None:
        """Tell the workers to stop and wait for them (terminate any that do not)."""
        if self.stopped:
            return
        self.stopped = True
        try:
            if self.dead() is None:
                import torch.distributed as dist

                self.send(("stop",))
                dist.barrier()  # every rank, remote nodes' too, has it: the group can be left cleanly
        except Exception:  # a worker already gone: the others are terminated below
            pass
        for p in self.procs:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.terminate()
                p.wait(5)


def to_device(obj, device, copy: bool = False):
    """obj with every tensor in it (tuples, lists, dataclasses such as AttentionMetadata) on device:
    rank 0 sends CPU tensors (copy: compact ones; a view would pickle its whole buffer), each rank
    moves them to its own device."""
    import dataclasses

    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(device).clone() if copy else obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(x, device, copy) for x in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_device(getattr(obj, f.name), device, copy)
                                           for f in dataclasses.fields(obj)})
    return obj


def receive(device) -> tuple:
    import torch.distributed as dist

    box = [None]
    dist.broadcast_object_list(box, src=0)
    return to_device(box[0], device)


def worker_main(cfg, rank: int, size: int, master_addr: str, master_port: int) -> None:
    """A worker process: join the group, load this rank's shard, follow rank 0 until "stop"."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s tp{rank} %(name)s: %(message)s")
    import torch

    from pagedserve.engine.model_runner import ModelRunner
    from pagedserve.model.arch import ModelArch
    from pagedserve.model.loader import dummy_or_weights, load_checkpoint, load_hf_config

    device = cfg.resolve_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg.num_threads or threads_per_rank(cfg.ranks_per_node))
    model_path, gguf_file = load_checkpoint(cfg.model)
    arch = ModelArch.from_hf_config(load_hf_config(model_path))
    runner = ModelRunner(cfg, arch, dummy_or_weights(cfg, model_path, gguf_file), cfg.max_model_len or
                         arch.max_position_embeddings, rank=rank, master=(master_addr, master_port))
    runner.follow()
    from pagedserve.distributed.parallel import shutdown_tensor_parallel

    shutdown_tensor_parallel()


def run_node(cfg) -> int:
    """A node other than node 0 (`pagedserve serve ... --node-rank K`): its ranks only, no API
    server; returns when they exit (0 when node 0 stopped them, else the first failure's code)."""
    import time

    per = cfg.ranks_per_node
    first = cfg.node_rank * per
    group = WorkerGroup(cfg, cfg.tensor_parallel_size, cfg.master_addr, cfg.master_port, range(first, first + per))
    log.info("node %d of %d: ranks %d-%d joining %s:%d", cfg.node_rank, cfg.nnodes, first, first + per - 1,
             cfg.master_addr, cfg.master_port)
    try:
        while True:
            codes = [p.poll() for p in group.procs]
            if any(c not in (None, 0) for c in codes):
                group.stop()
                return next(c for c in codes if c not in (None, 0))
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.5)
    except KeyboardInterrupt:
        group.stop()
        return 0


if __name__ == "__main__":
    worker_main(*pickle.loads(sys.stdin.buffer.read()))
