"""Prometheus metrics of one server, and the HTTP endpoint that serves them.

Each server owns its own `CollectorRegistry`, so two servers in one process
(tests, embedding) never share counters. The handlers record request metrics.
Gauges of models and sessions are read from the manager and the session store
at scrape time, so they cannot drift.

The endpoint is a minimal HTTP/1.1 responder on an anyio TCP listener, run as
a task of the server's nursery on either backend. It serves ``GET /metrics``
and closes each connection after one response.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import anyio
import anyio.abc
from anyio.abc import TaskStatus
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from slm_trio._status_map import status_for_error
from slm_trio.errors import listen_error
from slm_trio.manager import ManagerEvent, ModelInfo, ModelState
from slm_trio.server._sessions import SessionStore

__all__ = ["RequestObservation", "ServerMetrics", "serve_metrics"]

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_LOAD_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_UNKNOWN_MODEL_LABEL = "(unknown)"
# The largest HTTP request head the endpoint reads before it responds.
_MAX_REQUEST_BYTES = 8192


@dataclass(kw_only=True)
class RequestObservation:
    """The labels of one RPC, which the handler fills in as it parses the request."""

    rpc: str
    model_id: str = ""


class _StateCollector(Collector):
    def __init__(
        self, list_models: Callable[[], list[ModelInfo]], sessions: SessionStore | None
    ) -> None:
        self._list_models = list_models
        self._sessions = sessions

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        models = GaugeMetricFamily(
            "slm_trio_models", "Models in the manager's table, by state.", labels=["state"]
        )
        infos = self._list_models()
        for state in ModelState:
            models.add_metric([state.value], sum(i.state is state for i in infos))
        yield models
        if self._sessions is not None:
            stats = self._sessions.statistics()
            yield GaugeMetricFamily(
                "slm_trio_sessions", "Open generation sessions.", value=stats.sessions
            )
            yield GaugeMetricFamily(
                "slm_trio_cached_tokens",
                "KV-cache tokens held by all sessions.",
                value=stats.cached_tokens,
            )
            closed = CounterMetricFamily(
                "slm_trio_sessions_closed",
                "Sessions the server closed on its own, by reason.",
                labels=["reason"],
            )
            closed.add_metric(["expired"], stats.expired)
            closed.add_metric(["reclaimed"], stats.reclaimed)
            yield closed
            yield CounterMetricFamily(
                "slm_trio_session_budget_rejections",
                "Session opens and steps rejected for the session limit or the KV-cache budget.",
                value=stats.rejected_for_budget,
            )


class ServerMetrics:
    """The metrics of one server in a registry of its own."""

    def __init__(
        self,
        *,
        list_models: Callable[[], list[ModelInfo]],
        sessions: SessionStore | None,
        is_known_model: Callable[[str], bool],
    ) -> None:
        self._is_known_model = is_known_model
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "slm_trio_requests",
            "RPCs handled, by model, method and status code.",
            ["model_id", "rpc", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "slm_trio_request_seconds",
            "Time from request received to response sent, by model and method.",
            ["model_id", "rpc"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "slm_trio_in_flight_requests", "RPCs being handled now.", registry=self.registry
        )
        self.load_seconds = Histogram(
            "slm_trio_model_load_seconds",
            "Time a successful model load took, by model.",
            ["model_id"],
            buckets=_LOAD_BUCKETS,
            registry=self.registry,
        )
        self.manager_events = Counter(
            "slm_trio_manager_events",
            "Model table changes (loaded, load_failed, evicted, unloaded...), by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.registry.register(_StateCollector(list_models, sessions))

    def on_manager_event(self, event: ManagerEvent) -> None:
        """Record a manager event; pass this to `AsyncModelManager.add_listener`."""
        self.manager_events.labels(event.kind).inc()
        if event.kind in ("loaded", "reloaded") and event.seconds is not None:
            self.load_seconds.labels(event.model_id).observe(event.seconds)

    @contextmanager
    def observe(self, rpc: str) -> Iterator[RequestObservation]:
        """Count one RPC with its status code and latency, and re-raise any exception."""
        observation = RequestObservation(rpc=rpc)
        started = time.perf_counter()
        code = Status.OK
        self.in_flight.inc()
        try:
            yield observation
        except GRPCError as exc:
            code = exc.status
            raise
        except Exception as exc:
            mapped = status_for_error(exc)
            code = mapped.status if mapped is not None else Status.INTERNAL
            raise
        except BaseException:
            code = Status.CANCELLED
            raise
        finally:
            self.in_flight.dec()
            # Clients choose model ids freely: label only ids the server holds,
            # so random ids cannot grow the label set without bound.
            model_label = observation.model_id
            if model_label and not self._is_known_model(model_label):
                model_label = _UNKNOWN_MODEL_LABEL
            self.requests.labels(model_label, rpc, code.name).inc()
            self.latency.labels(model_label, rpc).observe(time.perf_counter() - started)

    def render(self) -> bytes:
        """Return the metrics in Prometheus' text format."""
        return bytes(generate_latest(self.registry))


async def serve_metrics(
    metrics: ServerMetrics,
    *,
    host: str,
    port: int,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` over HTTP until cancelled; report the bound port.

    Cancellation: closes the listener and every open connection.
    """
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as exc:
        raise listen_error("metrics", host, port, exc) from exc
    async with listener:
        bound = int(listener.extra(anyio.abc.SocketAttribute.local_port))
        logger.info("metrics.listening host=%s port=%d", host, bound)
        task_status.started(bound)
        await listener.serve(lambda stream: _answer(stream, metrics))


async def _answer(stream: anyio.abc.SocketStream, metrics: ServerMetrics) -> None:
    async with stream:
        head = b""
        try:
            with anyio.fail_after(10):
                while b"\r\n\r\n" not in head and len(head) < _MAX_REQUEST_BYTES:
                    head += await stream.receive(4096)
        except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError):
            return
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) >= 2 and parts[0] == "GET" and parts[1].split("?")[0] == "/metrics":
            body = metrics.render()
            status = "200 OK"
            content_type = "text/plain; version=0.0.4; charset=utf-8"
        else:
            body = b"not found; metrics are at /metrics\n"
            status = "404 Not Found"
            content_type = "text/plain; charset=utf-8"
        response = (
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode("latin-1")
        try:
            await stream.send(response + body)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return
