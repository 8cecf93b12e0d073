"""Issue 6's acceptance, end to end: two gateway processes sharing one redis-server behave as
one gateway (rate limits, quotas, concurrency, usage accounting, response cache), and the
gateway keeps serving by its stated policies when Redis stops or hangs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from adapters.loopback import LoopbackServer
from adapters.openai.emulator import EmulatorControl, create_emulator
from tests.support import ROOT, RedisServer, free_port, gateway_process, wait_for, write_config

ADMIN = {"authorization": "Bearer admin-secret"}
QUOTA = 600


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def config(emulator_url: str, redis_url: str, timeout_ms: int = 250) -> str:
    return f"""
store: {{url: "{redis_url}", timeout_ms: {timeout_ms}, slot_ttl: 2}}
admin: {{key: admin-secret}}
backends:
  vllm: {{kind: openai, base_url: "{emulator_url}/v1", model: llama, timeout: {{connect: 2, read: 20}}}}
models:
  llama: {{targets: [{{backend: vllm}}]}}
  cached: {{targets: [{{backend: vllm}}], cache: {{ttl: 60}}}}
  shared: {{targets: [{{backend: vllm}}], cache: {{ttl: 60, shared: true}}}}
users:
  quota-user: {{quota: {{tokens_per_day: {QUOTA}}}}}
keys:
  - {{name: rpm-app, key: sk-rpm, user: rpm-user, limits: {{rpm: 100}}}}
  - {{name: quota-app, key: sk-quota, user: quota-user}}
  - {{name: conc-app, key: sk-conc, user: conc-user, limits: {{concurrency: 3}}}}
  - {{name: alice-app, key: sk-alice, user: alice}}
  - {{name: bob-app, key: sk-bob, user: bob}}
"""


@pytest.fixture(scope="module")
def emulator() -> Iterator[tuple[LoopbackServer, EmulatorControl]]:
    ctl = EmulatorControl()
    server = LoopbackServer(create_emulator(ctl)).start()
    yield server, ctl
    server.stop()


@pytest.fixture(autouse=True)
def _reset(emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    emulator[1].reset()


@pytest.fixture(scope="module")
def cfg_path(emulator: tuple[LoopbackServer, EmulatorControl], redis_server: RedisServer,
             tmp_path_factory: pytest.TempPathFactory) -> Path:
    redis_server.flushall()
    return write_config(tmp_path_factory.mktemp("gw"), config(emulator[0].url, redis_server.url))


@pytest.fixture(scope="module")
def gateways(cfg_path: Path) -> Iterator[tuple[str, str]]:
    with gateway_process(cfg_path) as a, gateway_process(cfg_path) as b:
        yield a, b


def chat(text: str, **kw: object) -> dict[str, object]:
    return {"model": "llama", "messages": [{"role": "user", "content": text}], **kw}


async def post_all(bodies: list[tuple[str, dict[str, str], dict[str, object]]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=500, max_keepalive_connections=500)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        return await asyncio.gather(*(client.post(url + "/v1/chat/completions", headers=h, json=b)
                                      for url, h, b in bodies))


def test_300_concurrent_requests_through_two_gateways_with_rpm_100_admit_exactly_100(
        gateways: tuple[str, str]) -> None:
    out = asyncio.run(post_all([(gateways[i % 2], auth("sk-rpm"), chat(f"hello {i}")) for i in range(300)]))
    ok = [r for r in out if r.status_code == 200]
    refused = [r for r in out if r.status_code == 429]
    assert len(ok) == 100 and len(refused) == 200
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert all(r.json()["error"]["code"] == "rate_limit_exceeded" and "rpm" in r.json()["error"]["message"]
               for r in refused)
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok)
    assert remaining == list(range(100))  # each admission saw the one shared counter
    assert {r.headers["x-ratelimit-limit-requests"] for r in ok} == {"100"}


def test_a_daily_token_quota_is_never_exceeded_and_usage_equals_what_the_emulator_reported(
        gateways: tuple[str, str]) -> None:
    # each reservation (prompt estimate + max_tokens) covers the request's worst case
    bodies = [(gateways[i % 2], auth("sk-quota"), chat("word word word", max_tokens=10)) for i in range(120)]
    out = asyncio.run(post_all(bodies))
    for _ in range(20):  # waves until one finds nothing left: reservations in flight refuse others
        wave = asyncio.run(post_all(bodies[:40]))
        out += wave
        if all(r.status_code == 429 for r in wave):
            break
    ok = [r for r in out if r.status_code == 200]
    refused = [r for r in out if r.status_code == 429]
    spent = sum(r.json()["usage"]["total_tokens"] for r in ok)
    assert ok and refused and spent <= QUOTA
    assert QUOTA - spent < 18  # nothing left for one more reservation
    assert all(r.json()["error"]["code"] == "insufficient_quota" for r in refused)
    report = httpx.get(gateways[0] + "/admin/usage", params={"user": "quota-user"}, headers=ADMIN).json()
    totals = report["totals"]
    assert totals["requests"] == len(ok)
    assert totals["prompt_tokens"] == sum(r.json()["usage"]["prompt_tokens"] for r in ok)
    assert totals["completion_tokens"] == sum(r.json()["usage"]["completion_tokens"] for r in ok)
    assert totals["reported_tokens"] == spent and totals["estimated_tokens"] == 0
    assert [(row["user"], row["alias"], row["backend"]) for row in report["data"]] == \
        [("quota-user", "llama", "vllm")]


async def _stream(client: httpx.AsyncClient, url: str, key: str, disconnect_after: int | None = None) -> int:
    body = chat("one two three four five six", stream=True)
    async with client.stream("POST", url + "/v1/chat/completions", headers=auth(key), json=body) as r:
        if r.status_code != 200:
            return r.status_code
        lines = 0
        async for line in r.aiter_lines():
            lines += bool(line)
            if disconnect_after is not None and lines >= disconnect_after:
                return -1  # leaving the block closes the connection mid-stream
        return 200


def test_concurrency_3_holds_across_gateways_and_client_disconnects(
        gateways: tuple[str, str], emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    ctl = emulator[1]
    ctl.chunk_delay = 0.1

    peaks = []  # the emulator's most concurrent streams in each wave

    async def go() -> list[list[int]]:
        waves = []
        async with httpx.AsyncClient(timeout=30) as client:
            for wave in range(3):
                ctl.max_active = ctl.active
                waves.append(list(await asyncio.gather(*(
                    _stream(client, gateways[i % 2], "sk-conc", disconnect_after=2 if wave == 1 else None)
                    for i in range(10)))))
                # the emulator notices a cut stream only at its next chunk (0.1 s): wait for it,
                # or it counts a stream the gateway already let go of as still running
                for _ in range(100):
                    if ctl.active == 0:
                        break
                    await asyncio.sleep(0.02)
                peaks.append(ctl.max_active)
        return waves

    full, cut, again = asyncio.run(go())
    # Not in the cut wave: there a request that arrives after a cut is admitted at once (the
    # gateway closed that upstream stream and freed its slot), while the emulator counts the
    # cut stream as running until its next chunk, 0.1 s later.
    assert peaks[0] <= 3 and peaks[2] <= 3, peaks
    # ten at a time against three slots; the full streams last ~1 s, so most of each wave
    # arrives while three are running (the cut wave frees its slots at once, so it may admit more)
    assert full.count(429) + again.count(429) >= 10
    assert full.count(200) >= 3 and cut.count(-1) >= 1 and again.count(200) >= 3
    # every slot came back: disconnected streams included
    ctl.chunk_delay = 0.0
    later = asyncio.run(post_all([(gateways[i % 2], auth("sk-conc"), chat("hi")) for i in range(3)]))
    assert [r.status_code for r in later] == [200, 200, 200]


def test_slots_of_a_killed_gateway_free_themselves_within_their_ttl(
        cfg_path: Path, gateways: tuple[str, str], emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    ctl = emulator[1]
    ctl.chunk_delay = 1.0  # streams that outlive the kill
    port = free_port()
    doomed = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg_path),
                               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url + "/healthz", proc=doomed)
        clients = [httpx.Client(timeout=30) for _ in range(3)]
        streams = [c.stream("POST", url + "/v1/chat/completions", headers=auth("sk-conc"),
                            json=chat("a b c d e f g h", stream=True)) for c in clients]
        for s in streams:
            assert s.__enter__().status_code == 200
        refused = httpx.post(gateways[0] + "/v1/chat/completions", headers=auth("sk-conc"), json=chat("x"))
        assert refused.status_code == 429 and "concurrent" in refused.json()["error"]["message"]
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
        killed_at = time.monotonic()
        ctl.chunk_delay = 0.0
        while True:
            r = httpx.post(gateways[0] + "/v1/chat/completions", headers=auth("sk-conc"), json=chat("x"))
            if r.status_code == 200:
                break
            assert time.monotonic() - killed_at < 2 + 1.5, "slots outlived their ttl"
            time.sleep(0.1)
        for c in clients:
            c.close()
    finally:
        if doomed.poll() is None:
            doomed.kill()


def test_a_stream_cut_by_the_client_is_billed_for_what_was_produced(
        gateways: tuple[str, str], emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    ctl = emulator[1]
    ctl.chunk_delay = 0.2
    words = " ".join(f"word{i}" for i in range(30))
    with httpx.stream("POST", gateways[1] + "/v1/chat/completions", headers=auth("sk-bob"), timeout=30,
                      json={"model": "llama", "stream": True, "messages": [{"role": "user", "content": words}]}) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 4:
                break
    deadline = time.monotonic() + 10
    while True:
        report = httpx.get(gateways[0] + "/admin/usage", params={"user": "bob", "alias": "llama"}, headers=ADMIN)
        totals = report.json()["totals"]
        if totals["requests"]:
            break
        assert time.monotonic() < deadline, "the cut stream was never settled"
        time.sleep(0.1)
    assert totals["requests"] == 1 and totals["reported_tokens"] == 0
    assert 3 <= totals["completion_tokens"] < 32  # what was produced before the cut, not the whole answer
    assert totals["estimated_tokens"] == totals["prompt_tokens"] + totals["completion_tokens"]


def _cached(url: str, key: str, text: str, alias: str = "cached", **kw: object) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers=auth(key), timeout=30,
                      json={"model": alias, "temperature": 0, "messages": [{"role": "user", "content": text}],
                            **kw})


def test_cached_answers_are_per_user_unless_shared_and_replay_as_streams(
        gateways: tuple[str, str], emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    ctl = emulator[1]
    a, b = gateways
    first = _cached(a, "sk-alice", "what is the cache")
    assert first.headers["x-gateway-cache"] == "miss" and len(ctl.requests) == 1
    again = _cached(b, "sk-alice", "what is the cache")
    assert again.headers["x-gateway-cache"] == "hit" and len(ctl.requests) == 1
    assert again.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
    other = _cached(a, "sk-bob", "what is the cache")
    assert other.headers["x-gateway-cache"] == "miss" and len(ctl.requests) == 2
    warmer = _cached(a, "sk-alice", "what is the cache", temperature=0.5)
    assert warmer.headers["x-gateway-cache"] == "bypass" and len(ctl.requests) == 3
    fresh = httpx.post(a + "/v1/chat/completions", headers={**auth("sk-alice"), "cache-control": "no-cache"},
                       json={"model": "cached", "temperature": 0,
                             "messages": [{"role": "user", "content": "what is the cache"}]})
    assert fresh.headers["x-gateway-cache"] == "bypass" and len(ctl.requests) == 4

    _cached(a, "sk-alice", "shared answer", alias="shared")
    shared = _cached(b, "sk-bob", "shared answer", alias="shared")
    assert shared.headers["x-gateway-cache"] == "hit" and len(ctl.requests) == 5

    with httpx.stream("POST", b + "/v1/chat/completions", headers=auth("sk-alice"),
                      json={"model": "cached", "temperature": 0, "stream": True,
                            "messages": [{"role": "user", "content": "what is the cache"}]}) as r:
        assert r.headers["x-gateway-cache"] == "hit"
        body = r.read().decode()
    assert "You said" in body and body.rstrip().endswith("data: [DONE]") and len(ctl.requests) == 5

    usage = httpx.get(a + "/admin/usage", params={"user": "alice", "alias": "cached"}, headers=ADMIN).json()
    assert usage["totals"]["cache_hits"] == 2 and usage["totals"]["requests"] == 5


def test_twenty_identical_concurrent_requests_make_one_upstream_call(
        gateways: tuple[str, str], emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    ctl = emulator[1]
    ctl.latency = 0.3
    body = {"model": "cached", "temperature": 0, "messages": [{"role": "user", "content": "single flight"}]}
    out = asyncio.run(post_all([(gateways[i % 2], auth("sk-alice"), body) for i in range(20)]))
    assert [r.status_code for r in out] == [200] * 20
    assert len(ctl.requests) == 1
    assert sorted(r.headers["x-gateway-cache"] for r in out).count("hit") == 19
    assert len({r.json()["choices"][0]["message"]["content"] for r in out}) == 1


def test_llm_gateway_usage_prints_the_table(cfg_path: Path, gateways: tuple[str, str]) -> None:
    _cached(gateways[0], "sk-bob", "for the table")
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "usage", "--config", str(cfg_path),
                          "--user", "bob", "--days", "2"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:5] == ["day", "user", "alias", "backend", "requests"]
    assert any(line.split()[1:4] == ["bob", "cached", "vllm"] for line in lines[1:-1])
    assert lines[-1].startswith("total")


def test_admin_usage_needs_the_admin_key_and_checks_days(gateways: tuple[str, str]) -> None:
    assert httpx.get(gateways[0] + "/admin/usage").status_code == 401
    bad = httpx.get(gateways[0] + "/admin/usage", params={"from": "yesterday"}, headers=ADMIN)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "from"


# --- when Redis fails -----------------------------------------------------------------------------


@pytest.fixture
def fragile(emulator: tuple[LoopbackServer, EmulatorControl], tmp_path: Path) -> Iterator[tuple[str, RedisServer]]:
    """One gateway on a private redis-server that the test stops, hangs and restarts."""
    server = RedisServer().start()
    path = write_config(tmp_path, config(emulator[0].url, server.url, timeout_ms=300))
    with ExitStack() as stack:
        stack.callback(server.stop)
        stack.callback(lambda: server.proc and server.proc.send_signal(signal.SIGCONT))
        url = stack.enter_context(gateway_process(path))
        yield url, server


def test_redis_stopped_mid_run_applies_each_policy_without_hanging_and_recovers(
        fragile: tuple[str, RedisServer]) -> None:
    url, server = fragile
    client = httpx.Client(base_url=url, timeout=10)
    assert client.post("/v1/chat/completions", headers=auth("sk-rpm"), json=chat("before")).status_code == 200
    assert client.get("/readyz").status_code == 200

    server.stop()
    start = time.monotonic()
    limited = client.post("/v1/chat/completions", headers=auth("sk-rpm"), json=chat("during"))
    assert limited.status_code == 200  # limits: open (the default)
    quota = client.post("/v1/chat/completions", headers=auth("sk-quota"), json=chat("during", max_tokens=10))
    assert quota.status_code == 503 and quota.json()["error"]["code"] == "store_unavailable"
    cached = _cached(url, "sk-alice", "during the outage")
    assert cached.status_code == 200  # cache: skipped
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["pending_settlements"] >= 1
    assert time.monotonic() - start < 4  # four requests, each bounded by the 300 ms store timeout

    server.start()  # same port, no data: the gateway reconnects by itself
    deadline = time.monotonic() + 10
    while client.get("/readyz").json()["pending_settlements"]:
        assert time.monotonic() < deadline, "settlements kept for the outage never landed"
        time.sleep(0.2)
    assert client.get("/readyz").status_code == 200
    small = chat("after", max_tokens=10)
    assert client.post("/v1/chat/completions", headers=auth("sk-quota"), json=small).status_code == 200
    after = client.post("/v1/chat/completions", headers=auth("sk-rpm"), json=chat("after"))
    assert after.status_code == 200 and "x-ratelimit-remaining-requests" in after.headers
    usage = client.get("/admin/usage", params={"user": "rpm-user"}, headers=ADMIN).json()
    assert usage["totals"]["requests"] == 2  # the one served during the outage, and this one


def test_a_hung_redis_delays_requests_by_at_most_the_store_timeout(fragile: tuple[str, RedisServer]) -> None:
    url, server = fragile
    client = httpx.Client(base_url=url, timeout=10)
    assert client.post("/v1/chat/completions", headers=auth("sk-rpm"), json=chat("before")).status_code == 200
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        r = client.post("/v1/chat/completions", headers=auth("sk-rpm"), json=chat("hung"))
        elapsed = time.monotonic() - start
        assert r.status_code == 200 and elapsed < 1.5  # admit and settle: 300 ms each at most
        quota = client.post("/v1/chat/completions", headers=auth("sk-quota"), json=chat("hung", max_tokens=10))
        assert quota.status_code == 503
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    small = chat("back", max_tokens=10)
    while client.post("/v1/chat/completions", headers=auth("sk-quota"), json=small).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)


# --- one process, either engine -------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["memory", "redis"])
def test_one_gateway_limits_caches_and_accounts_on_either_engine(
        engine: str, emulator: tuple[LoopbackServer, EmulatorControl], request: pytest.FixtureRequest) -> None:
    from tests.support import start_gateway

    if engine == "redis":
        server = request.getfixturevalue("redis_server")
        server.flushall()
        url = server.url
    else:
        url = "memory://"
    text = config(emulator[0].url, url).replace("rpm: 100", "rpm: 3")
    with start_gateway(text) as gw:
        codes = [httpx.post(gw + "/v1/chat/completions", headers=auth("sk-rpm"), json=chat("hi")).status_code
                 for _ in range(5)]
        assert codes == [200, 200, 200, 429, 429]
        assert _cached(gw, "sk-alice", "same").headers["x-gateway-cache"] == "miss"
        assert _cached(gw, "sk-alice", "same").headers["x-gateway-cache"] == "hit"
        assert _cached(gw, "sk-bob", "same").headers["x-gateway-cache"] == "miss"
        assert len(emulator[1].requests) == 5
        usage = httpx.get(gw + "/admin/usage", headers=ADMIN).json()
        assert usage["totals"]["requests"] == 6 and usage["totals"]["cache_hits"] == 1
        assert httpx.get(gw + "/readyz").json()["store"] == engine
