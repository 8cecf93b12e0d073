"""Prometheus metrics for `GET /metrics`.

The hot path only bumps plain Python ints in dicts (`Metrics`); a custom collector turns them,
and the state other parts already keep (the limiter's and the cache's store error counts,
pending settlements, cooldowns, in-flight calls), into samples when Prometheus scrapes.
Each gateway owns its `CollectorRegistry`: nothing is registered at module level, so several
apps in one process (tests) never share or clash.

With `--workers N` a scrape reaches one worker, yet answers for all of them: each worker
publishes its numbers to a folder the parent made (`LLM_GATEWAY_METRICS_DIR`) every second and
when scraped, and the scraped one adds up every worker's file. Counters of a worker that exited
stay in the sum (counters never go down); its gauges leave it once its file is 10 s old. The
process_* samples are the scraped worker's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gateway.pipeline import CallMeta

CONTENT_TYPE = CONTENT_TYPE_LATEST
SHARED_DIR_ENV = "LLM_GATEWAY_METRICS_DIR"
GAUGES_FRESH_FOR = 10.0  # seconds a worker's file counts for gauges (it rewrites it every second)


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
    """Samples for one gateway; `source()` returns what to read (it changes on reload).
    With `shared`, the samples are the sum over every worker's published numbers."""

    def __init__(self, metrics: Metrics, source: Callable[[], dict[str, Any]],
                 shared: SharedMetrics | None = None) -> None:
        self.metrics = metrics
        self.source = source
        self.shared = shared

    def snapshot(self) -> dict[str, Any]:
        """This process's numbers, in a form that adds up across workers (JSON-safe)."""
        m, src = self.metrics, self.source()
        limiter, stats = src["limiter"], src["stats"]
        return {
            "requests": [[d, a, s, n] for (d, a, s), n in list(m.requests.items())],
            "attempts": [[b, n] for b, n in list(m.attempts.items())],
            "upstream_errors": [[b, c, n] for (b, c), n in list(m.upstream_errors.items())],
            "cache": [[a, r, n] for (a, r), n in list(m.cache.items())],
            "store_errors": {feature: getattr(obj, "store_errors", 0) if obj is not None else 0
                             for feature, obj in (("limits", limiter), ("cache", src["cache"]))},
            "pending": limiter.pending if limiter is not None else 0,
            "in_flight": {b: s.in_flight for b, s in list(stats.items())},
        }

    def publish(self) -> None:
        if self.shared is not None:
            self.shared.write(self.snapshot())

    async def keep_publishing(self, period: float = 1.0) -> None:
        """For `serve --workers N`: publish every `period` s, and once more when stopped."""
        try:
            while True:
                self.publish()
                await asyncio.sleep(period)
        finally:
            self.publish()  # the last numbers of a worker that stops

    def collect(self) -> Iterator[Metric]:
        own = self.snapshot()
        counted, gauged = [own], [own]
        if self.shared is not None:
            self.shared.write(own)
            for snap, fresh in self.shared.others():
                counted.append(snap)
                if fresh:
                    gauged.append(snap)
        yield from _counters(counted)
        yield GaugeMetricFamily("gateway_workers", "Worker processes whose gauges are in these samples "
                                "(1 without --workers)", value=len(gauged))
        yield GaugeMetricFamily("gateway_pending_settlements", "Usage settlements waiting for the store",
                                value=sum(s["pending"] for s in gauged))
        src = self.source()
        cooling = GaugeMetricFamily("gateway_backend_cooldown", "1 while a backend is in cooldown "
                                    "(skipped by routing; shared by every worker through the store)",
                                    labels=["backend"])
        in_flight = GaugeMetricFamily("gateway_backend_in_flight", "Calls open to a backend",
                                      labels=["backend"])
        cooldowns = src["cooldowns"]
        for backend in src["backends"]:
            cooling.add_metric([backend], 1 if cooldowns.cooling(backend) else 0)
            in_flight.add_metric([backend], sum(s["in_flight"].get(backend, 0) for s in gauged))
        yield cooling
        yield in_flight


def _counters(snaps: list[dict[str, Any]]) -> Iterator[Metric]:
    def total(field: str) -> defaultdict[tuple[Any, ...], int]:
        out: defaultdict[tuple[Any, ...], int] = defaultdict(int)
        for snap in snaps:
            for *labels, n in snap[field]:
                out[tuple(labels)] += n
        return out

    families = (
        ("requests", "gateway_requests", "Chat requests by inbound door, model alias and outcome status "
         "(the OpenAI status; the Baidu door's error bodies travel in HTTP 200)", ["door", "alias", "status"]),
        ("attempts", "gateway_upstream_attempts", "Calls to a backend (retries and fallbacks count once each)",
         ["backend"]),
        ("upstream_errors", "gateway_upstream_errors", "Failed backend calls by error code, including streams "
         "cut after their first chunk", ["backend", "code"]),
        ("cache", "gateway_cache", "Response cache outcome of requests to aliases that cache: hit, miss, or "
         "bypass (not cacheable, or Cache-Control: no-store)", ["alias", "result"]),
    )
    for field, name, doc, labels in families:
        family = CounterMetricFamily(name, doc, labels=labels)
        for key, n in total(field).items():
            family.add_metric([str(v) for v in key], n)
        yield family
    store_errors = CounterMetricFamily(
        "gateway_store_errors", "Store calls that failed or timed out, by feature: limits = admission "
        "(rate limits and quotas, one script), settlement and usage records, slot refresh; "
        "cache = response cache reads, writes and fill locks", labels=["feature"])
    for feature in ("limits", "cache"):
        store_errors.add_metric([feature], sum(s["store_errors"].get(feature, 0) for s in snaps))
    yield store_errors


class SharedMetrics:
    """The folder where every worker of one `serve --workers N` publishes its numbers."""

    def __init__(self, folder: str | Path, name: str | None = None) -> None:
        self.folder = Path(folder)
        self.own = self.folder / f"{name or os.getpid()}.json"

    def write(self, snap: dict[str, Any]) -> None:
        tmp = self.own.with_suffix(".tmp")
        with contextlib.suppress(OSError):  # metrics must never fail a worker
            tmp.write_bytes(json.dumps(snap).encode())
            os.replace(tmp, self.own)

    def others(self) -> Iterator[tuple[dict[str, Any], bool]]:
        """(snapshot, fresh enough for gauges) of every other worker, live or gone."""
        now = time.time()
        for path in self.folder.glob("*.json"):
            if path == self.own:
                continue
            try:
                age = now - path.stat().st_mtime
                snap = json.loads(path.read_bytes())
            except (OSError, ValueError):
                continue  # a worker replacing its file right now, or one that is gone
            yield snap, age < GAUGES_FRESH_FOR


def build_registry(collector: GatewayCollector) -> CollectorRegistry:
    """A registry of its own (never the global one): the gateway's samples and process stats."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


def shared_from_env() -> SharedMetrics | None:
    folder = os.environ.get(SHARED_DIR_ENV)
    return SharedMetrics(folder) if folder and os.path.isdir(folder) else None


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
