"""The OpenAI-compatible server, driven over loopback with the official openai client."""


import httpx
import openai
import pytest
from openai import OpenAI

from pagedserve import SamplingParams


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.base, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tiny(tiny_server):
    return OpenAI(base_url=tiny_server.base, api_key="unused", max_retries=0, timeout=60)


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["smol"]
    assert models[0].model_extra["max_model_len"] == 2048 and models[0].owned_by == "pagedserve"


def test_completion_prompt_forms(client):
    ids = client.post("/../tokenize", body={"prompt": "Hello world"}, cast_to=httpx.Response).json()["tokens"]
    cases = [("Hello world", 1), (["Hello world", "Goodbye"], 2), (ids, 1), ([ids, ids[:1]], 2)]
    for prompt, n_prompts in cases:
        r = client.completions.create(model="smol", prompt=prompt, max_tokens=5, temperature=0, n=2)
        assert sorted(c.index for c in r.choices) == list(range(2 * n_prompts))
        assert r.usage.completion_tokens == 5 * 2 * n_prompts
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.object == "text_completion" and r.id.startswith("cmpl-")
    # A string prompt and its token ids give the same greedy text.
    a = client.completions.create(model="smol", prompt="Hello world", max_tokens=8, temperature=0)
    b = client.completions.create(model="smol", prompt=ids, max_tokens=8, temperature=0)
    assert a.choices[0].text == b.choices[0].text


def test_temperature_zero_matches_offline_generate(client, llm):
    prompt = "The three most important inventions in history are"
    r = client.completions.create(model="smol", prompt=prompt, max_tokens=24, temperature=0)
    offline = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0]
    assert r.choices[0].text == offline.text
    assert r.usage.completion_tokens == len(offline.token_ids)


def test_stop_seed_logprobs_echo(client):
    r = client.completions.create(model="smol", prompt="1, 2, 3, 4, 5,", max_tokens=20, temperature=0, stop=[" 8"])
    assert r.choices[0].finish_reason == "stop" and " 8" not in r.choices[0].text and " 7" in r.choices[0].text
    kw = dict(model="smol", prompt="My favourite animal is", max_tokens=12, temperature=1.0)
    s1 = client.completions.create(seed=42, **kw).choices[0].text
    s2 = client.completions.create(seed=42, **kw).choices[0].text
    s3 = client.completions.create(seed=43, **kw).choices[0].text
    assert s1 == s2 and s1 != s3
    r = client.completions.create(model="smol", prompt="The sky is", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 == r.usage.completion_tokens and "".join(lp.tokens) == r.choices[0].text
    assert all(t <= 0 for t in lp.token_logprobs) and all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    e = client.completions.create(model="smol", prompt="The sky is", max_tokens=4, temperature=0, echo=True, logprobs=1)
    assert e.choices[0].text == "The sky is" + r.choices[0].text
    assert e.choices[0].logprobs.token_logprobs[0] is None and len(e.choices[0].logprobs.tokens) == 3 + 4


def test_chat_and_streaming(client):
    msgs = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Name a color."}]}]
    full = client.chat.completions.create(model="smol", messages=msgs, max_completion_tokens=20, temperature=0)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens > 0
    stream = client.chat.completions.create(model="smol", messages=msgs, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [full.choices[0].finish_reason]
    lp = client.chat.completions.create(model="smol", messages=msgs, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)


def test_completion_streaming_usage(client):
    stream = client.completions.create(model="smol", prompt="Once upon a time", max_tokens=10, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    ref = client.completions.create(model="smol", prompt="Once upon a time", max_tokens=10, temperature=0)
    assert text == ref.choices[0].text and chunks[-1].usage.completion_tokens == 10


def test_tokenize_detokenize_version(server):
    t = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello world"}).json()
    assert t["count"] == len(t["tokens"]) > 0
    d = httpx.post(f"{server.url}/detokenize", json={"tokens": t["tokens"]}).json()
    assert d["prompt"] == "Hello world"
    assert httpx.get(f"{server.url}/version").json()["version"]
    assert httpx.get(f"{server.url}/ping").status_code == 200


def err(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()["error"]
    assert set(body) >= {"message", "type", "param", "code"} and body["message"]
    return body


def test_error_statuses(tiny_server):
    u = tiny_server.base
    err(httpx.post(f"{u}/completions", json={"model": "tiny", "prompt": "x", "temperature": -1}), 400)
    err(httpx.post(f"{u}/completions", json={"model": "tiny", "prompt": "x", "top_p": 0}), 400)
    err(httpx.post(f"{u}/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 0}), 400)
    err(httpx.post(f"{u}/completions", json={"model": "tiny", "prompt": ""}), 400)
    err(httpx.post(f"{u}/completions", json={"model": "tiny", "prompt": [1, 2, 99999999]}), 400)
    b = err(httpx.post(f"{u}/completions", json={"model": "tiny", "prompt": [5] * 400, "max_tokens": 200}), 400)
    assert "512" in b["message"] and "400" in b["message"] and "200" in b["message"]
    b = err(httpx.post(f"{u}/completions", json={"model": "nope", "prompt": "x"}), 404)
    assert b["code"] == "model_not_found"
    err(httpx.post(f"{u}/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    err(httpx.post(f"{u}/completions", json=[1, 2, 3]), 400)
    err(httpx.post(f"{u}/completions", json={"prompt": "x", "logit_bias": {"abc": 1}}), 400)
    err(httpx.post(f"{u}/chat/completions", json={"messages": []}), 400)
    err(httpx.post(f"{u}/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]}), 400)
    # As OpenAI: a user/system message needs content; only an assistant turn may leave it out.
    for msg in ({"role": "user"}, {"role": "user", "content": None}, {"role": "system", "content": None}):
        b = err(httpx.post(f"{u}/chat/completions", json={"messages": [msg]}), 400)
        assert "needs 'content'" in b["message"], b
    r = httpx.post(f"{u}/chat/completions", json={"max_tokens": 2, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": None}, {"role": "user", "content": "x"}]})
    assert r.status_code == 200, r.text
    err(httpx.post(f"{u}/completions", content=b'{"prompt": "' + b"a" * 70000 + b'"}',
                   headers={"content-type": "application/json"}), 413)
    err(httpx.get(f"{u}/no-such-route"), 404)
    assert httpx.get(f"{tiny_server.url}/health").status_code == 200


def test_openai_client_raises_typed_errors(tiny):
    with pytest.raises(openai.NotFoundError):
        tiny.completions.create(model="missing", prompt="x")
    with pytest.raises(openai.BadRequestError) as e:
        tiny.completions.create(model="tiny", prompt="x", temperature=5)
    assert "temperature" in str(e.value)


def test_api_key(tmp_path, tiny_dirs):
    from server_utils import ServerProcess

    s = ServerProcess([str(tiny_dirs["llama"]), "--kv-cache-memory", "16MiB", "--max-model-len", "256"],
                      tmp_path / "log", env={"PAGEDSERVE_API_KEY": "sekret-key"})
    try:
        assert httpx.get(f"{s.base}/models").status_code == 401
        assert httpx.get(f"{s.base}/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        err(httpx.post(f"{s.base}/completions", json={"prompt": "x"}), 401)
        ok = OpenAI(base_url=s.base, api_key="sekret-key", max_retries=0)
        assert ok.completions.create(model=str(tiny_dirs["llama"]), prompt="hi", max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=s.base, api_key="nope", max_retries=0).models.list()
        assert httpx.get(f"{s.url}/health").status_code == 200  # probes need no key
    finally:
        assert s.stop() == 0
    assert "sekret-key" not in (tmp_path / "log").read_text()


def test_serve_help_lists_vllm_flags():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pagedserve.cli", "serve", "--help"], capture_output=True, text=True).stdout
    for flag in ("--model", "--served-model-name", "--host", "--port", "--dtype", "--max-model-len",
                 "--gpu-memory-utilization", "--kv-cache-memory", "--max-num-seqs", "--max-num-batched-tokens",
                 "--block-size", "--enable-prefix-caching", "--no-enable-prefix-caching", "--api-key",
                 "--chat-template", "--seed", "--uvicorn-log-level", "--max-waiting-requests",
                 "--max-request-body-bytes", "--request-timeout"):
        assert flag in out, flag
