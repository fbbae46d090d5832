"""How the CPU engine asks Linux for memory.

Five measured costs, each avoided here:
- TLB misses: decode attention jumps between scattered KV blocks; on 4 KiB pages each jump is a
  TLB miss. The KV cache asks for transparent huge pages (2 MiB).
- The same for weights: every decode step streams them all, a TLB miss and a stopped hardware
  prefetch each 4 KiB. Packed weights are copied onto huge pages (HugePageArena).
- Writing GiBs of zeros at start-up: the cache is calloc'ed, so the OS zero-fills each page on
  first touch instead (a 4 GiB cache took 4 s to zero).
- Page faults on every step: glibc hands large freed blocks back to the OS (munmap, a trimmed
  heap), so a later step's activations fault their pages in again and the kernel zeroes them.
  A 64-request offline run faulted 40k-450k pages during generation (varying with how
  allocations interleave); with keep_freed_memory() 7k-12k. Alone, a 512-token chunk's 6 MiB
  gate/up projection output ran at 165 GFLOP/s when freshly faulted and 196 when reused.
- Faulting the KV cache in while serving: the first write to each cache page stalls the K/V store
  of a step (and the other thread at its barrier) while the OS finds, zeroes and maps a page; in a
  VM the host may have to back it first. Measured: 2 GiB took 0.13-6 s to fault in (6 s and 3 s
  in a Firecracker VM whose host had not yet backed the memory), and K/V stores were 7.8% of a
  64-request offline run. populate() faults the cache in up front, off the engine's thread.
"""

from __future__ import annotations

import ctypes
import logging
import mmap

import numpy as np
import torch

log = logging.getLogger("pagedserve.runner")

_HUGE = 2 << 20  # x86-64's transparent huge page


def advise_huge_pages(t: torch.Tensor) -> None:
    """Ask Linux for transparent huge pages under a large CPU tensor (before its first touch):
    decode attention jumps between scattered blocks, and 4 KiB pages make each jump a TLB miss.
    Measured ~11% faster decode attention. Best effort: silently skipped where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        start = (t.data_ptr() + _HUGE - 1) // _HUGE * _HUGE
        end = (t.data_ptr() + t.numel() * t.element_size()) // _HUGE * _HUGE
        if end > start:
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 14)  # MADV_HUGEPAGE
    except (OSError, AttributeError):  # no libc madvise (not Linux)
        pass


def lazily_zeroed_cpu_tensor(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor whose pages the OS zero-fills on first touch: a fresh private anonymous
    mapping, so startup does not write GiBs of zeros (4 GiB took 4 s). Not calloc: glibc may hand
    out heap memory it has already touched (then it writes the zeros itself, and the pages are
    4 KiB ones before any advice: a weight arena after packing got no huge page at all)."""
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    # Start at a 2 MiB boundary, so cache rows are whole cache lines and huge pages cover the tensor.
    raw = np.frombuffer(mmap.mmap(-1, nbytes + _HUGE, flags=mmap.MAP_PRIVATE), dtype=np.uint8)
    skip = -raw.ctypes.data % _HUGE
    t = torch.from_numpy(raw[skip : skip + nbytes]).view(dtype).view(shape)
    advise_huge_pages(t)  # before the first touch, so the lazily faulted pages can be huge
    return t


def mapping_kib(ptr: int, field: str) -> int:
    """A field (KiB) of /proc/self/smaps for the mapping that holds address `ptr`: `Rss`,
    `AnonHugePages` (how much of it the OS backs with huge pages), ..."""
    cur = None
    with open("/proc/self/smaps") as f:
        for line in f:
            if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                lo, hi = line.split(" ", 1)[0].split("-")
                cur = (int(lo, 16), int(hi, 16))
            elif cur and cur[0] <= ptr < cur[1] and line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(f"no mapping holds {ptr:#x}, or it has no {field}")


class HugePageArena:
    """One buffer on transparent huge pages that tensors are copied into end to end, in the order
    placed. Packed weights go here, in the order the layers stream them: every decode step reads
    them all, and on 4 KiB pages each page is a TLB miss and a stop for the hardware prefetchers.
    One buffer rather than one per tensor, because most of a small model's weights are under a
    huge page each (SmolLM2's int4 projections are 0.1-0.5 MiB). Measured on packed float32/bf16
    GEMMs streaming 330-650 MB, alternating in one process: 4-10% faster at 1-16 rows. Each copy
    starts on a 4 KiB boundary (as a fresh mapping did). The buffer's pages are faulted in as it is
    filled, so a caller that drops each source as it places its copy stays near one copy resident."""

    ALIGN = 4096

    def __init__(self, nbytes: list[int]):
        self.total = sum(self.padded(n) for n in nbytes)
        self._buf = lazily_zeroed_cpu_tensor((max(self.total, 1),), torch.uint8)
        self._next = 0

    @classmethod
    def padded(cls, nbytes: int) -> int:
        return -(-nbytes // cls.ALIGN) * cls.ALIGN

    def huge_fraction(self) -> float:
        """The share of the buffer the OS backs with huge pages now (0 where it gave none)."""
        try:
            return mapping_kib(self._buf.data_ptr(), "AnonHugePages") * 1024 / max(self.total, 1)
        except (OSError, LookupError):  # not Linux
            return 0.0

    def place(self, t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        if self._next + n > self.total:
            raise ValueError(f"the arena holds {self.total} bytes: no room for {n} more at {self._next}")
        out = self._buf[self._next : self._next + n].view(t.dtype).view(t.shape).copy_(t)
        self._next += self.padded(n)
        return out


_MADV_POPULATE_WRITE = 23  # Linux 5.14+


def populate(t: torch.Tensor, chunk: int = 64 << 20) -> float:
    """Fault in (write-map) every page of a large CPU tensor now; returns the seconds it took.

    madvise(MADV_POPULATE_WRITE) maps the pages without writing them (the OS zero-fills them as a
    first touch would); kernels before 5.14 refuse it, and then one byte per 4 KiB page is
    written. In 64 MiB chunks: the call holds the process's memory-map lock, which a concurrent
    large allocation would otherwise wait behind for seconds. ctypes drops the GIL during the
    call, so this can run on a background thread while the engine steps."""
    import time

    t0 = time.perf_counter()
    nbytes = t.numel() * t.element_size()
    start = t.data_ptr() // 4096 * 4096
    end = t.data_ptr() + nbytes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for off in range(start, end, chunk):
            if libc.madvise(ctypes.c_void_p(off), ctypes.c_size_t(min(chunk, end - off)), _MADV_POPULATE_WRITE):
                raise OSError(ctypes.get_errno(), "madvise(MADV_POPULATE_WRITE) refused")
    except (OSError, AttributeError):  # older kernel, not Linux: touch a byte per page instead
        flat = t.view(-1).view(torch.uint8)
        for off in range(0, nbytes, chunk):
            flat[off : off + chunk : 4096].zero_()
    return time.perf_counter() - t0


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse: allocations up to 32 MiB (its ceiling for this
    setting; a 512-token chunk's largest activation is 6 MiB) come from the heap rather than
    fresh mappings, and the heap is never trimmed. The engine's activations reach a steady
    size after a few steps, so this holds tens of MiB, not a leak. False where not glibc."""
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    if not ok:
        log.debug("mallopt refused; freed memory goes back to the OS")
    return ok
