"""The gateway's own Prometheus metrics (its own registry, so tests can run several gateways)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


class GatewayMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        p = "pagedserve_gateway_"
        self.requests = Counter(p + "requests", "Requests by outcome",
                                ["department", "model", "pool", "backend", "status"], registry=r)
        self.tokens = Counter(p + "tokens", "Tokens by direction",
                              ["department", "model", "pool", "backend", "kind"], registry=r)
        self.cost = Counter(p + "cost", "Cost in the price table's currency",
                            ["department", "model", "pool", "backend"], registry=r)
        self.latency = Histogram(p + "request_latency_seconds", "Request latency, end to end through the gateway",
                                 ["model", "pool"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time to the first streamed content",
                              ["model", "pool"], buckets=LATENCY_BUCKETS, registry=r)
        self.retries = Counter(p + "retries", "Attempts retried on another backend", ["pool", "reason"], registry=r)
        self.fallbacks = Counter(p + "fallbacks", "Requests sent to a fallback pool", ["from_pool", "to_pool", "reason"],
                                 registry=r)
        self.continuations = Counter(p + "stream_continuations", "Streams whose backend died mid-way, by outcome "
                                     "(continued on another backend, or failed)", ["pool", "outcome"], registry=r)
        self.rejected = Counter(p + "rejected", "Requests refused before routing", ["reason"], registry=r)
        self.backend_healthy = Gauge(p + "backend_healthy", "1 if the backend is in its pool", ["pool", "backend"],
                                     registry=r)
        self.backend_outstanding = Gauge(p + "backend_outstanding", "Requests in flight to the backend",
                                         ["pool", "backend"], registry=r)
        self.audit_queue = Gauge(p + "audit_queue_rows", "Audit rows waiting to be written", registry=r)
        self.audit_reduced = Counter(p + "audit_rows_reduced", "Audit rows the database refused, written without "
                                     "their text", registry=r)
        self.audit_dropped = Counter(p + "audit_rows_dropped", "Audit rows that could not be written",
                                     ["reason"], registry=r)
