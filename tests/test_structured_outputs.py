"""Constrained decoding in the engine: every constraint kind on the default model, both backends,
greedy and sampled, mixed batches, preemption, aborts, and bad constraints."""

from __future__ import annotations

import json
import math
import re
from concurrent.futures import Future

import jsonschema
import pytest
from conftest import assert_no_leaks

from pagedserve import LLM, SamplingParams
from pagedserve.engine.structured_output import StructuredOutputManager, StructuredOutputsParams as SO
from pagedserve.engine.structured_output.manager import RequestGrammar
from pagedserve.engine.structured_output.schema_check import unsupported_keywords

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person as JSON: name, age and pets."}]


@pytest.fixture(params=["xgrammar", "guidance"])
def backend(request, llm):
    """Run a test on each backend: the shared engine's manager, swapped for the test."""
    eng = llm.engine
    saved = eng.structured
    eng.structured = StructuredOutputManager(eng.tokenizer, eng.arch.vocab_size, eng.eos_token_ids, request.param)
    yield request.param
    eng.structured.shutdown()
    eng.structured = saved


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_outputs_validate(llm, backend, temperature):
    params = SamplingParams(n=3, temperature=temperature, seed=7, max_tokens=120, structured_outputs=SO(json=PERSON))
    (out,) = llm.chat(ASK, params, use_tqdm=False)
    for c in out.outputs:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), PERSON)
    assert_no_leaks(llm.engine)


def test_regex_choice_and_grammars(llm, backend):
    cases = [
        (SO(regex=r"[A-Z][a-z]{2,8} \d{2}"), lambda t: re.fullmatch(r"[A-Z][a-z]{2,8} \d{2}", t)),
        (SO(choice=["red", "green", "dark \"blue\""]), lambda t: t in ("red", "green", 'dark "blue"')),
        (SO(grammar='root ::= "x=" [0-9]+ ";"'), lambda t: re.fullmatch(r"x=[0-9]+;", t)),
        (SO(grammar='start: "y=" NUM ";"\nNUM: /[0-9]+/'), lambda t: re.fullmatch(r"y=[0-9]+;", t)),
        (SO(json_object=True), lambda t: isinstance(json.loads(t), dict)),
    ]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=60, structured_outputs=so)
              for i, (so, _) in enumerate(cases)]
    outs = llm.generate(["Write something:"] * len(cases), params, use_tqdm=False)
    for (so, ok), o in zip(cases, outs):
        c = o.outputs[0]
        assert c.finish_reason == "stop" and ok(c.text), (so.kind, c.text)


def test_sampling_modes_penalties_and_logprobs_see_the_constrained_distribution(llm):
    choice = SO(choice=["yes", "no"])
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, min_p=0.05, repetition_penalty=1.3,
                            presence_penalty=0.5, frequency_penalty=0.5, seed=3, max_tokens=8, logprobs=5,
                            structured_outputs=choice)
    (out,) = llm.chat([{"role": "user", "content": "Is the sky blue?"}], params, use_tqdm=False)
    c = out.outputs[0]
    assert c.text in ("yes", "no")
    first = c.logprobs[0]
    # Only tokens that start an allowed answer appear, and they carry all of the probability.
    for tid in first:
        assert any(ans.startswith(tok.decode([tid])) for ans in ("yes", "no")), tok.decode([tid])
    assert math.isclose(sum(math.exp(lp.logprob) for lp in first.values()), 1.0, abs_tol=1e-3)


def test_grammar_end_stops_the_request_even_with_ignore_eos(llm):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, structured_outputs=SO(choice=["alpha", "beta"]))
    (out,) = llm.generate("Pick one:", params, use_tqdm=False)
    c = out.outputs[0]
    assert c.text in ("alpha", "beta") and c.finish_reason == "stop" and len(c.token_ids) < 30


def test_constraints_do_not_leak_into_neighbours(llm):
    """A batch mixing two schemas and unconstrained requests: the free ones match a run alone."""
    free = SamplingParams(temperature=0, max_tokens=24)
    prompts = ["The capital of France is", "List three colours:"]
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, free, use_tqdm=False)]
    other = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    mixed = llm.generate(
        [prompts[0], "JSON please:", prompts[1], "Another JSON:"],
        [free, SamplingParams(temperature=0, max_tokens=80, structured_outputs=SO(json=PERSON)), free,
         SamplingParams(temperature=0, max_tokens=20, structured_outputs=SO(json=other))],
        use_tqdm=False)
    assert [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids] == alone
    jsonschema.validate(json.loads(mixed[1].outputs[0].text), PERSON)
    jsonschema.validate(json.loads(mixed[3].outputs[0].text), other)
    assert_no_leaks(llm.engine)


def test_preemption_keeps_constrained_outputs_valid_and_identical(llm, default_model_dir):
    prompts = [f"Person number {i}, as JSON:" + " filler" * (20 + 8 * i) for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=60, structured_outputs=SO(json=PERSON))
    ample = llm.generate(prompts, params, use_tqdm=False)
    small = LLM(str(default_model_dir), dtype="float32", max_model_len=256, kv_cache_memory=24 * 16 * 46080, max_num_seqs=8)
    tight = small.generate(prompts, params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0, "the budget was meant to force preemption"
    for a, b in zip(ample, tight):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        if b.outputs[0].finish_reason == "stop":
            jsonschema.validate(json.loads(b.outputs[0].text), PERSON)
    assert_no_leaks(small.engine)
    small.engine.structured.shutdown()


def test_abort_of_constrained_requests_leaves_nothing_behind(llm):
    eng = llm.engine
    p = SamplingParams(temperature=1.0, max_tokens=200, structured_outputs=SO(json=PERSON))
    eng.add_request("c1", "JSON:", p)
    eng.add_request("c2", "More JSON:", p)
    for _ in range(5):
        eng.step()
    eng.abort_request("c1")
    eng.abort_request("c2")
    outs = eng.step()
    assert {o.request_id for o in outs} >= {"c1", "c2"}
    assert_no_leaks(eng)
    (again,) = llm.generate("JSON:", SamplingParams(temperature=0, max_tokens=80, structured_outputs=SO(json=PERSON)),
                            use_tqdm=False)
    jsonschema.validate(json.loads(again.outputs[0].text), PERSON)


def test_a_compiling_grammar_does_not_stall_the_batch(llm):
    """While one request's grammar compiles, the others run; it starts once the grammar is ready."""
    eng = llm.engine
    pending: Future = Future()
    parent = eng.make_request("slow", "JSON:", SamplingParams(temperature=0, max_tokens=10))
    parent.children[0].grammar = RequestGrammar(pending)
    eng.enqueue(parent)
    eng.add_request("free", "Hello", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    done = {}
    for _ in range(20):
        for o in eng.step():
            done[o.request_id] = o
        if "free" in done:
            break
    assert done["free"].finished and "slow" not in done
    assert parent.children[0].num_output_tokens == 0
    pending.set_result(eng.structured.grammar(SO(choice=["ready"])).result())
    while "slow" not in done:
        for o in eng.step():
            done[o.request_id] = o
    assert done["slow"].outputs[0].text == "ready"
    assert_no_leaks(eng)


def test_compile_cache_shares_one_compile():
    from pagedserve.engine.structured_output.params import StructuredOutputsParams

    a = StructuredOutputsParams(json={"b": 1, "a": {"type": "string"}} | {"type": "object"})
    b = StructuredOutputsParams(json=json.dumps({"type": "object", "a": {"type": "string"}, "b": 1}))
    assert a.key == b.key  # canonical: key order and str/dict do not matter


def test_compile_cache_counts(llm):
    eng = llm.engine
    before = eng.structured.compiles
    schema = {"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"]}
    for _ in range(3):
        llm.generate("x", SamplingParams(max_tokens=12, structured_outputs=SO(json=schema)), use_tqdm=False)
    assert eng.structured.compiles == before + 1


@pytest.mark.parametrize("so, words", [
    (SO(regex="[a-"), ["regex", "could not be compiled"]),
    (SO(json={"type": "strin"}), ["invalid JSON schema"]),
    (SO(json={"type": "array", "uniqueItems": True}), ["uniqueItems"]),
    (SO(grammar='root ::= "a" | undefined_rule'), ["grammar", "undefined_rule"]),
])
def test_bad_constraints_are_value_errors_and_nothing_is_queued(llm, so, words):
    with pytest.raises(ValueError) as e:
        llm.generate("x", SamplingParams(max_tokens=4, structured_outputs=so), use_tqdm=False)
    for w in words:
        assert w in str(e.value)
    assert_no_leaks(llm.engine)


def test_params_validation():
    with pytest.raises(ValueError, match="exactly one"):
        SO(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="exactly one"):
        SO()
    with pytest.raises(ValueError, match="choice"):
        SO(choice=[])
    with pytest.raises(ValueError, match="not valid JSON"):
        SO(json="{nope")
    assert SamplingParams(structured_outputs={"regex": "a+"}).structured_outputs.regex == "a+"


def test_unsupported_keywords_are_found_only_in_schema_positions():
    schema = {"type": "object", "properties": {"not": {"type": "string"}, "tags": {"type": "array", "uniqueItems": True}},
              "enum": [{"contains": 1}], "$defs": {"x": {"type": "string", "format": "hex-color"}}}
    found = unsupported_keywords(schema, "xgrammar")
    assert found == ["'uniqueItems' at #/properties/tags", "'format: hex-color' at #/$defs/x"]
    assert unsupported_keywords(schema, "guidance") == ["'uniqueItems' at #/properties/tags"]


@pytest.mark.parametrize("name", ["xgrammar", "guidance"])
def test_json_whitespace_allows_compact_and_pretty_but_not_filler(llm, name):
    eng = llm.engine
    m = StructuredOutputManager(eng.tokenizer, eng.arch.vocab_size, eng.eos_token_ids, name)
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}}, "s": {"type": "string"}},
              "required": ["a", "s"], "additionalProperties": False}
    grammar = m.grammar(SO(json=schema)).result()
    tok = eng.tokenizer
    eos = min(eng.eos_token_ids)

    def accepts(text: str) -> bool:
        matcher = grammar.matcher()
        return all(matcher.accept(t) for t in tok.encode(text, add_special_tokens=False)) and matcher.accept(eos)

    assert accepts('{"a":[1,2],"s":"x"}')
    assert accepts('{"a": [1, 2], "s": "two  spaces\\n"}')
    assert accepts('{\n  "a": [\n    1\n  ],\n\t"s": "q"\n}')
    assert not accepts('{"a":\n\n[1], "s": "x"}')  # two newlines in one gap
    assert not accepts('{"a": [1], "s": "x"' + " " * 3 + "}")
    assert not accepts('{"a": [1], "s": "x"\n' + " " * 25 + "}")  # indent past 19
    m.shutdown()


@pytest.mark.parametrize("name", ["xgrammar", "guidance"])
def test_bounded_strings_reject_raw_control_characters(llm, name):
    """JSON strings may not hold a raw tab or newline (xgrammar's own grammar for maxLength allows one)."""
    eng = llm.engine
    m = StructuredOutputManager(eng.tokenizer, eng.arch.vocab_size, eng.eos_token_ids, name)
    grammar = m.grammar(SO(json={"type": "object", "properties": {"s": {"type": "string", "maxLength": 8}},
                                 "required": ["s"]})).result()

    def accepts(text: str) -> bool:
        matcher = grammar.matcher()
        return all(matcher.accept(t) for t in eng.tokenizer.encode(text, add_special_tokens=False))

    assert accepts('{"s": "a b"}')
    assert not accepts('{"s": "a\tb"}')
    m.shutdown()
