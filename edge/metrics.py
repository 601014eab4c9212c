"""Prometheus metrics of the edge agent (prometheus_client, one registry per agent), served only when asked for
(`--metrics-port`), on 127.0.0.1 unless `--metrics-host` says otherwise.

    metrics = EdgeMetrics()
    metrics.watch(source=source, agent=agent, link=link, check=check)   # read at scrape time
    port = metrics.serve("127.0.0.1", 9102)                              # GET http://127.0.0.1:9102/metrics
    metrics.observe(result)                                             # per answered frame (edge.pipeline.FrameResult)
    metrics.stop()

Counters and histograms are updated from the answered frames in the agent's result loop; what other parts count
themselves (a live source's reconnects, the frames the latest-frame-wins queue replaced, the circuit and the
start-up check) is read from them when Prometheus scrapes. Offload share: rapnet_edge_offloaded_frames_total /
(rapnet_edge_offloaded_frames_total + rapnet_edge_local_frames_total).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class EdgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.frames = Counter("rapnet_edge_frames", "Frames answered, by where: edge, cloud or edge-fallback",
                              ["where"], registry=r)
        self.offloaded = Counter("rapnet_edge_offloaded_frames", "Frames the cloud answered", registry=r)
        self.local = Counter("rapnet_edge_local_frames", "Frames answered on the edge (planned or fallback)",
                             registry=r)
        self.exits = Counter("rapnet_edge_exits", "Frames answered, by the exit that answered", ["exit"], registry=r)
        self.degraded = Counter("rapnet_edge_degraded_frames",
                                "Frames answered here although the plan was to offload, by reason "
                                "(a gRPC status, circuit open/half-open, cloud check failed)", ["reason"], registry=r)
        self.sent_bytes = Counter("rapnet_edge_sent_bytes", "Bytes of the requests sent to the cloud", registry=r)
        self.latency = Histogram("rapnet_edge_latency_seconds", "Capture to answer, per frame",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.network = Histogram("rapnet_edge_network_seconds",
                                 "Round trip minus the cloud's own time, per frame the cloud answered",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self._live = _LiveState()
        r.register(self._live)
        self._server = None

    def observe(self, result) -> None:
        """Count one answered frame (an edge.pipeline.FrameResult)."""
        self.frames.labels(result.where).inc()
        (self.offloaded if result.where == "cloud" else self.local).inc()
        self.exits.labels(str(result.exit)).inc()
        if result.degraded:
            self.degraded.labels((result.degraded_reason or "unknown").split(":")[0]).inc()
        if result.bytes_sent:
            self.sent_bytes.inc(result.bytes_sent)
        total = result.latency_ms.get("total")
        if total is not None:
            self.latency.observe(total / 1e3)
        if result.where == "cloud" and "network" in result.latency_ms:
            self.network.observe(result.latency_ms["network"] / 1e3)

    def watch(self, source=None, agent=None, link=None, check=None) -> None:
        """Parts whose own counters are read at scrape time (any may be None)."""
        self._live.parts = {"source": source, "agent": agent, "link": link, "check": check}

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint; returns the bound port (`port` 0: a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _LiveState(Collector):
    """What other parts of the agent count, read when Prometheus scrapes."""

    def __init__(self) -> None:
        self.parts: dict = {}

    def collect(self):
        source, agent = self.parts.get("source"), self.parts.get("agent")
        link, check = self.parts.get("link"), self.parts.get("check")
        reconnects = CounterMetricFamily("rapnet_edge_source_reconnects",
                                         "Times a live source came back after an outage")
        reconnects.add_metric([], getattr(source, "reconnects", 0))
        yield reconnects
        outages = CounterMetricFamily("rapnet_edge_source_outages", "Times a live source stopped delivering frames")
        outages.add_metric([], getattr(source, "outages", 0))
        yield outages
        counters = getattr(agent, "counters", None)
        captured = CounterMetricFamily("rapnet_edge_captured_frames", "Frames read from the source")
        captured.add_metric([], getattr(counters, "captured", 0))
        yield captured
        dropped = CounterMetricFamily("rapnet_edge_dropped_frames",
                                      "Live frames replaced by a newer one before the model took them")
        dropped.add_metric([], getattr(counters, "dropped", 0))
        yield dropped
        if link is not None:
            circuit = GaugeMetricFamily("rapnet_edge_circuit_open", "1 while the circuit breaker keeps frames here")
            circuit.add_metric([], float(link.breaker.state != "closed"))
            yield circuit
            trips = CounterMetricFamily("rapnet_edge_circuit_trips", "Times the circuit breaker opened")
            trips.add_metric([], link.breaker.trips)
            yield trips
            usable = GaugeMetricFamily("rapnet_edge_cloud_usable",
                                       "1 unless the start-up check found the cloud unusable (offloading blocked)")
            usable.add_metric([], float(link.blocked is None))
            yield usable
        if check is not None:
            attempts = CounterMetricFamily("rapnet_edge_cloud_checks", "Start-up checks of the cloud made")
            attempts.add_metric([], check.attempts)
            yield attempts
