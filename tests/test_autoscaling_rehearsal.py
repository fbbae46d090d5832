"""Autoscaling rehearsed with a real Prometheus scraping two real replicas: the exact PromQL of
the chart's KEDA trigger and of the prometheus-adapter rule (deploy/prometheus-adapter), run
against it under a bounded load and idle, through the HPA formula
desired = ceil(replicas x value / target)."""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from prom_utils import PrometheusServer
from server_utils import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
SERVED = "tiny-auto"


def chart_queries(tmp_path: Path) -> tuple[str, float, float]:
    """(KEDA's query, its threshold, the HPA's averageValue) as the chart renders them."""
    values = {"models": [{"name": "m", "servedModelName": SERVED, "autoscaling": {"mode": "keda", "minReplicas": 1,
                                                                              "maxReplicas": 8,
                                                                              "targetWaitingRequests": 2}},
                         {"name": "h", "servedModelName": SERVED, "autoscaling": {"mode": "hpa", "minReplicas": 1,
                                                                              "maxReplicas": 8,
                                                                              "targetWaitingRequests": 2}}]}
    f = tmp_path / "v.yaml"
    f.write_text(yaml.safe_dump(values))
    out = subprocess.run([shutil.which("helm"), "template", "r", str(ROOT / "deploy/helm/pagedserve"), "-f", str(f),
                          "--namespace", "llm"], capture_output=True, text=True, timeout=60, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    so = next(d for d in docs if d["kind"] == "ScaledObject")
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    trig = so["spec"]["triggers"][0]["metadata"]
    return trig["query"], float(trig["threshold"]), float(hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"])


def adapter_query() -> str:
    """The adapter rule's metricsQuery for the chart's pods, as the adapter expands it."""
    rule = yaml.safe_load((ROOT / "deploy/prometheus-adapter/values.yaml").read_text())["rules"]["custom"][0]
    assert rule["name"]["as"] == "vllm_num_requests_waiting"
    series = rule["seriesQuery"].split("{")[0]
    return (rule["metricsQuery"].replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace="llm",pod=~"r0|r1"').replace("<<.GroupBy>>", "pod"))


@pytest.fixture(scope="module")
def prom_pair(tiny_dirs, tmp_path_factory):
    """Two replicas that run at most 2 sequences each (so a burst waits), and a Prometheus that
    scrapes them every second with the labels Kubernetes' service discovery would add."""
    tmp = tmp_path_factory.mktemp("autoscale")
    args = [str(tiny_dirs["llama"]), "--served-model-name", SERVED, "--max-num-seqs", "2", "--kv-cache-memory",
            "32MiB", "--max-model-len", "512"]
    with ThreadPoolExecutor(2) as ex:
        reps = list(ex.map(lambda i: ServerProcess(args, tmp / f"r{i}.log"), range(2)))
    try:  # the replicas stop even when Prometheus cannot start (a setup error left them running)
        prom = PrometheusServer([(r.port, {"namespace": "llm", "pod": f"r{i}"}) for i, r in enumerate(reps)])
        yield reps, prom
        prom.stop()
    finally:
        for r in reps:
            r.stop()


def test_hpa_and_keda_ask_for_more_replicas_under_load_and_the_minimum_idle(prom_pair, tmp_path):
    reps, prom = prom_pair
    keda_q, keda_threshold, hpa_target = chart_queries(tmp_path)
    adapter_q = adapter_query()

    def desired_keda() -> int | None:
        got = prom.query(keda_q)
        return None if not got else math.ceil(float(got[0]["value"][1]) / keda_threshold)

    def desired_hpa() -> int | None:
        got = prom.query(adapter_q)
        if not got or len(got) != 2:
            return None
        mean = sum(float(g["value"][1]) for g in got) / len(got)
        return math.ceil(len(reps) * mean / hpa_target)

    # Idle: both ask for the minimum (1; the autoscalers clamp 0 up to minReplicas).
    deadline = time.monotonic() + 60
    while (desired_hpa() is None or desired_keda() is None) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert max(1, desired_hpa()) == 1 and max(1, desired_keda()) == 1
    # A bounded burst: 24 long requests over 2 replicas that run 2 each -> ~10 waiting per replica.

    def load(i):
        r = reps[i % 2]
        httpx.post(f"{r.base}/completions", timeout=300,
                   json={"prompt": f"load {i}", "max_tokens": 200, "ignore_eos": True})

    seen = {"hpa": 0, "keda": 0}
    with ThreadPoolExecutor(24) as ex:
        futs = [ex.submit(load, i) for i in range(24)]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (seen["hpa"] > 2 and seen["keda"] > 2):
            seen["hpa"] = max(seen["hpa"], desired_hpa() or 0)
            seen["keda"] = max(seen["keda"], desired_keda() or 0)
            time.sleep(0.5)
        for f in futs:
            f.result()
    assert seen["hpa"] > 2 and seen["keda"] > 2, seen  # scale out beyond the 2 replicas running
    # Idle again: back to the minimum.
    deadline = time.monotonic() + 60
    while (desired_hpa() or 0) > 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert max(1, desired_hpa()) == 1 and max(1, desired_keda()) == 1
