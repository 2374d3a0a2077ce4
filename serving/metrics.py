"""Prometheus metrics of one server, in its own registry, exposed over HTTP on a loopback port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS_S = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CANDIDATE_BUCKETS = (1, 5, 10, 20, 50, 100, 200, 300, 500, 1000)


class ServingMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fin_requests", "calls by method and status code", ["method", "code"], registry=r)
        self.latency = Histogram("fin_request_seconds", "time inside the server by method", ["method"],
                                 buckets=LATENCY_BUCKETS_S, registry=r)
        self.candidates = Histogram("fin_candidates_per_request", "candidates per Score call",
                                    buckets=CANDIDATE_BUCKETS, registry=r)
        self.forward_requests = Histogram("fin_forward_requests", "Score requests sharing one forward",
                                          buckets=(1, 2, 3, 4, 6, 8, 12, 16), registry=r)
        self.infer_requests = Histogram("fin_infer_requests", "ModelInfer calls sharing one forward",
                                        buckets=(1, 2, 3, 4, 6, 8, 12, 16), registry=r)
        self.cache = Counter("fin_feature_cache", "online feature cache lookups: the user's timeline, item and shop stats",
                             ["cache", "result"], registry=r)
        self.degraded = Counter("fin_degraded_requests", "requests scored without the online store", registry=r)
        self.cold_start = Counter("fin_cold_start_requests", "requests of users without a stored timeline",
                                  registry=r)
        self.model_version = Gauge("fin_model_version", "the version each model serves unpinned (its promoted one, "
                                   "else its newest loaded)", ["model"], registry=r)
        self.model_compiled = Gauge("fin_model_compiled", "1 when a loaded CTR version scores through its compiled "
                                    "package, 0 when eagerly", ["model", "version"], registry=r)
        self.reload_failures = Counter("fin_model_reload_failures", "model versions refused", ["model"], registry=r)
        self._http = None

    def serve_http(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start the /metrics endpoint; returns its port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()


def scrape(url: str, name: str, **labels: str) -> float:
    """The value of sample `name` with `labels` on a /metrics page (summed over matching samples; 0 when
    absent): how clients and tests read a server's metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as r:
        families = text_string_to_metric_families(r.read().decode())
    return sum(s.value for f in families for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))
