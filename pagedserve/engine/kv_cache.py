"""Paged KV cache bookkeeping: the block pool and the prefix cache.

This module is the only owner of block ids. The scheduler asks three questions of it
(how many tokens of this prompt are cached, can these slots be allocated, free this request)
and never sees a free list or a hash. The KV tensors themselves live with the model runner;
this module deals in block ids only.

Prefix caching: a full block is identified by a hash of its tokens chained with the hash of the
block before it, so equal hashes mean equal prefixes. A freed block keeps its hash and stays
findable until the pool must reuse it (least recently freed first), so a later request with the
same prefix picks it up without recomputing it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from pagedserve.engine.request import Request


def hash_block(parent: bytes | None, tokens: list[int]) -> bytes:
    """Chained block hash. blake2b (not Python's hash()) so a collision cannot hand one
    tenant's KV to another in practice."""
    h = hashlib.blake2b(digest_size=16)
    if parent is not None:
        h.update(parent)
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return h.digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None


class BlockPool:
    def __init__(self, num_blocks: int):
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order (least recently freed first); O(1) removal on a cache hit.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # block hash -> block id

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> Block:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its cached content
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return block

    def touch(self, block: Block) -> None:
        if block.ref_count == 0:
            del self.free[block.block_id]
        block.ref_count += 1

    def release(self, block: Block) -> None:
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block.block_id} released twice"
        if block.ref_count == 0:
            self.free[block.block_id] = None

    def register(self, block: Block, block_hash: bytes) -> None:
        if block_hash not in self.cached:
            block.hash = block_hash
            self.cached[block_hash] = block.block_id

    def lookup(self, block_hash: bytes) -> Block | None:
        block_id = self.cached.get(block_hash)
        return None if block_id is None else self.blocks[block_id]


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.req_blocks: dict[str, list[Block]] = {}
        self.req_hashes: dict[str, list[bytes]] = {}  # hashes of a request's full blocks
        # Counters read by metrics (tokens, as vLLM counts them).
        self.prefix_queries = 0
        self.prefix_hits = 0

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def _hashes(self, req: Request, num_full_blocks: int) -> list[bytes]:
        hashes = self.req_hashes.setdefault(req.request_id, [])
        bs = self.block_size
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, req.all_token_ids[i * bs : (i + 1) * bs]))
        return hashes

    def get_computed_blocks(self, req: Request) -> tuple[list[Block], int]:
        """Cached blocks matching the request's leading tokens, and how many tokens they cover.
        At least the last token is always left to compute: its logits are needed. A request that
        wants prompt logprobs reads nothing from the cache (as in vLLM): a cached position's
        logits would never be computed. Its blocks are still cached for others."""
        if not self.enable_prefix_caching or req.request_id in self.req_blocks:
            return [], 0
        if req.sampling_params.prompt_logprobs is not None:
            return [], 0
        max_blocks = (req.num_tokens - 1) // self.block_size
        hits: list[Block] = []
        for h in self._hashes(req, max_blocks):
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
        self.prefix_queries += req.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    # -- changes ---------------------------------------------------------------------------
    def allocate_slots(
        self, req: Request, num_new_tokens: int, computed_blocks: list[Block] | None = None
    ) -> bool:
        """Make room for `num_new_tokens` more tokens after the computed ones. All or nothing."""
        computed_blocks = computed_blocks or []
        blocks = self.req_blocks.get(req.request_id, [])
        num_computed = req.num_computed_tokens + len(computed_blocks) * self.block_size
        needed = -(-(num_computed + num_new_tokens) // self.block_size)
        num_new_blocks = needed - len(blocks) - len(computed_blocks)
        # Cached blocks that sit in the free list stop being free once touched.
        reviving = sum(1 for b in computed_blocks if b.ref_count == 0)
        if num_new_blocks + reviving > self.pool.num_free:
            return False
        blocks = self.req_blocks.setdefault(req.request_id, blocks)
        for b in computed_blocks:
            self.pool.touch(b)
            blocks.append(b)
        for _ in range(max(num_new_blocks, 0)):
            blocks.append(self.pool.allocate())
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Register the request's blocks that are now full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        blocks = self.req_blocks.get(req.request_id)
        if not blocks:
            return
        # (a token in flight, --async-scheduling, is computed but not yet known: its block waits)
        num_full = min(min(req.num_computed_tokens, req.num_tokens) // self.block_size, len(blocks))
        for block, h in zip(blocks[:num_full], self._hashes(req, num_full)):
            if block.hash is None:
                self.pool.register(block, h)

    def free(self, req: Request) -> None:
        blocks = self.req_blocks.pop(req.request_id, [])
        # Tail blocks first, so they are evicted before the shared prefix blocks.
        for block in reversed(blocks):
            self.pool.release(block)
        # Hashes depend only on tokens; a preempted request keeps them for its recompute.
        if req.finished:
            self.req_hashes.pop(req.request_id, None)

    def num_allocated_slots(self) -> int:
        return sum(len(b) for b in self.req_blocks.values()) * self.block_size
