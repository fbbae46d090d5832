"""/metrics in vLLM's names, parsed by prometheus_client and scraped by a real Prometheus server."""

import os
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families


NAMES = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
         "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success", "vllm:num_preemptions",
         "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:time_to_first_token_seconds",
         "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
         "vllm:cache_config_info"]


def families(url):
    return {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}


def test_metric_names_and_counts(tiny_server):
    before = families(tiny_server.url)
    assert set(NAMES) <= set(before), set(NAMES) - set(before)
    for f in before.values():
        if f.name.startswith("vllm:"):
            assert all(s.labels.get("model_name") == "tiny" for s in f.samples)
    (info,) = before["vllm:cache_config_info"].samples  # the KV cache's facts as labels, value 1
    assert info.value == 1 and info.labels["cache_dtype"] in ("float32", "bfloat16")
    assert int(info.labels["num_gpu_blocks"]) > 0 and int(info.labels["kv_cache_bytes"]) >= int(info.labels["num_gpu_blocks"])
    from pagedserve.server.metrics import CPU_THREADS

    (threads,) = before[CPU_THREADS].samples  # the thread tuner's choice: 1 up to what the process may use
    assert threads.labels == {"model_name": "tiny"} and 1 <= threads.value <= len(os.sched_getaffinity(0))

    def total(fams, name, suffix="_total", **labels):
        return sum(s.value for s in fams[name].samples
                   if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items()))

    r = httpx.post(f"{tiny_server.base}/completions", json={"prompt": [7] * 40, "max_tokens": 9, "ignore_eos": True}).json()
    after = families(tiny_server.url)
    assert total(after, "vllm:generation_tokens") - total(before, "vllm:generation_tokens") == 9
    assert total(after, "vllm:prompt_tokens") - total(before, "vllm:prompt_tokens") == r["usage"]["prompt_tokens"] == 40
    assert total(after, "vllm:request_success", finished_reason="length") - total(before, "vllm:request_success", finished_reason="length") == 1
    for h in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds"):
        assert total(after, h, "_count") - total(before, h, "_count") == 1
    assert total(after, "vllm:inter_token_latency_seconds", "_count") - total(before, "vllm:inter_token_latency_seconds", "_count") == 8


def test_real_prometheus_scrapes_it(tiny_server):
    from prom_utils import PrometheusServer

    prom = PrometheusServer([(tiny_server.port, {})])
    try:
        for _ in range(3):
            httpx.post(f"{tiny_server.base}/completions", json={"prompt": "hello", "max_tokens": 5})
        query = prom.query
        deadline, got = time.monotonic() + 45, None
        while time.monotonic() < deadline:
            got = query('vllm:generation_tokens_total{model_name="tiny"}')
            if got:
                break
            time.sleep(1)
        assert got and float(got[0]["value"][1]) >= 15
        # The kinds of queries dashboards and autoscalers use.
        assert query('sum(vllm:num_requests_waiting{model_name="tiny"})') is not None
        p99 = query("histogram_quantile(0.99, sum by (le) (vllm:time_to_first_token_seconds_bucket))")
        assert p99 and float(p99[0]["value"][1]) > 0
        up = query('up{job="pagedserve"}')
        assert up and up[0]["value"][1] == "1"
    finally:
        prom.stop()
