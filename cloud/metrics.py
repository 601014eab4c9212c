"""Prometheus metrics of the cloud front (prometheus_client, one registry per server).

Everything is recorded in the front process, which sees every request: replicas return their batch size,
queue and compute times with each result, and exactly one result per batch (and per split group) is marked,
so batch-level histograms count batches, not samples. Ray Serve's own metrics (replica processing latency,
queue lengths) are exported by Ray's metrics agent on the node's metrics export port; see docs/cloud.md.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class FrontMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rapnet_cloud_requests", "Inference requests answered, by method and gRPC status",
                                ["method", "code"], registry=r)
        self.in_flight = Gauge("rapnet_cloud_in_flight", "Samples admitted and not yet answered", registry=r)
        self.retries = Counter("rapnet_cloud_retries", "Requests retried after their replica died", registry=r)
        self.batch_size = Histogram("rapnet_cloud_batch_size", "Samples per replica batch", buckets=_BATCH_BUCKETS,
                                    registry=r)
        self.group_size = Histogram("rapnet_cloud_split_group_size", "Samples per split-point group in a batch",
                                    ["split"], buckets=_BATCH_BUCKETS, registry=r)
        self.decode = Histogram("rapnet_cloud_decode_seconds", "Request decode and validation time in the front",
                                ["split"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("rapnet_cloud_queue_seconds", "Front sent the sample -> its batch started computing",
                               ["split"], buckets=_LATENCY_BUCKETS, registry=r)
        self.compute = Histogram("rapnet_cloud_compute_seconds", "Forward pass of one split group",
                                 ["split"], buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("rapnet_cloud_request_seconds", "Time in the front, per answered request",
                                 ["split"], buckets=_LATENCY_BUCKETS, registry=r)
        self._server = None

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP exporter; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
