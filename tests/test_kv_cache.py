"""Block pool and prefix-cache bookkeeping, without a model."""

from pagedserve.engine.kv_cache import KVCacheManager
from pagedserve.engine.request import Request
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.scheduler import Scheduler


def req(rid, tokens, max_tokens=8, priority=0):
    return Request(rid, list(tokens), SamplingParams(), max_tokens=max_tokens, priority=priority)


def test_blocks_on_demand_and_freed():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    r = req("a", range(10))
    assert kv.allocate_slots(r, 10)
    assert len(kv.block_ids("a")) == 3  # ceil(10 / 4), not max_model_len's worth
    r.num_computed_tokens = 10
    r.append_token(99)
    assert kv.allocate_slots(r, 1) and len(kv.block_ids("a")) == 3  # slot 11 fits block 3
    r.num_computed_tokens = 11
    r.append_token(98)
    r.append_token(97)
    assert kv.allocate_slots(r, 2) and len(kv.block_ids("a")) == 4
    kv.free(r)
    assert kv.num_free_blocks == 10


def test_allocation_is_all_or_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    assert not kv.allocate_slots(req("a", range(20)), 20)
    assert kv.num_free_blocks == 3 and not kv.req_blocks.get("a")


def test_prefix_hits_chain_and_eviction():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    a = req("a", range(13))
    kv.allocate_slots(a, 13)
    a.num_computed_tokens = 13
    kv.cache_full_blocks(a)
    kv.free(a)
    b = req("b", list(range(8)) + [50, 51, 52, 53, 54])  # shares the first two blocks only
    blocks, n = kv.get_computed_blocks(b)
    assert n == 8 and len(blocks) == 2
    # A prompt that is entirely cached still recomputes its last token.
    c = req("c", range(12))
    _, n = kv.get_computed_blocks(c)
    assert n == 8
    # Filling the pool evicts cached blocks: no hit afterwards.
    big = req("big", range(100, 124))
    assert kv.allocate_slots(big, 24)
    _, n = kv.get_computed_blocks(req("d", range(13)))
    assert n == 0


def test_scheduler_token_budget_and_chunking():
    kv = KVCacheManager(num_blocks=100, block_size=4)
    s = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=10)
    a, b = req("a", range(25)), req("b", range(3))
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 10}  # a's prompt is chunked; b waits for budget
    s.update_after_step(out)
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 10}
    s.update_after_step(out)
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 5, "b": 3}  # last chunk and a new prompt together


def test_preemption_picks_lowest_priority():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    s = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=100)
    hi, lo = req("hi", range(8), priority=0), req("lo", range(8), priority=5)
    s.add(lo)
    s.add(hi)
    out = s.schedule()
    assert set(out.num_scheduled_tokens) == {"hi", "lo"}
    s.update_after_step(out)
    hi.append_token(1)
    lo.append_token(1)
    out = s.schedule()  # each needs a third block; only hi can have one
    assert [r.request_id for r in out.preempted] == ["lo"]
    assert out.num_scheduled_tokens == {"hi": 1}
    assert lo.num_computed_tokens == 0 and kv.block_ids("lo") == []
