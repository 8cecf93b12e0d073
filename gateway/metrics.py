"""Prometheus metrics for `GET /metrics`.

The hot path only bumps plain Python ints in dicts (`Metrics`); a custom collector turns them,
and the state other parts already keep (the limiter's and the cache's store error counts,
pending settlements, cooldowns, in-flight calls), into samples when Prometheus scrapes.
Each gateway owns its `CollectorRegistry`: nothing is registered at module level, so several
apps in one process (tests) never share or clash.

Every sample is per process: with `--workers N`, a scrape reaches one worker.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gateway.pipeline import CallMeta

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Plain counters bumped per request; read only at scrape time."""

    __slots__ = ("attempts", "cache", "requests", "upstream_errors")

    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, str, int], int] = defaultdict(int)  # (door, alias, status)
        self.attempts: defaultdict[str, int] = defaultdict(int)  # backend
        self.upstream_errors: defaultdict[tuple[str, str], int] = defaultdict(int)  # (backend, error code)
        self.cache: defaultdict[tuple[str, str], int] = defaultdict(int)  # (alias, hit|miss|bypass)

    def request(self, door: str, alias: str, status: int, meta: CallMeta | None, cached: bool) -> None:
        """One request's outcome; `meta` (when the call got that far) says which backends were
        tried and how each attempt ended, and the cache state (counted when the alias caches)."""
        self.requests[(door, alias, status)] += 1
        if meta is None:
            return
        if cached:
            self.cache[(alias, meta.cache)] += 1
        for d in meta.decisions:
            if "skipped" in d:
                continue
            backend = d["backend"]
            self.attempts[backend] += 1
            code = d.get("error")
            if code is not None:
                self.upstream_errors[(backend, code)] += 1

    def stream_failed(self, backend: str, code: str) -> None:
        """A stream cut by its backend after the first chunk (no longer an attempt to retry)."""
        self.upstream_errors[(backend, code)] += 1


class GatewayCollector(Collector):
    """Samples for one gateway; `source()` returns what to read (it changes on reload)."""

    def __init__(self, metrics: Metrics, source: Callable[[], dict[str, Any]]) -> None:
        self.metrics = metrics
        self.source = source

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        requests = CounterMetricFamily("gateway_requests", "Chat requests by inbound door, model alias and "
                                       "outcome status (the OpenAI status; the Baidu door's error bodies "
                                       "travel in HTTP 200)", labels=["door", "alias", "status"])
        for (door, alias, status), n in list(m.requests.items()):
            requests.add_metric([door, alias, str(status)], n)
        yield requests
        attempts = CounterMetricFamily("gateway_upstream_attempts", "Calls to a backend (retries and "
                                       "fallbacks count once each)", labels=["backend"])
        for backend, n in list(m.attempts.items()):
            attempts.add_metric([backend], n)
        yield attempts
        errors = CounterMetricFamily("gateway_upstream_errors", "Failed backend calls by error code, "
                                     "including streams cut after their first chunk", labels=["backend", "code"])
        for (backend, code), n in list(m.upstream_errors.items()):
            errors.add_metric([backend, code], n)
        yield errors
        cache = CounterMetricFamily("gateway_cache", "Response cache outcome of requests to aliases that "
                                    "cache: hit, miss, or bypass (not cacheable, or Cache-Control: no-store)",
                                    labels=["alias", "result"])
        for (alias, result), n in list(m.cache.items()):
            cache.add_metric([alias, result], n)
        yield cache

        src = self.source()
        store_errors = CounterMetricFamily(
            "gateway_store_errors", "Store calls that failed or timed out, by feature: limits = admission "
            "(rate limits and quotas, one script), settlement and usage records, slot refresh; "
            "cache = response cache reads, writes and fill locks", labels=["feature"])
        for feature, obj in (("limits", src["limiter"]), ("cache", src["cache"])):
            store_errors.add_metric([feature], getattr(obj, "store_errors", 0) if obj is not None else 0)
        yield store_errors
        limiter = src["limiter"]
        yield GaugeMetricFamily("gateway_pending_settlements", "Usage settlements waiting for the store",
                                value=limiter.pending if limiter is not None else 0)
        cooling = GaugeMetricFamily("gateway_backend_cooldown", "1 while a backend is in cooldown "
                                    "(skipped by routing)", labels=["backend"])
        in_flight = GaugeMetricFamily("gateway_backend_in_flight", "Calls open to a backend in this process",
                                      labels=["backend"])
        cooldowns, stats = src["cooldowns"], src["stats"]
        for backend in src["backends"]:
            cooling.add_metric([backend], 1 if cooldowns.cooling(backend) else 0)
            s = stats.get(backend)
            in_flight.add_metric([backend], s.in_flight if s is not None else 0)
        yield cooling
        yield in_flight


def build_registry(metrics: Metrics, source: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    """A registry of its own (never the global one): the gateway's samples and process stats."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(metrics, source))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
