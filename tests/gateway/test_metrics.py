"""`GET /metrics` through a real gateway: request outcomes by door, upstream attempts and errors,
cache results, cooldowns, in-flight calls, and store errors while a private Redis is down.
Also: the Baidu door honours the client's Cache-Control like the OpenAI door."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.cooldown import Cooldowns
from gateway.metrics import GatewayCollector, Metrics, SharedMetrics
from gateway.routing import BackendStats
from tests.support import EmulatedUpstream, RedisServer, free_port, gateway_process, start_gateway, write_config

KEY = "sk-metrics"
AUTH = {"authorization": f"Bearer {KEY}"}
BAIDU_CHAT = "/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/"


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[EmulatedUpstream, EmulatedUpstream]]:
    good, flaky = EmulatedUpstream(), EmulatedUpstream()
    yield good, flaky
    good.server.stop()
    flaky.server.stop()


@pytest.fixture(autouse=True)
def _reset(upstreams: tuple[EmulatedUpstream, EmulatedUpstream]) -> None:
    for u in upstreams:
        u.ctl.reset()


def config_text(good: EmulatedUpstream, flaky: EmulatedUpstream, store: str = "memory://") -> str:
    dead = free_port()  # nothing listens here
    return f"""
store: {{url: "{store}", timeout_ms: 300}}
admin: {{key: sk-admin}}
backends:
  vllm: {{kind: openai, base_url: "{good.base}", model: llama, timeout: {{connect: 1, read: 10}}}}
  down: {{kind: openai, base_url: "http://127.0.0.1:{dead}/v1", model: m, timeout: {{connect: 1, read: 5}}}}
  flaky: {{kind: openai, base_url: "{flaky.base}", model: f, timeout: {{connect: 1, read: 5}},
           cooldown: {{failures: 2, window: 30, duration: 60}}}}
models:
  echo: {{targets: [{{backend: vllm}}]}}
  broken: {{targets: [{{backend: down}}]}}
  wobbly: {{targets: [{{backend: flaky}}]}}
  cached: {{targets: [{{backend: vllm}}], cache: {{ttl: 60, mode: always}}}}
keys:
  - {{name: metrics-app, key: {KEY}, user: metrics-user, limits: {{rpm: 1000}}}}
"""


@pytest.fixture(scope="module")
def gateway(upstreams: tuple[EmulatedUpstream, EmulatedUpstream]) -> Iterator[str]:
    with start_gateway(config_text(*upstreams)) as url:
        yield url


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = httpx.get(url + "/metrics", timeout=5)  # no key, although admin.key is set
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def chat(url: str, model: str, text: str = "hello", **extra: object) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=20,
                      json={"model": model, "messages": [{"role": "user", "content": text}], **extra})


def baidu(url: str, endpoint: str, text: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(url + BAIDU_CHAT + endpoint, timeout=20, headers={**AUTH, **(headers or {})},
                      json={"messages": [{"role": "user", "content": text}]})


def test_requests_are_counted_by_door_alias_and_status_with_upstream_attempts_and_errors(gateway: str) -> None:
    before = scrape(gateway)
    assert chat(gateway, "echo").status_code == 200
    assert chat(gateway, "echo", stream=True).status_code == 200
    failed = chat(gateway, "broken")
    assert failed.status_code >= 500
    assert baidu(gateway, "echo", "hi").json()["result"]
    after = scrape(gateway)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("gateway_requests_total", door="openai", alias="echo", status="200") == 2
    assert moved("gateway_requests_total", door="openai", alias="broken", status=str(failed.status_code)) == 1
    assert moved("gateway_requests_total", door="baidu", alias="echo", status="200") == 1
    assert moved("gateway_upstream_attempts_total", backend="vllm") == 3
    assert moved("gateway_upstream_attempts_total", backend="down") == 1
    codes = {dict(labels)["code"] for (name, labels), v in after.items()
             if name == "gateway_upstream_errors_total" and dict(labels)["backend"] == "down" and v}
    assert codes and failed.json()["error"]["code"] in codes


def test_an_unknown_model_is_counted_without_its_name_as_a_label(gateway: str) -> None:
    before = scrape(gateway)
    r = chat(gateway, "no-such-model-xyz")
    assert r.status_code == 404
    after = scrape(gateway)
    assert not any(dict(labels).get("alias") == "no-such-model-xyz" for _, labels in after)
    assert value(after, "gateway_requests_total", door="openai", alias="unknown", status="404") == \
        value(before, "gateway_requests_total", door="openai", alias="unknown", status="404") + 1


def test_a_backend_in_cooldown_shows_up(gateway: str, upstreams: tuple[EmulatedUpstream, EmulatedUpstream]) -> None:
    assert value(scrape(gateway), "gateway_backend_cooldown", backend="flaky") == 0
    upstreams[1].ctl.fail_status = 503
    for _ in range(2):
        assert chat(gateway, "wobbly").status_code >= 500
    samples = scrape(gateway)
    assert value(samples, "gateway_backend_cooldown", backend="flaky") == 1
    assert value(samples, "gateway_backend_cooldown", backend="vllm") == 0
    assert ("gateway_backend_cooldown", frozenset({("backend", "vllm")})) in samples


def test_calls_in_flight_show_per_backend(gateway: str, upstreams: tuple[EmulatedUpstream, EmulatedUpstream]) -> None:
    upstreams[0].ctl.latency = 1.0
    worker = threading.Thread(target=chat, args=(gateway, "echo"))
    worker.start()
    deadline = time.monotonic() + 5
    while not upstreams[0].ctl.active:
        assert time.monotonic() < deadline, "the request never reached the emulator"
        time.sleep(0.02)
    during = scrape(gateway)
    worker.join()
    assert value(during, "gateway_backend_in_flight", backend="vllm") == 1
    assert value(during, "gateway_backend_in_flight", backend="down") == 0
    assert value(scrape(gateway), "gateway_backend_in_flight", backend="vllm") == 0


def test_the_baidu_door_honours_cache_control_no_store(
        gateway: str, upstreams: tuple[EmulatedUpstream, EmulatedUpstream]) -> None:
    before = scrape(gateway)
    for _ in range(2):
        r = baidu(gateway, "cached", "cache me not", {"cache-control": "no-store"})
        assert r.json()["result"] and r.headers["x-gateway-cache"] == "bypass"
    assert len(upstreams[0].ctl.requests) == 2
    # without the header the same request is cached: the header is what made the difference
    assert baidu(gateway, "cached", "cache me not").headers["x-gateway-cache"] == "miss"
    assert baidu(gateway, "cached", "cache me not").headers["x-gateway-cache"] == "hit"
    assert len(upstreams[0].ctl.requests) == 3
    after = scrape(gateway)
    for result, n in (("bypass", 2), ("miss", 1), ("hit", 1)):
        assert value(after, "gateway_cache_total", alias="cached", result=result) - \
            value(before, "gateway_cache_total", alias="cached", result=result) == n
    # aliases without a cache are not counted as bypasses
    assert not any(name == "gateway_cache_total" and dict(labels)["alias"] == "echo" for name, labels in after)


@pytest.fixture
def fragile(upstreams: tuple[EmulatedUpstream, EmulatedUpstream]) -> Iterator[tuple[str, RedisServer]]:
    """A gateway on a private redis-server that the test stops."""
    server = RedisServer().start()
    try:
        with start_gateway(config_text(*upstreams, store=server.url)) as url:
            yield url, server
    finally:
        server.stop()


def test_store_errors_and_pending_settlements_show_up_while_the_store_is_down(
        fragile: tuple[str, RedisServer]) -> None:
    url, server = fragile
    assert chat(url, "cached", "before").status_code == 200
    before = scrape(url)
    assert value(before, "gateway_store_errors_total", feature="limits") == 0
    assert value(before, "gateway_store_errors_total", feature="cache") == 0
    assert value(before, "gateway_pending_settlements") == 0

    server.stop()
    assert chat(url, "cached", "during").status_code == 200  # limits open, cache skipped
    during = scrape(url)
    assert value(during, "gateway_store_errors_total", feature="limits") >= 2  # admission and settlement
    assert value(during, "gateway_store_errors_total", feature="cache") >= 1
    assert value(during, "gateway_pending_settlements") >= 1


def test_with_two_workers_any_scrape_counts_both(upstreams: tuple[EmulatedUpstream, EmulatedUpstream],
                                                 tmp_path: Path) -> None:
    path = write_config(tmp_path, config_text(*upstreams))
    with gateway_process(path, workers=2) as url:
        deadline = time.monotonic() + 10
        while value(scrape(url), "gateway_workers") < 2:  # both up and publishing
            assert time.monotonic() < deadline, "the second worker never published its metrics"
            time.sleep(0.2)
        for _ in range(30):  # a new connection each: the two workers share them out
            r = chat(url, "echo")
            assert r.status_code == 200
        time.sleep(1.5)  # every worker has republished since
        for _ in range(8):  # each scrape (a new connection) lands on one worker or the other
            samples = scrape(url)
            assert value(samples, "gateway_workers") == 2
            assert value(samples, "gateway_requests_total", door="openai", alias="echo", status="200") == 30
            assert value(samples, "gateway_upstream_attempts_total", backend="vllm") == 30


def test_workers_numbers_add_up_and_a_gone_workers_gauges_leave(tmp_path: Path) -> None:
    """Two workers' collectors over one folder (which worker a scrape reaches is the kernel's
    choice, so the sums are checked here, where both sides are known)."""

    class Limiter:
        store_errors, pending = 0, 0

    def worker(name: str) -> tuple[Metrics, GatewayCollector]:
        m, limiter, stats = Metrics(), Limiter(), {"vllm": BackendStats()}
        source = {"limiter": limiter, "cache": None, "stats": stats, "cooldowns": Cooldowns(None, {}),
                  "backends": ["vllm"]}
        return m, GatewayCollector(m, lambda: source, SharedMetrics(tmp_path, name))

    (ma, a), (mb, b) = worker("a"), worker("b")
    ma.requests[("openai", "echo", 200)] += 3
    mb.requests[("openai", "echo", 200)] += 5
    mb.requests[("baidu", "echo", 200)] += 1
    b.source()["limiter"].pending = 2
    b.source()["stats"]["vllm"].in_flight = 4
    b.publish()

    def sample(c: GatewayCollector, name: str, **labels: str) -> float:
        for family in c.collect():
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return s.value
        return 0.0

    assert sample(a, "gateway_requests_total", door="openai", alias="echo", status="200") == 8
    assert sample(a, "gateway_requests_total", door="baidu", alias="echo", status="200") == 1
    assert sample(b, "gateway_requests_total", door="openai", alias="echo", status="200") == 8  # a published
    assert (sample(a, "gateway_workers"), sample(a, "gateway_pending_settlements"),
            sample(a, "gateway_backend_in_flight", backend="vllm")) == (2, 2, 4)
    old = time.time() - 60  # b stopped a minute ago: its counters stay, its gauges go
    os.utime(tmp_path / "b.json", (old, old))
    assert sample(a, "gateway_requests_total", door="openai", alias="echo", status="200") == 8
    assert (sample(a, "gateway_workers"), sample(a, "gateway_pending_settlements"),
            sample(a, "gateway_backend_in_flight", backend="vllm")) == (1, 0, 0)
