"""A rolling update rehearsed as Kubernetes does it, with the gateway in front: under load, a new
replica starts and joins through discovery, an old one gets SIGTERM (it drains its requests and
stops accepting) and leaves discovery. No client request fails."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import yaml
from server_utils import ServerProcess
from test_gateway import create_key, rows


def test_rolling_update_under_load_fails_no_request(tiny_dirs, tmp_path):
    args = [str(tiny_dirs["llama"]), "--served-model-name", "tiny", "--kv-cache-memory", "32MiB",
            "--max-model-len", "512", "--shutdown-timeout", "20"]
    with ThreadPoolExecutor(2) as ex:
        old = list(ex.map(lambda i: ServerProcess(args, tmp_path / f"old{i}.log"), range(2)))
    disc = tmp_path / "backends.txt"
    disc.write_text("".join(f"{r.base}\n" for r in old))
    db = f"sqlite:///{tmp_path / 'audit.db'}"
    _, key = create_key(db, "ops")
    cfg = {"database": {"url": db, "flush_interval_s": 0.1}, "auth": {"refresh_s": 0.3},
           "health": {"interval_s": 0.3, "timeout_s": 0.5},
           "pools": [{"name": "p", "discovery": {"file": str(disc), "interval_s": 0.3}, "model": "tiny",
                      "policy": "least_outstanding"}],
           "models": [{"name": "tiny", "pool": "p"}]}
    (tmp_path / "gw.yaml").write_text(yaml.safe_dump(cfg))
    gw = ServerProcess(["--config", str(tmp_path / "gw.yaml")], tmp_path / "gw.log", command="gateway")
    new = None
    try:
        time.sleep(1.0)  # keys and discovery read

        def one(i):
            body = {"model": "tiny", "prompt": f"rolling {i}", "max_tokens": 32, "ignore_eos": True}
            h = {"Authorization": f"Bearer {key}"}
            try:
                if i % 2:
                    with httpx.stream("POST", f"{gw.base}/completions", json={**body, "stream": True}, headers=h,
                                      timeout=120) as r:
                        lines = [ln for ln in r.iter_lines() if ln.startswith("data:")]
                    ok = r.status_code == 200 and lines[-1] == "data: [DONE]" and not any('"error"' in ln for ln in lines)
                    return ok, r.status_code
                r = httpx.post(f"{gw.base}/completions", json=body, headers=h, timeout=120)
                return r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 32, r.status_code
            except httpx.HTTPError as e:
                return False, repr(e)

        with ThreadPoolExecutor(6) as ex:
            futs = [ex.submit(one, i) for i in range(30)]
            while sum(f.done() for f in futs) < 20:
                time.sleep(0.1)
            # The rollout: a new pod becomes ready and joins; then an old one is terminated. The
            # rest of the load is sent once it has joined (its start takes seconds, in which a
            # fast enough pair of old replicas could finish everything already queued).
            new = ServerProcess(args, tmp_path / "new.log")
            disc.write_text(f"{old[1].base}\n{old[0].base}\n{new.base}\n")
            time.sleep(0.6)  # two discovery intervals
            futs += [ex.submit(one, i) for i in range(30, 90)]
            time.sleep(0.4)
            disc.write_text(f"{old[1].base}\n{new.base}\n")  # endpoints drop the terminating pod...
            old[0].proc.send_signal(signal.SIGTERM)  # ...while the kubelet sends it SIGTERM
            results = [f.result() for f in futs]
        assert old[0].proc.wait(30) == 0  # drained and exited cleanly
        failed = [r for r in results if not r[0]]
        assert failed == [], failed
        got = rows(db, 0, expect=90)
        new_name = f"p:{new.base.split('://')[1]}"
        assert sum(g.backend == new_name for g in got) > 0, "the new replica never served"
    finally:
        gw.stop()
        for r in [*old, *([new] if new else [])]:
            r.stop()
