"""Block pool and prefix-cache bookkeeping, without a model."""

from pagedserve.engine.kv_cache import KVCacheManager
from pagedserve.engine.request import Request, RequestStatus
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


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _step(s: Scheduler, clock: _Clock, dt: float = 0.125):  # exact in binary: no rounding at the target
    """One engine step on a fake clock: schedule, compute, and a token for every request whose
    tokens are all computed (what the engine samples)."""
    out = s.schedule()
    s.update_after_step(out)
    for r in out.requests:
        if r.num_computed_tokens == r.num_tokens:
            r.append_token(7)
    clock.t += dt
    return out


def _full_batch(ttft_target_s, decodes=16, budget=16):
    """`decodes` running requests that fill the token budget every step, then a 40-token prompt."""
    clock = _Clock()
    kv = KVCacheManager(num_blocks=1000, block_size=4)
    s = Scheduler(kv, max_num_seqs=64, max_num_batched_tokens=budget, ttft_target_s=ttft_target_s, clock=clock)
    running = [Request(f"d{i}", [1], SamplingParams(), max_tokens=1000, arrival_time=0.0, seq_no=i)
               for i in range(decodes)]
    for r in running:
        s.add(r)
    _step(s, clock)
    assert all(r.num_output_tokens == 1 for r in running)
    prompt = Request("p", list(range(40)), SamplingParams(), max_tokens=5, arrival_time=clock.t, seq_no=decodes)
    s.add(prompt)
    return s, clock, running, prompt


def test_ttft_target_bounds_a_prompts_wait_behind_a_full_batch_of_decodes():
    """Step level, deterministic: decodes that fill the budget starve a new prompt for as long as
    they run; with a TTFT target the prompt goes first once it has waited that long (0.5 s =
    4 steps here), its 40 tokens take ceil(40/16) = 3 steps, and the decodes, paused (not
    preempted: their blocks stay) for those steps, resume."""
    s, clock, running, prompt = _full_batch(None)
    for _ in range(30):
        _step(s, clock)
    assert prompt.num_computed_tokens == 0 and s.num_prompt_first_steps == 0  # starved: no bound

    s, clock, running, prompt = _full_batch(0.5)
    t0, blocks = clock.t, {r.request_id: len(s.kv.block_ids(r.request_id)) for r in running}
    steps = 0
    while prompt.num_output_tokens == 0:
        out = _step(s, clock)
        steps += 1
        assert not out.preempted
    assert clock.t - t0 == 0.5 + 3 * 0.125 and steps == 4 + 3  # its TTFT: the target + its prefill
    assert s.num_prompt_first_steps == 3 and all(len(s.kv.block_ids(r.request_id)) >= blocks[r.request_id]
                                                 for r in running)
    before = [r.num_output_tokens for r in running]
    out = _step(s, clock)  # no prompt is late: running requests in order again, decodes first
    assert [r.request_id for r in out.requests][:16] == [r.request_id for r in running]
    assert [r.num_output_tokens for r in running] == [n + 1 for n in before]


def test_ttft_target_keeps_better_priority_decodes_and_uses_leftover_budget():
    """A prompt that goes ahead does not pass decodes of a better priority, and decodes of its own
    priority use the budget its chunk leaves."""
    s, clock, running, prompt = _full_batch(0.0, decodes=4, budget=16)
    vip = Request("vip", [1, 2], SamplingParams(), max_tokens=1000, priority=-1, arrival_time=clock.t,
                  seq_no=99)
    s.add(vip)
    out = s.schedule()
    assert out.num_scheduled_tokens["vip"] == 2 and out.num_scheduled_tokens["p"] == 14
    assert sum(out.num_scheduled_tokens.values()) == 16 and not any(r in out.requests for r in running)
    s.update_after_step(out)
    vip.append_token(7)
    clock.t += 0.125
    out = s.schedule()  # p's last 26 tokens don't fit: the budget is the prompt's after vip's decode
    assert out.num_scheduled_tokens == {"vip": 1, "p": 15}


def test_ttft_target_flag_and_config_refuse_bad_values(capsys):
    import pytest

    from pagedserve.cli import build_parser
    from pagedserve.config import EngineConfig

    p = build_parser()
    assert p.parse_args(["serve", "--ttft-target-ms", "250"]).ttft_target_ms == 250.0
    assert p.parse_args(["serve", "--ttft-target-ms", "off"]).ttft_target_ms is None
    for bad in ("-3", "soon", "nan"):
        with pytest.raises(SystemExit):
            p.parse_args(["serve", "--ttft-target-ms", bad])
        assert "not a TTFT target" in capsys.readouterr().err
    with pytest.raises(ValueError, match="ttft_target_ms must be >= 0"):
        EngineConfig(ttft_target_ms=-1)


def test_ttft_target_never_stalls_a_full_cache():
    """An overdue prompt that cannot get blocks must not stop the decodes that need one: the step
    becomes an ordinary one and preempts, so the engine always makes progress."""
    clock = _Clock()
    kv = KVCacheManager(num_blocks=8, block_size=4)
    s = Scheduler(kv, max_num_seqs=16, max_num_batched_tokens=64, ttft_target_s=0.5, clock=clock)
    running = [Request(f"d{i}", list(range(8)), SamplingParams(), max_tokens=8, arrival_time=0.0, seq_no=i)
               for i in range(4)]  # each fits the cache alone (16 tokens), not all four at once
    for r in running:
        s.add(r)
    _step(s, clock)  # 4 prompts of 8 tokens: all 8 blocks, and each decode now needs a third
    assert kv.num_free_blocks == 0 and all(r.num_output_tokens == 1 for r in running)
    s.add(Request("late", [1, 2, 3], SamplingParams(), max_tokens=5, arrival_time=0.0, seq_no=9))
    clock.t = 1.0
    out = s.schedule()
    assert out.requests and out.preempted  # progress: decodes ran, the tail was preempted for blocks
    for _ in range(200):  # and everything finishes
        if not s.has_work():
            break
        out = s.schedule()
        assert out.requests
        s.update_after_step(out)
        for r in out.requests:
            if r.num_computed_tokens == r.num_tokens:
                r.append_token(7)
                if r.num_output_tokens >= r.max_tokens:
                    s.finish(r, RequestStatus.FINISHED_LENGTH)
        clock.t += 0.125
    assert not s.has_work()


def test_background_requests_take_a_bounded_share_beside_foreground_ones():
    """engine/background.py: with foreground (priority < 10) requests running, background ones
    (batch lines) are admitted up to share x foreground sequences and their prompts get a few
    tokens a step; with no foreground request they take the whole engine."""
    from pagedserve.engine.background import BackgroundPolicy

    kv = KVCacheManager(num_blocks=400, block_size=4)
    s = Scheduler(kv, max_num_seqs=64, max_num_batched_tokens=1000,
                  background=BackgroundPolicy(priority=10, share=0.5, prefill_tokens=16))
    fg = [req(f"fg{i}", range(100 + 8 * i, 108 + 8 * i), max_tokens=50) for i in range(4)]
    bg = [req(f"bg{i}", range(500 + 40 * i, 540 + 40 * i), max_tokens=50, priority=10) for i in range(10)]
    for r in bg + fg:
        s.add(r)
    out = s.schedule()
    got = out.num_scheduled_tokens
    assert all(got[r.request_id] == 8 for r in fg)  # foreground first, whole prompts
    admitted = [r for r in bg if r.request_id in got]
    assert len(admitted) == 1 and got[admitted[0].request_id] == 16  # seats 0.5 x 4 = 2, but 16 prefill tokens a step
    s.update_after_step(out)
    for _ in range(6):  # prompts of 40 tokens go in 16-token chunks; at most 2 background sequences
        out = s.schedule()
        assert sum(n for rid, n in out.num_scheduled_tokens.items() if rid.startswith("bg") and n > 1) <= 16
        assert sum(1 for r in s.running if r.priority >= 10) <= 2
        s.update_after_step(out)
        for r in out.requests:
            if r.num_computed_tokens == r.num_tokens:
                r.append_token(7)
    assert sum(1 for r in s.running if r.priority >= 10) == 2
    for r in fg:  # the foreground goes: the background takes everything
        s.finish(r, RequestStatus.FINISHED_STOPPED)
    out = s.schedule()
    assert sum(1 for r in s.running if r.priority >= 10) == 10
    assert sum(out.num_scheduled_tokens.values()) > 16
    s.update_after_step(out)
    for r in out.requests:  # each sampled a token: one to compute next step
        if r.num_computed_tokens == r.num_tokens:
            r.append_token(7)
    # A chat arrives while the batch has the engine: only the oldest `share` background sequences
    # keep stepping (the others pause, their blocks kept); the chat's prompt goes whole.
    chat = req("chat", range(900, 930), max_tokens=5)
    s.add(chat)
    held = kv.num_free_blocks
    out = s.schedule()
    bg_now = [rid for rid in out.num_scheduled_tokens if rid.startswith("bg")]
    assert out.num_scheduled_tokens["chat"] == 30 and bg_now == ["bg0"]  # seq_limit(1) = max(1, 0.5)
    assert sum(1 for r in s.running if r.priority >= 10) == 10 and kv.num_free_blocks <= held  # paused, not freed
