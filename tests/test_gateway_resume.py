"""Streams that survive a replica's death: the gateway continues the answer on another replica
from the tokens the client already has (return_token_ids), and a greedy answer continued this
way is the uninterrupted one. Real replicas of the default model, killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import yaml
from server_utils import ServerProcess
from test_gateway import create_key, rows

from pagedserve.gateway.resume import Sent, continuation_body, strip_ids

# float32: a continued greedy stream is the uninterrupted answer token for token only on the exact
# path (bf16 rounds a re-read prompt and a decoded token differently near ties).
ARGS = ["--served-model-name", "smol", "--kv-cache-memory", "256MiB", "--max-model-len", "2048", "--dtype", "float32"]


def test_strip_ids_and_continuation_body():
    ev = b'data: {"id":"c","choices":[{"index":0,"text":"a","token_ids":[5, 6]}],"prompt_token_ids":[1,2]}'
    assert json.loads(strip_ids(ev)[5:]) == {"id": "c", "choices": [{"index": 0, "text": "a"}]}
    ev = b'data: {"token_ids":null,"id":"c"}'
    assert json.loads(strip_ids(ev)[5:]) == {"id": "c"}
    sent = Sent.from_events([b'data: {"id":"x","created":7,"prompt_token_ids":[1,2],"choices":[{"token_ids":[]}]}',
                             b'data: {"id":"x","choices":[{"delta":{"content":"hi"},"token_ids":[9,8]}]}'], chat=True)
    assert (sent.id, sent.prompt_ids, sent.token_ids, sent.finish_reason) == ("x", [1, 2], [9, 8], None)
    body = continuation_body({"max_tokens": 10, "temperature": 0, "messages": [], "n": 1, "min_tokens": 3}, sent, "m")
    assert body["prompt"] == [1, 2, 9, 8] and body["max_tokens"] == 8 and body["min_tokens"] == 1
    assert body["temperature"] == 0 and "messages" not in body and body["stream"] and body["return_token_ids"]
    assert continuation_body({"max_tokens": 2}, sent, "m") is None  # nothing left to generate


def test_stream_token_ids_cover_exactly_the_text(server):
    """return_token_ids (vLLM's field): each chunk's ids are the tokens its text comes from, so
    decoding the ids received so far gives the text received so far, split characters included."""
    from transformers import AutoTokenizer

    from pagedserve.model.loader import resolve_model

    tok = AutoTokenizer.from_pretrained(str(resolve_model(None)))
    for prompt, extra in (("Write three emoji and a Chinese greeting:", {}), ("Count: one, two,", {"stop": ["six"]})):
        body = {"model": "smol", "prompt": prompt, "max_tokens": 60, "temperature": 0, "stream": True,
                "return_token_ids": True, **extra}
        texts, ids, prompt_ids = [], [], None
        with httpx.stream("POST", f"{server.base}/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                ch = json.loads(line[6:])["choices"][0]
                prompt_ids = prompt_ids or ch.get("prompt_token_ids")
                texts.append(ch["text"])
                ids += ch["token_ids"]
                if ch["finish_reason"] is None:
                    assert tok.decode(ids) == "".join(texts)
                else:  # the last chunk also has the tokens of a stop string the text leaves out
                    assert tok.decode(ids).startswith("".join(texts))
        plain = httpx.post(f"{server.base}/completions", timeout=120,
                           json={**body, "stream": False}).json()["choices"][0]
        assert ids == plain["token_ids"] and "".join(texts) == plain["text"]
        assert prompt_ids == tok(prompt)["input_ids"] == plain["prompt_token_ids"]
    plain = httpx.post(f"{server.base}/completions", timeout=60, json={"model": "smol", "prompt": "x",
                                                                       "max_tokens": 2}).json()
    assert "token_ids" not in plain["choices"][0]  # only when asked for


@pytest.fixture(scope="module")
def pair(default_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    with ThreadPoolExecutor(3) as ex:
        reps = list(ex.map(lambda i: ServerProcess([str(default_model_dir), *ARGS], tmp / f"r{i}.log"), range(3)))
    db = f"sqlite:///{tmp / 'audit.db'}"
    _, key = create_key(db, "resume")
    cfg = {"database": {"url": db, "flush_interval_s": 0.1}, "auth": {"refresh_s": 0.3},
           "health": {"interval_s": 0.3, "timeout_s": 0.5},
           "backends": [{"name": f"r{i}", "url": r.base} for i, r in enumerate(reps)],
           "pools": [{"name": "p", "backends": ["r0", "r1", "r2"], "policy": "least_outstanding", "model": "smol",
                      "failure_threshold": 1}],
           "models": [{"name": "smol", "pool": "p"}]}
    (tmp / "gw.yaml").write_text(yaml.safe_dump(cfg))
    gw = ServerProcess(["--config", str(tmp / "gw.yaml")], tmp / "gw.log", command="gateway")
    yield dict(reps=reps, gw=gw, key=key, db=db)
    gw.stop()
    for r in reps:
        r.stop()


def _kill_the_busy_one(reps) -> int:
    for i, r in enumerate(reps):
        if r.proc.poll() is None and r.metric("vllm:num_requests_running") >= 1:
            r.proc.kill()
            r.proc.wait()
            return i
    raise AssertionError("no replica is running the stream")


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_a_greedy_stream_continued_after_kill_9_is_the_uninterrupted_answer(pair, kind):
    reps = [r for r in pair["reps"] if r.proc.poll() is None]
    assert len(reps) >= 2, "an earlier test left fewer than two replicas"
    c = openai.OpenAI(base_url=pair["gw"].base, api_key=pair["key"], max_retries=0, timeout=120)
    common = dict(model="smol", max_tokens=150, temperature=0, extra_body={"ignore_eos": True})
    if kind == "chat":
        msgs = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
        ref = c.chat.completions.create(messages=msgs, **common)
        ref_text, ref_tokens = ref.choices[0].message.content, ref.usage.completion_tokens
        stream = c.chat.completions.create(messages=msgs, stream=True, stream_options={"include_usage": True},
                                           **common)
        piece = lambda ch: ch.choices[0].delta.content or ""  # noqa: E731
    else:
        prompt = "The history of the lighthouse begins"
        ref = c.completions.create(prompt=prompt, **common)
        ref_text, ref_tokens = ref.choices[0].text, ref.usage.completion_tokens
        stream = c.completions.create(prompt=prompt, stream=True, stream_options={"include_usage": True}, **common)
        piece = lambda ch: ch.choices[0].text  # noqa: E731
    it = iter(stream)
    got, usage, ids = [], None, set()
    for ch in it:  # a few tokens in, the replica serving the stream is killed
        ids.add(ch.id)
        if ch.choices:
            got.append(piece(ch))
        if sum(map(len, got)) > 40:
            break
    start = max((g.id for g in rows(pair["db"], 0)), default=0)
    t_kill = time.monotonic()
    killed = _kill_the_busy_one(pair["reps"])
    for ch in it:
        ids.add(ch.id)
        if ch.choices:
            got.append(piece(ch))
        if ch.usage:
            usage = ch.usage
    done_in = time.monotonic() - t_kill
    assert "".join(got) == ref_text  # one uninterrupted answer, token for token
    assert len(ids) == 1  # the same response id throughout
    assert usage.completion_tokens == ref_tokens
    (row,) = [g for g in rows(pair["db"], start, expect=1) if g.stream]
    assert row.status == 200 and row.backend.startswith(f"r{killed}>") and row.completion_tokens == ref_tokens
    print(f"{kind}: continued after kill -9 of r{killed}; the rest of the stream took {done_in:.2f}s")


def test_with_no_replica_left_the_stream_ends_with_an_error_event(pair):
    alive = [r for r in pair["reps"] if r.proc.poll() is None]
    for r in alive[1:]:  # leave one; the stream runs there, then it dies too
        os.kill(r.proc.pid, signal.SIGKILL)
        r.proc.wait()
    time.sleep(1.0)  # health checks eject the dead ones (every 0.3 s)
    lines = []
    with httpx.stream("POST", f"{pair['gw'].base}/completions", timeout=120,
                      headers={"Authorization": f"Bearer {pair['key']}"},
                      json={"model": "smol", "prompt": "Once", "max_tokens": 150, "stream": True,
                            "ignore_eos": True}) as resp:
        for line in resp.iter_lines():
            if line:
                lines.append(line)
            if len(lines) == 5:
                alive[0].proc.kill()
    assert lines[-1] == "data: [DONE]"
    err = json.loads(lines[-2][6:])["error"]
    assert err["code"] == 502 and "could not be continued" in err["message"]
