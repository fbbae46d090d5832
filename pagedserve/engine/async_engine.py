"""The engine loop behind the server: a dedicated thread steps the engine while work exists.

Why a thread and not a process: torch releases the GIL inside its kernels, which is where a step
spends its time, so the asyncio side (HTTP parsing, SSE) runs between kernels; a thread needs no
IPC and no copies of outputs. (Measured in benchmarks/README.md: the HTTP side costs the step
loop a few percent at 64 streams.)

Requests are validated on the caller's thread (400 before anything is queued); additions and
aborts reach the engine thread through a command queue, outputs come back through each
request's asyncio.Queue. The thread records a heartbeat every step for /health.

The server builds the engine on that same thread (`AsyncEngine.build`), so one thread runs all of
torch's parallel kernels. libgomp counts the worker threads of every thread that ever started a
parallel region; once they outnumber the CPUs its idle workers stop spinning and sleep between
kernels, and each of the ~150 kernels in a decode step then pays a futex wake-up: on 2 cores a
batch-1 decode step took ~30% longer on the loop thread than on the thread that loaded the model
(measured, benchmarks/README.md). torch.set_num_threads is per thread too (--num-threads).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from pagedserve.engine.engine import LLMEngine
from pagedserve.engine.outputs import RequestOutput
from pagedserve.engine.sampling_params import SamplingParams

log = logging.getLogger("pagedserve.async_engine")


class EngineDeadError(RuntimeError):
    pass


class ShuttingDownError(EngineDeadError):
    """A request still running when the server's shutdown timeout ran out."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: LLMEngine, stall_timeout: float = 10.0):
        self.engine = engine
        self.stall_timeout = stall_timeout
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.heartbeat = time.monotonic()
        self.busy_since: float | None = None  # set while a step runs
        self.error: BaseException | None = None

    @classmethod
    def build(cls, make_engine: Callable[[], LLMEngine], stall_timeout: float = 10.0) -> AsyncEngine:
        """Build the engine on a new thread that then steps it (see the module docstring); the
        loop is running when this returns. Errors while building are raised here."""
        built: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                self = cls(make_engine(), stall_timeout)
            except BaseException as e:
                built.set_exception(e)
                return
            self._thread = threading.current_thread()
            built.set_result(self)
            self._loop()

        threading.Thread(target=run, name="engine-loop", daemon=True).start()
        return built.result()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:  # built by build(): already stepping
            return
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def health(self) -> tuple[bool, str]:
        """Alive and making progress: the thread runs, and no step has taken longer than
        stall_timeout (a wedged kernel or a deadlock shows up here within seconds)."""
        if self.error is not None:
            return False, f"engine loop died: {type(self.error).__name__}: {self.error}"
        if self._thread is None or not self._thread.is_alive():
            return False, "engine loop is not running"
        now = time.monotonic()
        busy = self.busy_since
        if busy is not None and now - busy > self.stall_timeout:
            return False, f"engine step has not returned for {now - busy:.1f}s"
        if now - self.heartbeat > self.stall_timeout + 1.0:
            return False, f"engine loop has not run for {now - self.heartbeat:.1f}s"
        return True, "ok"

    # -- requests --------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        """Requests queued but not running, including those not yet handed to the engine."""
        return self.engine.num_waiting + self._commands.qsize()

    def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Validate now (raises ValueError) and queue; the returned iterator yields outputs until
        the request finishes. Closing it early (client gone, timeout) aborts the request."""
        if self.error is not None:
            raise EngineDeadError(str(self.error))
        parent = self.engine.make_request(request_id, prompt, params, priority)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        self._commands.put(("add", parent))
        self._wake.set()
        return self._iterate(request_id, stream)

    async def _iterate(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def fail_all(self, error: BaseException) -> int:
        """End every unfinished request with `error` (each stream raises it, then aborts); how many."""
        rids = list(self._streams)
        for rid in rids:
            self._deliver(rid, error)
        return len(rids)

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._commands.put(("abort", request_id))
        self._wake.set()

    # -- the loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        eng = self.engine
        try:
            while not self._stop.is_set():
                self._drain_commands()
                if not eng.has_unfinished_requests():
                    broken = eng.runner.tp_health()  # a tensor-parallel rank gone while idle
                    if broken:
                        raise RuntimeError(broken)
                    self.heartbeat = time.monotonic()
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self.busy_since = time.monotonic()
                outputs = eng.step()
                self.busy_since = None
                self.heartbeat = time.monotonic()
                for out in outputs:
                    self._deliver(out.request_id, out)
        except BaseException as e:  # the engine is broken: fail every waiting stream, loudly
            self.error = e
            self.busy_since = None
            log.exception("engine loop died")
            for rid in list(self._streams):
                self._deliver(rid, EngineDeadError(f"engine loop died: {e}"))

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd == "add":
                if arg.request_id not in self._streams:  # its client left before it was queued
                    continue
                try:
                    self.engine.enqueue(arg)
                except ValueError as e:
                    self._deliver(arg.request_id, e)
            elif cmd == "abort":
                self.engine.abort_request(arg)

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
            except RuntimeError:  # the event loop is closed (shutdown)
                pass
