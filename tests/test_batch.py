"""Batches (issue 26): input validation, `pagedserve run-batch` against the same requests sent one
by one, the Files and Batches API through the official `openai` client against a real server, and a
batch that survives `kill -9` of its server."""

from __future__ import annotations

import io
import json
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import openai
import pytest
from server_utils import ServerProcess

from pagedserve.batch import lines as L


def _line(cid: str, i: int, url: str = "/v1/completions", **body) -> dict:
    if url == "/v1/completions":
        b = {"model": "tiny", "prompt": f"request {i}:", "max_tokens": 6 + i % 5, "temperature": 0}
    else:
        b = {"model": "tiny", "messages": [{"role": "user", "content": f"request {i}"}], "max_tokens": 5,
             "temperature": 0}
    return {"custom_id": cid, "method": "POST", "url": url, "body": {**b, **body}}


def _jsonl(rows: list) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


# -- validation ---------------------------------------------------------------------------------

def test_every_bad_line_is_named_with_what_to_change():
    rows = [_line("ok-1", 1), "{not json", json.dumps([1, 2]), json.dumps({"method": "POST"}),
            json.dumps(_line("ok-1", 2)), json.dumps({**_line("x", 3), "method": "GET"}),
            json.dumps({**_line("y", 4), "url": "/v1/embeddings"}), json.dumps({**_line("z", 5), "body": "text"}),
            json.dumps(_line("s", 6, stream=True)), json.dumps(_line("m", 7, model="other")),
            json.dumps(_line("c" * (L.MAX_CUSTOM_ID + 1), 8)), "", json.dumps(_line("chat", 9, "/v1/chat/completions"))]
    good, bad = L.parse(_jsonl(rows), endpoint="/v1/completions", models=["tiny"])
    assert [g.custom_id for g in good] == ["ok-1"] and good[0].index == 0
    codes = {e.line: e.code for e in bad}
    assert codes == {2: "invalid_json", 3: "invalid_request", 4: "missing_required_parameter",
                     5: "duplicate_custom_id", 6: "invalid_request", 7: "invalid_url", 8: "invalid_request",
                     9: "invalid_request", 10: "model_not_found", 11: "invalid_request", 13: "mismatched_url"}
    msgs = {e.line: e.message for e in bad}
    assert "also on line 1" in msgs[5] and "stream" in msgs[9] and "served: ['tiny']" in msgs[10]
    assert "/v1/chat/completions" in msgs[7]
    # whole-file problems
    assert L.parse(b"\xff\xfe")[1][0].code == "invalid_file"
    assert L.parse(b"\n\n")[1][0].code == "empty_file"
    assert L.parse(_jsonl([_line(f"k{i}", i) for i in range(5)]), max_lines=4)[1][0].code == "too_many_lines"
    # run-batch takes any endpoint in one file
    assert len(L.parse(_jsonl([_line("a", 1), _line("b", 2, "/v1/chat/completions")]))[0]) == 2


# -- run-batch ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_dirs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batch")
    s = ServerProcess([str(tiny_dirs["llama"]), "--served-model-name", "tiny", "--kv-cache-memory", "32MiB",
                       "--max-model-len", "256", "--batch-dir", str(tmp / "batches"), "--batch-concurrency", "4"],
                      tmp / "server.log")
    yield s
    assert s.stop() == 0


def _answers(lines: list[str]) -> dict:
    """custom_id -> (status, the generated texts, token counts): what must match, not ids, timestamps or
    prefix-cache hits."""
    out = {}
    for text in lines:
        row = json.loads(text)
        r = row["response"]
        if r is None:
            out[row["custom_id"]] = ("error", row["error"]["code"])
            continue
        body = r["body"]
        texts = [c.get("text", (c.get("message") or {}).get("content")) for c in body.get("choices", [])]
        usage = {k: v for k, v in (body.get("usage") or {}).items() if k != "prompt_tokens_details"}  # cache hits vary
        out[row["custom_id"]] = (r["status_code"], texts, usage)
    return out


def test_run_batch_answers_as_the_server_does_one_by_one(server, tiny_dirs, tmp_path):
    rows = [_line(f"c{i}", i) for i in range(10)] + [_line(f"h{i}", i, "/v1/chat/completions") for i in range(4)]
    rows.insert(3, "{broken")
    rows.append(_line("nomodel", 1, model="other"))
    src = tmp_path / "in.jsonl"
    src.write_bytes(_jsonl(rows))
    out = tmp_path / "out.jsonl"
    p = subprocess.run([sys.executable, "-m", "pagedserve.cli", "run-batch", "-i", str(src), "-o", str(out),
                        str(tiny_dirs["llama"]), "--served-model-name", "tiny", "--kv-cache-memory", "32MiB",
                        "--max-model-len", "256", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = out.read_text().splitlines()
    assert len(got) == len(rows)  # one output line per input line, in input order
    assert [json.loads(x)["custom_id"] for x in got][:5] == ["c0", "c1", "c2", None, "c3"]
    ans = _answers(got)
    assert ans[None] == ("error", "invalid_json") and ans["nomodel"][0] == 404
    # the same requests, one at a time, to a server
    for row in rows:
        if isinstance(row, str) or row["custom_id"] == "nomodel":
            continue
        r = httpx.post(f"{server.url}{row['url']}", json=row["body"], timeout=60)
        assert ans[row["custom_id"]] == _answers([json.dumps(L.output_line(row["custom_id"], r.status_code,
                                                                           r.json()))])[row["custom_id"]]
    # --url: the same lines through the running server
    out2 = tmp_path / "out2.jsonl"
    p = subprocess.run([sys.executable, "-m", "pagedserve.cli", "run-batch", "-i", str(src), "-o", str(out2),
                        "--url", server.base, "--no-progress"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert _answers(out2.read_text().splitlines()) == ans


# -- Files and Batches API ----------------------------------------------------------------------

def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base, api_key="none", max_retries=0, timeout=60)


def _wait(c: openai.OpenAI, batch_id: str, states=("completed", "failed", "cancelled", "expired"), timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b = c.batches.retrieve(batch_id)
        if b.status in states:
            return b
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} still {b.status}")


def test_openai_client_round_trip(server):
    c = _client(server)
    rows = [_line(f"r{i}", i, "/v1/chat/completions") for i in range(6)]
    f = c.files.create(file=("docs.jsonl", io.BytesIO(_jsonl(rows))), purpose="batch")
    assert f.purpose == "batch" and f.bytes == len(_jsonl(rows)) and f.filename == "docs.jsonl"
    assert c.files.retrieve(f.id).id == f.id and c.files.content(f.id).content == _jsonl(rows)
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                         metadata={"job": "nightly"})
    assert b.status in ("validating", "in_progress") and b.metadata == {"job": "nightly"}
    b = _wait(c, b.id)
    assert b.status == "completed" and b.error_file_id is None, b
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (6, 6, 0)
    assert b.created_at <= b.in_progress_at <= b.finalizing_at <= b.completed_at
    out = c.files.content(b.output_file_id).text.splitlines()
    assert [json.loads(x)["custom_id"] for x in out] == [f"r{i}" for i in range(6)]
    for text, row in zip(out, rows):
        direct = c.chat.completions.create(**row["body"])
        body = json.loads(text)["response"]["body"]
        assert body["choices"][0]["message"]["content"] == direct.choices[0].message.content
        assert body["usage"]["completion_tokens"] == direct.usage.completion_tokens
    assert c.files.retrieve(b.output_file_id).purpose == "batch_output"
    assert b.id in [x.id for x in c.batches.list(limit=100).data]
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'pagedserve:batch_lines_finished_total{outcome="completed"}' in metrics
    assert c.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)


def test_a_batch_that_does_not_validate_fails_with_per_line_errors(server):
    c = _client(server)
    rows = [_line("a", 1), "{oops", _line("b", 2, model="other"), _line("a", 3)]
    f = c.files.create(file=("bad.jsonl", io.BytesIO(_jsonl(rows))), purpose="batch")
    b = _wait(c, c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h").id)
    assert b.status == "failed" and b.output_file_id is None and b.failed_at
    assert [(e.line, e.code) for e in b.errors.data] == [(2, "invalid_json"), (3, "model_not_found"),
                                                        (4, "duplicate_custom_id")]
    errs = [json.loads(x) for x in c.files.content(b.error_file_id).text.splitlines()]
    assert [e["line"] for e in errs] == [2, 3, 4] and all(e["response"] is None for e in errs)


def test_bad_requests_get_clear_errors(server):
    c = _client(server)
    with pytest.raises(openai.BadRequestError, match="purpose"):
        c.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError, match="no file"):
        c.batches.create(input_file_id="file_missing", endpoint="/v1/completions", completion_window="24h")
    f = c.files.create(file=("x.jsonl", io.BytesIO(_jsonl([_line("a", 1)]))), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="1h")
    with pytest.raises(openai.BadRequestError, match="metadata"):
        c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h",
                         metadata={"k": "v" * 600})
    with pytest.raises(openai.NotFoundError):
        c.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        c.batches.cancel("batch_nope")


def test_cancel_stops_new_lines_and_keeps_finished_ones(server):
    c = _client(server)
    rows = [_line(f"k{i}", i, max_tokens=48, ignore_eos=True) for i in range(60)]
    f = c.files.create(file=("long.jsonl", io.BytesIO(_jsonl(rows))), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    deadline = time.monotonic() + 60
    while c.batches.retrieve(b.id).request_counts.completed < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c.batches.cancel(b.id).status in ("cancelling", "cancelled")
    b = _wait(c, b.id)
    assert b.status == "cancelled" and b.cancelled_at and b.cancelling_at
    done = b.request_counts.completed
    assert 2 <= done < 60
    out = c.files.content(b.output_file_id).text.splitlines()
    assert len(out) == done and all(json.loads(x)["response"]["status_code"] == 200 for x in out)
    time.sleep(0.5)
    assert c.batches.retrieve(b.id).request_counts.completed == done  # nothing ran after the cancel
    with pytest.raises(openai.ConflictError):
        c.batches.cancel(_wait(c, c.batches.create(input_file_id=f.id, endpoint="/v1/completions",
                                                   completion_window="24h").id).id)


def test_lines_the_full_queue_turns_away_are_retried_not_failed(tiny_dirs, tmp_path):
    """--max-waiting-requests 1 with 8 lines in flight: most get 503 'overloaded' at first; they are
    retried with backoff and every line completes."""
    s = ServerProcess([str(tiny_dirs["llama"]), "--served-model-name", "tiny", "--kv-cache-memory", "16MiB",
                       "--max-model-len", "256", "--batch-dir", str(tmp_path / "b"), "--batch-concurrency", "8",
                       "--max-waiting-requests", "1", "--max-num-seqs", "2"], tmp_path / "log")
    try:
        c = _client(s)
        f = c.files.create(file=("q.jsonl", io.BytesIO(_jsonl([_line(f"q{i}", i) for i in range(16)]))),
                           purpose="batch")
        b = _wait(c, c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h").id)
        assert b.status == "completed" and (b.request_counts.completed, b.request_counts.failed) == (16, 0)
    finally:
        assert s.stop() == 0


def test_batch_api_off_without_batch_dir_says_which_flag(tiny_dirs, tmp_path):
    s = ServerProcess([str(tiny_dirs["llama"]), "--kv-cache-memory", "16MiB", "--max-model-len", "256"],
                      tmp_path / "log")
    try:
        r = httpx.get(f"{s.base}/batches")
        assert r.status_code == 404 and "--batch-dir" in r.json()["error"]["message"]
    finally:
        assert s.stop() == 0


# -- kill -9 ------------------------------------------------------------------------------------

def test_a_batch_survives_kill_9_without_losing_or_redoing_a_line(tiny_dirs, tmp_path):
    """kill -9 at ~30% and again at ~60%: each restart resumes the lines without a result; every
    custom_id is in the output once, and the lines finished before a kill keep their result."""
    bdir = tmp_path / "batches"
    args = [str(tiny_dirs["llama"]), "--served-model-name", "tiny", "--kv-cache-memory", "32MiB",
            "--max-model-len", "256", "--batch-dir", str(bdir), "--batch-concurrency", "4"]
    n = 60
    rows = [_line(f"d{i}", i, max_tokens=24, ignore_eos=True) for i in range(n)]
    s = ServerProcess(args, tmp_path / "s1.log")
    c = _client(s)
    f = c.files.create(file=("docs.jsonl", io.BytesIO(_jsonl(rows))), purpose="batch")
    bid = c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h").id
    kept: dict[int, str] = {}
    for k, frac in enumerate((0.3, 0.6), start=2):
        deadline = time.monotonic() + 120
        while c.batches.retrieve(bid).request_counts.completed < frac * n and time.monotonic() < deadline:
            time.sleep(0.05)
        s.proc.send_signal(signal.SIGKILL)
        s.proc.wait()
        s.log.close()
        with sqlite3.connect(bdir / "batches.db") as db:  # what the killed server had committed
            done = dict(db.execute("SELECT line, result FROM batch_lines WHERE batch_id = ?", (bid,)).fetchall())
        assert frac * n <= len(done) < n, len(done)
        assert all(kept[i] == done[i] for i in kept)  # earlier lines untouched
        kept = done
        s = ServerProcess(args, tmp_path / f"s{k}.log")
        c = _client(s)
    try:
        b = _wait(c, bid)
        assert b.status == "completed" and b.request_counts.completed == n
        out = c.files.content(b.output_file_id).text.splitlines()
        assert sorted(json.loads(x)["custom_id"] for x in out) == sorted(r["custom_id"] for r in rows)
        assert len(out) == n  # none twice
        by_line = {i: text for i, text in enumerate(out)}
        assert all(json.loads(by_line[i]) == json.loads(kept[i]) for i in kept)  # finished lines not redone
        assert "resuming (in_progress)" in (tmp_path / "s2.log").read_text()
    finally:
        assert s.stop() == 0
