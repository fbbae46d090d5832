"""Hostile input, dropped clients, overload, a wedged or dead engine, and SIGTERM."""

import asyncio
import json
import signal
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server_utils import ServerProcess, free_port

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                               st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                           max_leaves=12)
FIELDS = ["prompt", "messages", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "logprobs", "echo",
          "logit_bias", "stream", "top_k", "min_p", "stop_token_ids", "priority", "model", "top_logprobs",
          "presence_penalty", "repetition_penalty", "min_tokens", "stream_options"]
hostile = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6),
    st.builds(lambda b: {"prompt": "hi", "max_tokens": 2, **b}, st.dictionaries(st.sampled_from(FIELDS[2:]), json_values, max_size=3)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=hostile, route=st.sampled_from(["completions", "chat/completions"]))
def test_fuzz_bodies_get_4xx(tiny_server, body, route):
    r = httpx.post(f"{tiny_server.base}/{route}", json=body, timeout=60)
    assert r.status_code < 500, (body, r.status_code, r.text[:300])
    if r.status_code != 200:
        assert "error" in r.json()


def test_fuzz_raw_bytes_and_health_after(tiny_server):
    for raw in [b"", b"\x00\xff\xfe", b"{" * 5000, b'{"prompt": "\\ud800"}', b"null", b'"string"', b"[" * 100,
                b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "top_p": Infinity}',
                b'{"prompt": "x", "max_tokens": 1e400}', b'{"prompt": "x", "presence_penalty": -Infinity}']:
        r = httpx.post(f"{tiny_server.base}/completions", content=raw, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (raw[:20], r.status_code)
    assert httpx.get(f"{tiny_server.url}/health").status_code == 200
    r = httpx.post(f"{tiny_server.base}/completions", json={"prompt": "hello", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_disconnects_free_everything(tiny_server):
    async def drop_after_first_chunk(client, i):
        body = {"prompt": f"story number {i}", "max_tokens": 400, "ignore_eos": True, "stream": True}
        async with client.stream("POST", f"{tiny_server.base}/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    return  # leave the stream (closes the connection)

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            await asyncio.gather(*(drop_after_first_chunk(client, i) for i in range(20)))

    asyncio.run(main())
    assert wait_for(lambda: tiny_server.metric("vllm:num_requests_running") == 0
                    and tiny_server.metric("vllm:num_requests_waiting") == 0
                    and tiny_server.metric("vllm:kv_cache_usage_perc") == 0.0, timeout=10)
    aborted = tiny_server.metric('vllm:request_success_total{finished_reason="abort",model_name="tiny"}')
    assert aborted >= 20


def test_non_streaming_disconnect_aborts(tiny_server):
    before = tiny_server.metric('vllm:request_success_total{finished_reason="abort",model_name="tiny"}')
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{tiny_server.base}/completions", json={"prompt": "x", "max_tokens": 500, "ignore_eos": True,
                                                            "n": 4}, timeout=0.5)
    assert wait_for(lambda: tiny_server.metric(
        'vllm:request_success_total{finished_reason="abort",model_name="tiny"}') >= before + 4)
    assert wait_for(lambda: tiny_server.metric("vllm:kv_cache_usage_perc") == 0.0)


def test_overload_gives_clean_503(tmp_path, tiny_dirs):
    s = ServerProcess([str(tiny_dirs["llama"]), "--served-model-name", "t", "--kv-cache-memory", "16MiB",
                       "--max-model-len", "256", "--max-num-seqs", "1", "--max-waiting-requests", "2"], tmp_path / "log")
    try:
        async def one(client):
            return await client.post(f"{s.base}/completions", json={"prompt": "x", "max_tokens": 30, "ignore_eos": True})

        async def burst():
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(*(one(client) for _ in range(30)))

        rs = asyncio.run(burst())
        codes = [r.status_code for r in rs]
        assert set(codes) <= {200, 503}, codes
        assert codes.count(200) >= 1 and codes.count(503) >= 1
        for r in rs:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded"
            else:
                assert r.json()["usage"]["completion_tokens"] == 30
        assert httpx.get(f"{s.url}/health").status_code == 200
    finally:
        assert s.stop() == 0


@pytest.fixture
def inproc_server(tiny_dirs):
    """A real uvicorn server on loopback inside this process, so a test can break its engine."""
    import uvicorn

    from pagedserve.config import EngineConfig
    from pagedserve.engine.async_engine import AsyncEngine
    from pagedserve.engine.engine import LLMEngine
    from pagedserve.server.app import ServerSettings, build_app

    cfg = EngineConfig(model=str(tiny_dirs["llama"]), kv_cache_memory=16 << 20, max_model_len=256)
    aeng = AsyncEngine.build(lambda: LLMEngine(cfg), stall_timeout=1.0)  # as `pagedserve serve` does
    eng = aeng.engine
    app = build_app(aeng, ServerSettings(served_model_names=["t"]))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    assert wait_for(lambda: srv.started, 20)
    yield f"http://127.0.0.1:{port}", eng, aeng
    srv.should_exit = True
    th.join(10)


def test_engine_is_built_and_stepped_on_one_thread(inproc_server):
    """The serve path builds the engine on the thread that steps it (one owner for torch's CPU
    thread pool; async_engine.py says why)."""
    url, eng, aeng = inproc_server
    assert aeng._thread is not threading.current_thread() and aeng._thread.name == "engine-loop"
    stepped_on = set()
    real_step = eng.step

    def step():
        stepped_on.add(threading.current_thread())
        return real_step()

    eng.step = step
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert stepped_on == {aeng._thread}


def test_engine_build_error_is_raised_to_the_caller(tiny_dirs):
    from pagedserve.config import EngineConfig
    from pagedserve.engine.async_engine import AsyncEngine
    from pagedserve.engine.engine import LLMEngine

    def loops():
        return sum(t.name == "engine-loop" and t.is_alive() for t in threading.enumerate())

    before = loops()
    cfg = EngineConfig(model=str(tiny_dirs["llama"]), kv_cache_memory=1 << 10, max_model_len=256)
    with pytest.raises(ValueError, match="--kv-cache-memory"):
        AsyncEngine.build(lambda: LLMEngine(cfg))
    assert wait_for(lambda: loops() == before, 5)  # the builder thread ended; nothing left running


def test_health_503_when_engine_wedged(inproc_server):
    url, eng, _ = inproc_server
    assert httpx.get(f"{url}/health").status_code == 200
    release = threading.Event()
    real_step = eng.step

    def wedged_step():
        release.wait(60)  # a kernel that never returns
        return real_step()

    eng.step = wedged_step
    with httpx.Client(timeout=30) as c:
        def post():
            try:
                c.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
            except httpx.HTTPError:
                pass

        th = threading.Thread(target=post)
        th.start()
        t0 = time.monotonic()
        assert wait_for(lambda: httpx.get(f"{url}/health").status_code == 503, timeout=5)
        assert time.monotonic() - t0 < 5
        assert "not returned" in httpx.get(f"{url}/health").json()["error"]["message"]
        release.set()
        th.join(30)
    assert wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, timeout=5)


def test_health_503_when_engine_dies(inproc_server):
    url, eng, _ = inproc_server

    def broken_step():
        raise RuntimeError("injected fault")

    eng.step = broken_step
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert r.status_code == 503 and "injected fault" in r.json()["error"]["message"]
    h = httpx.get(f"{url}/health")
    assert h.status_code == 503 and "died" in h.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert r.status_code == 503


def test_sigterm_finishes_in_flight_then_exits_0(tmp_path, tiny_dirs):
    s = ServerProcess([str(tiny_dirs["llama"]), "--served-model-name", "t", "--kv-cache-memory", "16MiB",
                       "--max-model-len", "256"], tmp_path / "log")
    result = {}

    def long_request():
        r = httpx.post(f"{s.base}/completions", json={"prompt": "x", "max_tokens": 200, "ignore_eos": True}, timeout=60)
        result["status"], result["body"] = r.status_code, r.json()

    th = threading.Thread(target=long_request)
    th.start()
    assert wait_for(lambda: s.metric("vllm:num_requests_running") == 1, timeout=10)
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(httpx.ConnectError):  # no longer accepting
        httpx.get(f"{s.url}/health", timeout=2)
    th.join(60)
    assert s.proc.wait(30) == 0
    assert result["status"] == 200 and result["body"]["usage"]["completion_tokens"] == 200
    assert result["body"]["choices"][0]["finish_reason"] == "length"
    s.stop()


def test_shutdown_timeout_ends_streams_with_an_error_event_and_done(tmp_path, tiny_dirs):
    """A stream still running when --shutdown-timeout runs out gets an error event and [DONE]
    (it was cut mid-stream, and the server logged a CancelledError traceback); a non-streaming
    request gets 503 with the reason; the server still exits 0."""
    s = ServerProcess([str(tiny_dirs["llama"]), "--served-model-name", "t", "--kv-cache-memory", "16MiB",
                       "--max-model-len", "4096", "--shutdown-timeout", "2"], tmp_path / "log")
    lines, plain = [], {}

    def stream():
        with httpx.stream("POST", f"{s.base}/completions", timeout=60, json={
                "prompt": "x", "max_tokens": 4000, "ignore_eos": True, "stream": True}) as r:
            lines.extend(line for line in r.iter_lines() if line)

    def non_stream():
        r = httpx.post(f"{s.base}/completions", json={"prompt": "y", "max_tokens": 4000, "ignore_eos": True},
                       timeout=60)
        plain["status"], plain["body"] = r.status_code, r.json()

    threads = [threading.Thread(target=stream), threading.Thread(target=non_stream)]
    for t in threads:
        t.start()
    assert wait_for(lambda: s.metric("vllm:num_requests_running") == 2, timeout=20)
    s.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert s.proc.wait(30) == 0
    assert lines[-1] == "data: [DONE]", lines[-3:]
    err = json.loads(lines[-2].removeprefix("data: "))
    assert err["error"]["code"] == 503 and "--shutdown-timeout" in err["error"]["message"]
    assert len(lines) > 3  # tokens were streamed before the cut
    assert plain["status"] == 503 and "--shutdown-timeout" in plain["body"]["error"]["message"]
    log = (tmp_path / "log").read_text()
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
    assert "ended 2 unfinished request(s)" in log
    s.stop()
