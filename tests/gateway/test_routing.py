"""Routing and resilience, through the gateway, with fault injection in two emulators."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support import ROOT, EmulatedUpstream, RedisServer, free_port, gateway_process, start_gateway, wait_for

KEY = "sk-route"
AUTH = {"authorization": f"Bearer {KEY}"}
HELLO = {"messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[EmulatedUpstream, EmulatedUpstream]]:
    a, b = EmulatedUpstream(), EmulatedUpstream()
    yield a, b
    a.server.stop()
    b.server.stop()


@pytest.fixture(autouse=True)
def _reset(upstreams: tuple[EmulatedUpstream, EmulatedUpstream]) -> None:
    for u in upstreams:
        u.ctl.reset()


def routing_config(a: EmulatedUpstream, b: EmulatedUpstream, weights: tuple[int, int] = (3, 1),
                   store: str = "memory://", cooldown: str = "") -> str:
    return f"""
store: {{url: "{store}"}}
backends:
  primary: {{kind: openai, base_url: "{a.base}", model: a,
             timeout: {{connect: 1, read: 10, first_byte: 0.5, idle: 0.5, total: 5}} {cooldown}}}
  secondary: {{kind: openai, base_url: "{b.base}", model: b, timeout: {{connect: 1, read: 10}}}}
models:
  main: {{targets: [{{backend: primary}}], fallbacks: [backup]}}
  backup: {{targets: [{{backend: secondary}}]}}
  patient: {{targets: [{{backend: primary}}], retries: {{attempts: 1, max_backoff: 2}}}}
  split:
    strategy: weighted
    targets: [{{backend: primary, weight: {weights[0]}}}, {{backend: secondary, weight: {weights[1]}}}]
keys:
  - {{name: router-test, key: {KEY}, user: ops}}
admin: {{key: sk-admin}}
"""


@pytest.fixture(scope="module")
def gateway(upstreams: tuple[EmulatedUpstream, EmulatedUpstream]) -> Iterator[str]:
    with start_gateway(routing_config(*upstreams)) as url:
        yield url


def chat(url: str, model: str, **extra: object) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers=AUTH, json={"model": model, **HELLO, **extra},
                      timeout=20)


def test_a_failing_primary_falls_back_and_the_client_sees_200(
        gateway: str, upstreams: tuple[EmulatedUpstream, EmulatedUpstream]) -> None:
    upstreams[0].ctl.fail_status = 500
    r = httpx.post(gateway + "/v1/chat/completions", json={"model": "main", **HELLO},
                   headers={**AUTH, "x-gateway-explain": "1"})
    assert r.status_code == 200
    assert r.headers["x-gateway-attempts"] == "2"
    assert r.headers["x-gateway-backend"] == "secondary"
    explain = httpx.Response(200, content=r.headers["x-gateway-explain"]).json()
    assert explain["considered"] == [
        {"backend": "primary", "error": "upstream_unavailable", "status": 502},
        {"backend": "secondary", "answered": True}]
    assert len(upstreams[0].ctl.requests) == 1 and len(upstreams[1].ctl.requests) == 1


def test_429_with_retry_after_is_retried_after_that_delay(
        gateway: str, upstreams: tuple[EmulatedUpstream, EmulatedUpstream]) -> None:
    ctl = upstreams[0].ctl
    ctl.fail_status, ctl.fail_times, ctl.retry_after = 429, 1, "1"
    start = time.monotonic()
    r = chat(gateway, "patient")
    elapsed = time.monotonic() - start
    assert r.status_code == 200
    assert r.headers["x-gateway-attempts"] == "2"
    assert 0.9 <= elapsed < 1.8
    assert len(ctl.requests) == 2


def test_a_client_error_is_never_retried(gateway: str, upstreams: tuple[EmulatedUpstream, EmulatedUpstream]) -> None:
    upstreams[0].ctl.fail_status = 400
    for model in ("patient", "main"):
        r = chat(gateway, model)
        assert r.status_code == 400
        assert r.headers["x-gateway-attempts"] == "1"
    assert len(upstreams[0].ctl.requests) == 2
    assert upstreams[1].ctl.requests == []


def test_weighted_3_to_1_lands_within_3_points_of_75_25(
        gateway: str, upstreams: tuple[EmulatedUpstream, EmulatedUpstream]) -> None:
    n = 2000
    with httpx.Client(headers=AUTH) as http:
        for _ in range(n):
            assert http.post(gateway + "/v1/chat/completions", json={"model": "split", **HELLO}).status_code == 200
    share = len(upstreams[0].ctl.requests) / n
    assert abs(share - 0.75) <= 0.03, share


def test_a_backend_stalling_before_the_first_byte_moves_on_within_the_ttfb_timeout(
        gateway: str, upstreams: tuple[EmulatedUpstream, EmulatedUpstream]) -> None:
    upstreams[0].ctl.latency = 3.0
    start = time.monotonic()
    c = openai.OpenAI(base_url=gateway + "/v1", api_key=KEY, max_retries=0)
    text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="main", stream=True, **HELLO) if ch.choices)
    assert text == "You said: hello"
    assert time.monotonic() - start < 1.5


def test_a_stream_stalling_mid_way_ends_with_an_error_event_within_the_idle_timeout(
        gateway: str, upstreams: tuple[EmulatedUpstream, EmulatedUpstream]) -> None:
    upstreams[0].ctl.chunk_delay = 3.0
    c = openai.OpenAI(base_url=gateway + "/v1", api_key=KEY, max_retries=0)
    start = time.monotonic()
    got = []
    with pytest.raises(openai.APIError, match=r"no next chunk within 0\.5s"):
        for ch in c.chat.completions.create(model="main", stream=True, **HELLO):
            got.extend(choice.delta.content or "" for choice in ch.choices)
    assert time.monotonic() - start < 1.5
    assert "".join(got) == "You"  # what arrived before the stall was forwarded
    assert upstreams[1].ctl.requests == []  # after the first byte there is no failover


def test_reload_changes_weights_and_refuses_a_broken_file(
        tmp_path: Path, upstreams: tuple[EmulatedUpstream, EmulatedUpstream]) -> None:
    a, b = upstreams
    path = tmp_path / "gw.yaml"
    path.write_text(routing_config(a, b, weights=(1, 0)))
    port = free_port()
    with gateway_process(path, port=port) as url:
        assert all(chat(url, "split").status_code == 200 for _ in range(20))
        assert (len(a.ctl.requests), len(b.ctl.requests)) == (20, 0)
        admin = {"authorization": "Bearer sk-admin"}
        path.write_text(routing_config(a, b, weights=(0, 1)))
        assert httpx.post(url + "/admin/reload", headers=admin).json() == {"status": "reloaded"}
        assert all(chat(url, "split").status_code == 200 for _ in range(20))
        assert (len(a.ctl.requests), len(b.ctl.requests)) == (20, 20)
        path.write_text("backends: {oops")
        r = httpx.post(url + "/admin/reload", headers=admin)
        assert r.status_code == 400 and "not valid YAML" in r.json()["error"]
        assert chat(url, "split").status_code == 200
        assert len(b.ctl.requests) == 21


def test_sighup_reloads_every_worker_without_failing_in_flight_requests(
        tmp_path: Path, upstreams: tuple[EmulatedUpstream, EmulatedUpstream]) -> None:
    a, b = upstreams
    path = tmp_path / "gw.yaml"
    path.write_text(routing_config(a, b, weights=(1, 0)))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path), "--port", str(port),
         "--workers", "2", "--log-level", "warning"], cwd=ROOT, env=dict(os.environ),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url + "/healthz", proc=proc)
        time.sleep(1.0)  # both workers up
        b.ctl.chunk_delay = 0.05
        results: list[int] = []

        def slow_stream() -> None:
            with httpx.stream("POST", url + "/v1/chat/completions", headers=AUTH, timeout=20, json={
                    "model": "backup", "stream": True,
                    "messages": [{"role": "user", "content": " ".join(["w"] * 30)}]}) as r:
                body = "".join(r.iter_text())
                results.append(r.status_code if body.rstrip().endswith("[DONE]") else -1)

        in_flight = [threading.Thread(target=slow_stream) for _ in range(4)]
        for t in in_flight:
            t.start()
        time.sleep(0.3)
        path.write_text(routing_config(a, b, weights=(0, 1)))
        os.kill(proc.pid, signal.SIGHUP)
        time.sleep(1.0)
        before = len(b.ctl.requests)
        assert all(chat(url, "split").status_code == 200 for _ in range(20))
        assert len(b.ctl.requests) - before == 20  # every worker follows the new weights
        path.write_text("models: [")
        os.kill(proc.pid, signal.SIGHUP)
        time.sleep(0.5)
        assert chat(url, "split").status_code == 200
        for t in in_flight:
            t.join()
        assert results == [200] * 4
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert b"config reload refused" in err


def test_cooldown_is_shared_by_two_gateway_processes_then_probed_again(
        tmp_path: Path, upstreams: tuple[EmulatedUpstream, EmulatedUpstream], redis_server: RedisServer) -> None:
    a, b = upstreams
    path = tmp_path / "gw.yaml"
    path.write_text(routing_config(a, b, store=redis_server.url,
                                   cooldown=", cooldown: {failures: 3, window: 10, duration: 3}"))
    a.ctl.fail_status = 503
    with gateway_process(path) as one, gateway_process(path) as two:
        for _ in range(3):
            assert chat(one, "main").status_code == 200  # answered by the fallback
        assert len(a.ctl.requests) == 3
        time.sleep(0.5)  # the other process's view refreshes every 0.2 s
        cooled_at = time.monotonic()
        for url in (one, two) * 5:
            r = httpx.post(url + "/v1/chat/completions", json={"model": "main", **HELLO},
                           headers={**AUTH, "x-gateway-explain": "1"})
            assert r.status_code == 200 and r.headers["x-gateway-attempts"] == "1"
            assert '"skipped":"cooldown"' in r.headers["x-gateway-explain"]
        assert len(a.ctl.requests) == 3
        a.ctl.fail_status = None
        time.sleep(max(0.0, 3.3 - (time.monotonic() - cooled_at)) + 0.5)
        assert chat(two, "main").headers["x-gateway-backend"] == "primary"
        assert len(a.ctl.requests) == 4
    redis_server.flushall()
