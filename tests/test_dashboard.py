"""The Grafana dashboard (deploy/helm/pagedserve/dashboards/pagedserve.json): every metric it
graphs is exported by a real server or a real gateway, and every query parses in a real
Prometheus; the chart ships it as a ConfigMap for Grafana's sidecar."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families
from server_utils import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy/helm/pagedserve/dashboards/pagedserve.json"


def exprs() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


def families(url: str, headers: dict | None = None) -> set[str]:
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    return {f.name for f in text_string_to_metric_families(text)}


def metric_names() -> set[str]:
    names = set()
    for e in exprs():
        for m in re.findall(r"(vllm:[a-z0-9_]+|pagedserve_gateway_[a-z0-9_]+)", e):
            names.add(re.sub(r"_(total|bucket|count|sum)$", "", m))
    return names


def test_every_graphed_metric_exists_on_a_real_server_and_gateway(tiny_server, tmp_path):
    httpx.post(f"{tiny_server.base}/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)
    cfg = {"server": {"public_metrics": True}, "auth": {"require_key": False},
           "database": {"url": f"sqlite:///{tmp_path / 'a.db'}"},
           "backends": [{"name": "t", "url": tiny_server.base}],
           "pools": [{"name": "p", "backends": ["t"], "model": "tiny"}], "models": [{"name": "tiny", "pool": "p"}]}
    (tmp_path / "gw.yaml").write_text(yaml.safe_dump(cfg))
    gw = ServerProcess(["--config", str(tmp_path / "gw.yaml")], tmp_path / "gw.log", command="gateway")
    try:
        httpx.post(f"{gw.base}/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}, timeout=60)
        have = families(tiny_server.url) | families(gw.url)
    finally:
        gw.stop()
    wanted = metric_names()
    assert {n for n in wanted if n.startswith("vllm:")} and {n for n in wanted if n.startswith("pagedserve_")}
    assert wanted <= have, wanted - have


def test_every_query_parses_in_prometheus():
    from prom_utils import PrometheusServer

    prom = PrometheusServer()
    try:
        for e in exprs():
            r = prom.raw(e.replace("$model", ".*"))
            assert r["status"] == "success", (e, r)
    finally:
        prom.stop()


def test_the_chart_ships_it_for_the_sidecar(tmp_path):
    out = subprocess.run([shutil.which("helm"), "template", "r", str(ROOT / "deploy/helm/pagedserve"), "--set",
                          "dashboard.enabled=true"], capture_output=True, text=True, timeout=60, check=True).stdout
    cm = next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "ConfigMap" and d["metadata"]["name"] == "r-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["pagedserve.json"]) == json.loads(DASHBOARD.read_text())
