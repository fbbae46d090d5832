"""Engine behaviour: preemption, prefix caching, leaks, aborts, priorities, stop conditions."""

import pytest

from conftest import assert_no_leaks
from pagedserve import LLM, SamplingParams
from pagedserve.engine.sampling_params import OutputKind
from prompts import SHORT, long_prompt


def run_all(eng, outs=None):
    outs = {} if outs is None else outs
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
    return outs


def test_preemption_under_tiny_budget_gives_same_outputs(llm, default_model_dir):
    tok = llm.get_tokenizer()
    prompts = [long_prompt(60 + 10 * i, tok) for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    ample = llm.generate(prompts, params, use_tqdm=False)
    # 24 blocks of 16 tokens: far less than 8 requests x ~8 blocks each need at once.
    small = LLM(str(default_model_dir), dtype="float32", max_model_len=256, kv_cache_memory=24 * 16 * 46080, max_num_seqs=8)
    assert small.engine.kv.num_blocks == 24
    tight = small.generate(prompts, params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0, "the budget was meant to force preemption"
    for a, b in zip(ample, tight):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert_no_leaks(small.engine)


def test_prefix_cache_hit_counted_and_output_identical(llm, default_model_dir):
    tok = llm.get_tokenizer()
    shared = long_prompt(300, tok)
    a, b = shared + " the river.", shared + " the market."
    params = SamplingParams(temperature=0, max_tokens=20)
    no_cache = LLM(str(default_model_dir), dtype="float32", max_model_len=1024, kv_cache_memory=64 << 20, enable_prefix_caching=False)
    ref = no_cache.generate(b, params, use_tqdm=False)[0]
    assert ref.num_cached_tokens == 0
    hits_before = llm.engine.kv.prefix_hits
    llm.generate(a, params, use_tqdm=False)
    out = llm.generate(b, params, use_tqdm=False)[0]
    assert out.num_cached_tokens >= 256, out.num_cached_tokens
    assert llm.engine.kv.prefix_hits - hits_before >= 256
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    assert_no_leaks(llm.engine)


def test_prompt_logprobs_are_never_served_from_the_prefix_cache(llm):
    """A prompt already in the cache, asked again with prompt_logprobs: every position gets its
    entry again (a cached position's logits would never be computed), the same as the first time."""
    ids = llm.get_tokenizer()(long_prompt(120, llm.get_tokenizer())).input_ids
    p = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0)
    first = llm.generate([ids], p, use_tqdm=False)[0]
    again = llm.generate([ids], p, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0 and len(again.prompt_logprobs) == len(ids)
    assert all(tok in e for tok, e in zip(ids[1:], again.prompt_logprobs[1:]))
    assert repr(again.prompt_logprobs) == repr(first.prompt_logprobs)
    plain = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)[0]
    assert plain.num_cached_tokens >= 112  # the blocks were cached all along, for requests without them
    assert_no_leaks(llm.engine)


def test_seeded_sampling_independent_of_batch(llm):
    p = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate("Write a short poem about autumn:", p, use_tqdm=False)[0].outputs[0]
    others = [SamplingParams(temperature=1.0, max_tokens=10 + i, ignore_eos=True) for i in range(6)]
    batch = llm.generate(
        SHORT[:6] + ["Write a short poem about autumn:"] + SHORT[6:9],
        others + [p] + others[:3], use_tqdm=False,
    )
    assert batch[6].outputs[0].token_ids == alone.token_ids
    assert batch[6].outputs[0].text == alone.text
    again = llm.generate("Write a short poem about autumn:", p, use_tqdm=False)[0].outputs[0]
    assert again.token_ids == alone.token_ids
    other_seed = llm.generate("Write a short poem about autumn:", SamplingParams(
        temperature=0.9, top_p=0.95, top_k=50, seed=99, max_tokens=24, ignore_eos=True), use_tqdm=False)[0]
    assert other_seed.outputs[0].token_ids != alone.token_ids
    assert_no_leaks(llm.engine)


def test_n_samples_share_prompt_blocks(llm):
    tok = llm.get_tokenizer()
    prompt = long_prompt(100, tok)
    hits = llm.engine.kv.prefix_hits
    out = llm.generate(prompt, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 12 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    # Siblings 1 and 2 found the first one's full prompt blocks in the cache.
    full_blocks = (len(tok(prompt).input_ids) - 1) // 16
    assert llm.engine.kv.prefix_hits - hits >= 2 * full_blocks * 16
    assert_no_leaks(llm.engine)


def test_abort_frees_blocks(llm):
    eng = llm.engine
    eng.add_request("a1", "Tell me a long story about dragons.", SamplingParams(max_tokens=200, ignore_eos=True))
    eng.add_request("a2", "Another story.", SamplingParams(max_tokens=200, ignore_eos=True, n=2))
    for _ in range(3):
        eng.step()
    assert eng.kv.num_free_blocks < eng.kv.num_blocks
    eng.abort_request("a1")
    eng.abort_request("a2")
    outs = run_all(eng)
    assert outs["a1"].outputs[0].finish_reason == "abort"
    assert {c.finish_reason for c in outs["a2"].outputs} == {"abort"}
    assert_no_leaks(eng)


def test_priority_runs_first(default_model_dir):
    llm = LLM(str(default_model_dir), max_model_len=512, kv_cache_memory=32 << 20, max_num_seqs=1)
    eng = llm.engine
    p = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    eng.add_request("low", "low priority request", p, priority=10)
    eng.add_request("high", "high priority request", p, priority=-1)
    order = [o.request_id for o in run_all_ordered(eng)]
    assert order == ["high", "low"]


def run_all_ordered(eng):
    res = []
    while eng.has_unfinished_requests():
        res.extend(o for o in eng.step() if o.finished)
    return res


def test_stop_string_and_stop_tokens(llm):
    base = llm.generate("1, 2, 3, 4, 5,", SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0].outputs[0]
    assert " 8" in base.text
    out = llm.generate("1, 2, 3, 4, 5,", SamplingParams(temperature=0, max_tokens=20, stop=[" 8", "zzz"]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == " 8"
    assert out.text == base.text[: base.text.index(" 8")]
    inc = llm.generate("1, 2, 3, 4, 5,", SamplingParams(temperature=0, max_tokens=20, stop=" 8", include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert inc.text.endswith(" 8")
    stop_tok = base.token_ids[3]
    out = llm.generate("1, 2, 3, 4, 5,", SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_tok]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base.token_ids[: base.token_ids.index(stop_tok) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok


def test_eos_min_tokens_and_length(llm):
    chat = [{"role": "user", "content": "Say hi."}]
    short = llm.chat(chat, SamplingParams(temperature=0, max_tokens=100), use_tqdm=False)[0].outputs[0]
    assert short.finish_reason == "stop" and short.token_ids[-1] == 2 and len(short.token_ids) < 100
    longer = llm.chat(chat, SamplingParams(temperature=0, max_tokens=100, min_tokens=len(short.token_ids) + 5), use_tqdm=False)[0].outputs[0]
    assert len(longer.token_ids) >= len(short.token_ids) + 5
    capped = llm.chat(chat, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0].outputs[0]
    assert capped.finish_reason == "length" and len(capped.token_ids) == 3
    forced = llm.chat(chat, SamplingParams(temperature=0, max_tokens=len(short.token_ids) + 10, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(forced.token_ids) == len(short.token_ids) + 10


def test_logprobs_and_prompt_logprobs(llm):
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=5, logprobs=3, prompt_logprobs=2), use_tqdm=False)[0]
    c = out.outputs[0]
    assert len(c.logprobs) == 5
    for tok, pos in zip(c.token_ids, c.logprobs):
        assert pos[tok].rank == 1  # greedy picks the most likely token
        assert 3 <= len(pos) <= 4
        assert all(lp.logprob <= 0 for lp in pos.values())
    assert abs(c.cumulative_logprob - sum(p[t].logprob for t, p in zip(c.token_ids, c.logprobs))) < 1e-4
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for tok, pos in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        assert tok in pos


def test_penalties_and_bias_change_output(llm):
    prompt = "the the the the the the the the"
    base = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
    rep = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, repetition_penalty=2.0), use_tqdm=False)[0].outputs[0]
    freq = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, frequency_penalty=2.0, presence_penalty=1.0), use_tqdm=False)[0].outputs[0]
    assert rep.token_ids != base.token_ids
    assert len(set(freq.token_ids)) >= len(set(base.token_ids))
    banned = base.token_ids[0]
    biased = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=3, logit_bias={banned: -100}), use_tqdm=False)[0].outputs[0]
    assert banned not in biased.token_ids


def test_streaming_deltas_reassemble(llm):
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=30, output_kind=OutputKind.DELTA, stop=["\n\n\n"])
    eng.add_request("s", "Ünïcödé tëxt and emoji 🙂 are", params)
    text, toks = "", []
    while eng.has_unfinished_requests():
        for o in eng.step():
            text += o.outputs[0].text
            toks += o.outputs[0].token_ids
            assert "\ufffd" not in o.outputs[0].text
    final = llm.generate("Ünïcödé tëxt and emoji 🙂 are", SamplingParams(temperature=0, max_tokens=30, stop=["\n\n\n"]), use_tqdm=False)[0].outputs[0]
    assert text == final.text and toks == final.token_ids


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-5), "top_k"),
        (dict(min_p=2), "min_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(n=0), "n"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(logprobs=50), "logprobs"),
        (dict(min_tokens=10, max_tokens=5), "min_tokens"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts(llm):
    eng = llm.engine
    with pytest.raises(ValueError, match="empty"):
        llm.generate("", SamplingParams())
    with pytest.raises(ValueError, match="outside"):
        llm.generate([[1, 2, 10**7]], SamplingParams())
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[5] * 2048], SamplingParams())
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate([[5] * 2000], SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate("hi", SamplingParams(stop_token_ids=[10**6]))
    assert_no_leaks(eng)


def test_max_model_len_that_cannot_fit(default_model_dir):
    with pytest.raises(ValueError, match="--max-model-len"):
        LLM(str(default_model_dir), max_model_len=8192, kv_cache_memory=16 << 20)
