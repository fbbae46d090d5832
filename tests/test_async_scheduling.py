"""--async-scheduling (engine.step, model_runner.launch): one step in flight, its tokens filled into
the next step's inputs on the device. On a CPU the work is the same work in another order, so
every output must be exactly the synchronous engine's: tokens, logprobs, finish reasons."""

from __future__ import annotations

import pytest
from conftest import assert_no_leaks

from pagedserve import LLM, SamplingParams
from pagedserve.engine.structured_output import StructuredOutputsParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "List three colors:", "Write a haiku about the sea.", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def async_llm(default_model_dir):
    return LLM(str(default_model_dir), max_model_len=2048, kv_cache_memory=256 << 20, dtype="float32",
               async_scheduling=True)


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        assert len(x.outputs) == len(y.outputs)
        for ox, oy in zip(x.outputs, y.outputs):
            assert ox.token_ids == oy.token_ids and ox.text == oy.text
            assert ox.finish_reason == oy.finish_reason and ox.stop_reason == oy.stop_reason
            assert ox.logprobs == oy.logprobs
        assert x.prompt_logprobs == y.prompt_logprobs


def test_outputs_are_the_synchronous_engines(llm, async_llm):
    """Greedy and seeded sampling, logprobs, prompt logprobs, stop strings and stop tokens (the
    token in flight after a stop is thrown away), min_tokens (counted with the token in flight),
    n = 2 and lengths ending at different steps."""
    tok = llm.get_tokenizer()
    params = [
        SamplingParams(temperature=0, max_tokens=24, logprobs=2),
        SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=11, max_tokens=21, stop=["\n\n", "def "]),
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[tok.encode(" the")[-1]], prompt_logprobs=1),
        SamplingParams(temperature=0.7, seed=3, n=2, max_tokens=13, min_tokens=9),
        SamplingParams(temperature=0, max_tokens=1),
        SamplingParams(temperature=1.0, seed=5, max_tokens=32, min_p=0.05, stop=["."]),
    ]
    _same(llm.generate(PROMPTS, params, use_tqdm=False), async_llm.generate(PROMPTS, params, use_tqdm=False))
    assert_no_leaks(async_llm.engine)


def test_penalties_and_grammars_wait_for_their_tokens(llm, async_llm):
    """Penalties count every token and a grammar's mask follows them: while such a request may run,
    each step waits for the last one's tokens. Outputs stay the synchronous engine's."""
    person = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    params = [SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.3, frequency_penalty=0.5),
              SamplingParams(temperature=0, max_tokens=40, structured_outputs=StructuredOutputsParams(json=person)),
              SamplingParams(temperature=0, max_tokens=16)]
    prompts = PROMPTS[:3]
    _same(llm.generate(prompts, params, use_tqdm=False), async_llm.generate(prompts, params, use_tqdm=False))
    assert_no_leaks(async_llm.engine)
    assert async_llm.engine._host_token_parents == 0  # counted in, counted out: later steps overlap again


def test_one_step_is_in_flight(async_llm):
    """After a step that launched, each running request has one token the host has not seen; the
    next step brings it to the host while its own token goes in flight."""
    eng = async_llm.engine
    eng.add_request("flight", eng.tokenizer.encode("The sea is"), SamplingParams(temperature=0, max_tokens=5,
                                                                                 ignore_eos=True))
    eng.step()  # the prompt's step: its first token in flight
    req = eng.scheduler.running[0]
    assert req.num_inflight == 1 and req.num_output_tokens == 0
    eng.step()
    assert req.num_inflight == 1 and req.num_output_tokens == 1
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert req.num_output_tokens == 5 and req.num_inflight == 0
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 5
    assert_no_leaks(eng)


def test_abort_with_a_token_in_flight(llm, async_llm):
    eng = async_llm.engine
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for i, p in enumerate(PROMPTS[:3]):
        eng.add_request(f"ab{i}", eng.tokenizer.encode(p), sp)
    for _ in range(4):
        eng.step()
    assert any(r.num_inflight for r in eng.scheduler.running)
    eng.abort_request("ab1")
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    assert done["ab1"].outputs[0].finish_reason == "abort"
    want = llm.generate([PROMPTS[0], PROMPTS[2]], sp, use_tqdm=False)
    assert done["ab0"].outputs[0].token_ids == want[0].outputs[0].token_ids
    assert done["ab2"].outputs[0].token_ids == want[1].outputs[0].token_ids
    assert_no_leaks(eng)


def test_preemption_and_prefix_caching_with_tokens_in_flight(default_model_dir, llm):
    """A request preempted with a token in flight is readmitted only once that token is on the
    host; recompute and cached prefixes give the synchronous outputs (a float32 cache: exact)."""
    kw = dict(dtype="float32", max_model_len=256, max_num_seqs=8)
    block_bytes = 2 * 30 * 3 * 64 * 16 * 4
    small = LLM(str(default_model_dir), kv_cache_memory=40 * block_bytes, async_scheduling=True, **kw)
    prompts = [f"Story {i}: " + " ".join(["the river runs to the sea"] * (6 + i)) for i in range(8)]
    sp = SamplingParams(temperature=0, max_tokens=28, ignore_eos=True)
    got = small.generate(prompts, sp, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0, "the budget was meant to force preemption"
    _same(llm.generate(prompts, sp, use_tqdm=False), got)
    assert_no_leaks(small.engine)
    again = small.generate(prompts[-2:], sp, use_tqdm=False)  # the last ones' prefixes are still cached
    assert all(o.num_cached_tokens >= 16 for o in again)
    _same(got[-2:], again)


def test_the_flag_is_a_serve_flag(tiny_dirs, tmp_path):
    """`pagedserve serve --async-scheduling`: a stream through the official client, token for token
    what the synchronous engine writes."""
    from openai import OpenAI
    from server_utils import ServerProcess

    args = dict(kv_cache_memory=32 << 20, max_model_len=512)
    want = LLM(str(tiny_dirs["llama"]), **args).generate(
        "async", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)[0].outputs[0].text
    s = ServerProcess([str(tiny_dirs["llama"]), "--served-model-name", "tiny", "--kv-cache-memory", "32MiB",
                       "--max-model-len", "512", "--async-scheduling"], tmp_path / "serve.log")
    try:
        stream = OpenAI(base_url=s.base, api_key="x").completions.create(
            model="tiny", prompt="async", max_tokens=24, temperature=0, stream=True, extra_body={"ignore_eos": True})
        got = "".join(c.choices[0].text for c in stream)
    finally:
        assert s.stop() == 0
    assert want and got == want
