"""Prometheus metrics with vLLM's names, so existing dashboards, HPA and KEDA rules work as is.

Gauges and counters are read from the engine at scrape time (a collector), so the engine loop only
increments plain integers; latency histograms are observed on the HTTP side as outputs arrive.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

BATCH_LINES = "pagedserve:batch_lines"
BATCH_LINES_FINISHED = "pagedserve:batch_lines_finished"  # a counter: exposed with _total
CPU_THREADS = "pagedserve:cpu_threads"
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]


class _EngineCollector:
    def __init__(self, engine, model_name: str):
        self.engine, self.model_name = engine, model_name

    def collect(self):
        e, labels, lv = self.engine, ["model_name"], [self.model_name]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(lv, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(lv, value)
            return c

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.", e.num_running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", e.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", e.kv.usage)
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", e.stats.prompt_tokens)
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.", e.stats.generation_tokens)
        # The thread tuner's choice (engine/thread_tuner.py): 1 of N while a probe finds the CPU shared.
        yield gauge(CPU_THREADS, "Threads the engine's steps run on now.", e.cpu_threads)
        yield counter("vllm:num_preemptions", "Cumulative number of preemptions.", e.scheduler.num_preemptions)
        yield counter("vllm:prefix_cache_queries", "Prefix cache queries, in tokens.", e.kv.prefix_queries)
        yield counter("vllm:prefix_cache_hits", "Prefix cache hits, in tokens.", e.kv.prefix_hits)
        # vLLM's info gauge (value 1, facts as labels): the KV cache's dtype as given (int8 / fp8
        # hold ~1 byte per value plus row scales), its blocks and their size, and its bytes.
        r = e.runner
        info = GaugeMetricFamily("vllm:cache_config_info", "Information of the KV cache configuration.",
                                 labels=["model_name", "cache_dtype", "block_size", "num_gpu_blocks", "kv_cache_bytes"])
        info.add_metric([self.model_name, e.cfg.kv_cache_dtype if e.cfg.kv_cache_dtype != "auto" else
                         str(r.kv_dtype).removeprefix("torch."), str(e.cfg.block_size), str(r.num_blocks),
                         str(r.kv_bytes)], 1.0)
        yield info
        ok = CounterMetricFamily("vllm:request_success", "Count of successfully processed requests.",
                                 labels=["model_name", "finished_reason"])
        for reason, n in e.stats.finished.items():
            ok.add_metric([self.model_name, reason], n)
        yield ok


class ServerMetrics:
    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, model_name))
        self.model_name = model_name

        def hist(name, doc, buckets):
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=self.registry).labels(model_name)

        self.ttft = hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.", E2E_BUCKETS)
        self.queue = hist("vllm:request_queue_time_seconds", "Histogram of time spent waiting in the queue.", E2E_BUCKETS)
        # The Batches API (batch/manager.py): each running batch's lines by state (its labels go when
        # the batch ends), and every finished line by outcome.
        self.batch_lines = Gauge(BATCH_LINES, "Lines of each running batch: queued, running, done.",
                                 ["batch_id", "state"], registry=self.registry)
        self.batch_lines_total = Counter(BATCH_LINES_FINISHED, "Batch lines finished, by outcome.", ["outcome"],
                                         registry=self.registry)

    def observe_finished(self, metrics) -> None:
        m = metrics
        if m.first_token_time is not None:
            self.ttft.observe(m.first_token_time - m.arrival_time)
        if m.first_scheduled_time is not None:
            self.queue.observe(m.first_scheduled_time - m.arrival_time)
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)
