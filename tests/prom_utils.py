"""A real Prometheus (Debian's package, installed by scripts/test.sh) on a free loopback port,
scraping the given targets every second."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from server_utils import free_port


class PrometheusServer:
    def __init__(self, targets: list[tuple[int, dict]] = (), job: str = "pagedserve"):
        """targets: (port on 127.0.0.1, extra labels) pairs."""
        prom = shutil.which("prometheus")
        assert prom, "prometheus is installed by scripts/test.sh (Debian package 'prometheus')"
        self.dir = Path(tempfile.mkdtemp(prefix="pagedserve-prom-"))
        lines = ["global:", "  scrape_interval: 1s", "scrape_configs:", f"  - job_name: {job}", "    static_configs:"]
        for port, labels in targets:
            lines.append(f'      - targets: ["127.0.0.1:{port}"]')
            if labels:
                lines.append("        labels: {" + ", ".join(f"{k}: {v}" for k, v in labels.items()) + "}")
        if not targets:
            lines = lines[:2]
        (self.dir / "prometheus.yml").write_text("\n".join(lines) + "\n")
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api/v1/query"
        self.proc = subprocess.Popen([prom, f"--config.file={self.dir / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={self.dir / 'data'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while self.raw("1") is None:
            assert time.monotonic() < deadline, "prometheus did not start"
            time.sleep(0.3)

    def raw(self, q: str) -> dict | None:
        """The API's whole answer (status and errors included), or None while it is not up."""
        try:
            return httpx.get(self.api, params={"query": q}, timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return None

    def query(self, q: str) -> list | None:
        """The result vector, or None when the query failed."""
        res = self.raw(q)
        return res["data"]["result"] if res and res.get("status") == "success" else None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)
