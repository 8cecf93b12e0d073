"""The Baidu adapter against its emulator over loopback, with the token cache in a real Redis."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgspec
import pytest

from adapters.baidu import Backend, BaiduAdapter, build
from adapters.baidu.auth import SigningAuth
from adapters.baidu.emulator import (
    DEMO_ACCESS_KEY,
    DEMO_API_KEY,
    DEMO_IAM_SECRET,
    DEMO_SECRET_KEY,
    BaiduEmulator,
    create_emulator,
)
from adapters.baidu.wire import BaiduChatRequest, chat_path, validate_request
from adapters.base import AdapterContext
from adapters.loopback import LoopbackServer
from adapters.types import (
    ChatChunk,
    ChatRequest,
    Message,
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamError,
)
from gateway.store import open_store
from tests.support import RedisServer, free_port

CHAT = chat_path("llama_3_8b")


@pytest.fixture(scope="module")
def emu() -> Iterator[tuple[str, BaiduEmulator]]:
    app = create_emulator()
    with LoopbackServer(app) as server:
        yield server.url, app


@pytest.fixture(autouse=True)
def _fresh(emu: tuple[str, BaiduEmulator], redis_server: RedisServer) -> None:
    app = emu[1]
    app.reset()
    app.token_ttl, app.latency, app.token_latency, app.chunk_delay = 2592000, 0.0, 0.0, 0.0
    redis_server.flushall()


def token_backend(url: str, **kw: Any) -> Backend:
    return msgspec.convert({"kind": "baidu", "endpoint": "llama_3_8b", "base_url": url,
                            "api_key": DEMO_API_KEY, "secret_key": DEMO_SECRET_KEY, **kw}, Backend)


def aksk_backend(url: str, **kw: Any) -> Backend:
    return msgspec.convert({"kind": "baidu", "endpoint": "llama_3_8b", "base_url": url,
                            "access_key": DEMO_ACCESS_KEY, "secret_key": DEMO_IAM_SECRET, **kw}, Backend)


@asynccontextmanager
async def opened(cfg: Backend, store_url: str, name: str = "baidu-a") -> AsyncIterator[BaiduAdapter]:
    store = open_store(store_url)
    adapter = build(cfg, AdapterContext(name=name, state=store))
    try:
        yield adapter
    finally:
        await adapter.aclose()
        await store.aclose()


def hello(text: str = "hello baidu", **kw: Any) -> ChatRequest:
    return ChatRequest(model="llama_3_8b", messages=[Message("user", text)], **kw)


async def collect(adapter: BaiduAdapter, req: ChatRequest) -> list[ChatChunk]:
    return [c async for c in adapter.stream(req)]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- both auth modes, streaming and not ------------------------------------------------------

def test_access_token_mode_answers_with_reported_usage_and_fetches_one_token(emu, redis_server) -> None:
    url, app = emu

    async def go() -> None:
        async with opened(token_backend(url), redis_server.url) as a:
            r1 = await a.complete(hello("first"))
            r2 = await a.complete(hello("second"))
        assert (r1.text, r2.text) == ("Hello! You said: first", "Hello! You said: second")
        assert r1.finish_reason == "stop" and r1.usage.source == "reported" and r1.usage.completion_tokens > 0

    run(go())
    assert app.token_calls == 1
    assert [r.query["access_token"] for r in app.received] == [next(iter(app.tokens))] * 2
    assert "authorization" not in app.received[0].headers


def test_access_token_mode_streams_each_piece_as_it_arrives(emu, redis_server) -> None:
    url, app = emu
    app.chunk_delay = 0.15

    async def go() -> tuple[list[ChatChunk], list[float]]:
        async with opened(token_backend(url), redis_server.url) as a:
            chunks, times, start = [], [], time.monotonic()
            async for c in a.stream(hello("one two three four five six seven")):
                chunks.append(c)
                times.append(time.monotonic() - start)
            return chunks, times

    chunks, times = run(go())
    assert "".join(c.text for c in chunks) == "Hello! You said: one two three four five six seven"
    assert len(chunks) >= 4
    assert times[0] < times[-1] - 0.3  # the first piece came well before the stream ended
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage.source == "reported"
    assert app.received[0].json()["stream"] is True


def test_aksk_mode_signs_every_request_and_never_fetches_a_token(emu, redis_server) -> None:
    url, app = emu

    async def go() -> tuple[str, list[ChatChunk]]:
        async with opened(aksk_backend(url), redis_server.url) as a:
            return (await a.complete(hello("signed"))).text, await collect(a, hello("signed stream"))

    text, chunks = run(go())
    assert text == "Hello! You said: signed"
    assert "".join(c.text for c in chunks) == "Hello! You said: signed stream"
    assert chunks[-1].usage is not None and chunks[-1].usage.source == "reported"
    assert app.token_calls == 0
    for rec in app.received:
        assert "access_token" not in rec.query
        assert rec.headers["authorization"].startswith(f"bce-auth-v1/{DEMO_ACCESS_KEY}/")
        assert rec.headers["authorization"].split("/")[4] == "content-type;host;x-bce-content-sha256;x-bce-date"
        assert rec.headers["host"] == url.removeprefix("http://")  # with the port


def test_aksk_mode_with_a_wrong_secret_is_a_gateway_credential_error(emu, redis_server) -> None:
    url, _ = emu

    async def go() -> None:
        async with opened(aksk_backend(url, secret_key="not-the-secret"), redis_server.url) as a:
            await a.complete(hello())

    with pytest.raises(UpstreamAuthError) as exc:
        run(go())
    assert exc.value.status == 502 and "SignatureDoesNotMatch" in exc.value.message
    assert "not-the-secret" not in exc.value.message


def test_token_mode_with_a_wrong_secret_is_a_gateway_credential_error(emu, redis_server) -> None:
    url, _ = emu

    async def go() -> None:
        async with opened(token_backend(url, secret_key="wrong-secret"), redis_server.url) as a:
            await a.complete(hello())

    with pytest.raises(UpstreamAuthError) as exc:
        run(go())
    assert "invalid_client" in exc.value.message and "Client authentication failed" in exc.value.message
    assert "wrong-secret" not in exc.value.message


# -- the emulator's signature checks, over HTTP ----------------------------------------------

def _signed_request(url: str, *, ak: str = DEMO_ACCESS_KEY, sk: str = DEMO_IAM_SECRET,
                    now: float | None = None, path: str = CHAT, params: dict | None = None) -> httpx.Request:
    body = msgspec.json.encode({"messages": [{"role": "user", "content": "hi"}]})
    req = httpx.Request("POST", url + path, content=body, params=params,
                        headers={"Content-Type": "application/json"})
    SigningAuth(ak, sk, 300).sign(req, now=now)
    return req


def _send(req: httpx.Request, **changes: Any) -> httpx.Response:
    url = changes.pop("url", req.url)
    content = changes.pop("content", req.content)
    headers = {**req.headers, **changes.pop("headers", {})}
    headers.pop("content-length", None)
    return httpx.post(url, content=content, headers=headers)


def test_emulator_accepts_an_untouched_signed_request(emu) -> None:
    url, _ = emu
    r = _send(_signed_request(url))
    assert r.status_code == 200 and r.json()["result"] == "Hello! You said: hi"


@pytest.mark.parametrize("alter", ["body", "path", "query", "date"])
def test_emulator_rejects_a_request_altered_after_signing(emu, alter: str) -> None:
    url, app = emu
    req = _signed_request(url, params={"x": "1"})
    if alter == "body":
        r = _send(req, content=req.content.replace(b"hi", b"ho"))
    elif alter == "path":
        r = _send(req, url=str(req.url).replace("llama_3_8b", "llama_3_70b"))
    elif alter == "query":
        r = _send(req, url=str(req.url).replace("x=1", "x=2"))
    else:
        r = _send(req, headers={"x-bce-date": "2030-01-01T00:00:00Z"})
    assert r.status_code in (400, 403)
    assert r.headers["x-bce-error-code"] in ("BadDigest", "SignatureDoesNotMatch", "RequestExpired")
    assert app.received[-1].outcome == r.status_code


def test_emulator_rejects_unknown_access_key_and_stale_date_as_iam_does(emu) -> None:
    url, _ = emu
    r = _send(_signed_request(url, ak="nobody"))
    assert r.status_code == 401
    assert r.headers["x-bce-error-message"] == "NotFound, cause: Could not find credential."
    r = _send(_signed_request(url, now=time.time() - 3600))
    assert r.status_code == 403 and r.headers["x-bce-error-code"] == "RequestExpired"
    r = _send(_signed_request(url, sk="wrong"))
    assert r.status_code == 403
    assert r.headers["x-bce-error-message"] == (
        "SignatureDoesNotMatch, cause: Fail to authn user: Signature does not match")


def test_emulator_answers_110_for_unknown_token_and_for_no_credentials(emu) -> None:
    url, _ = emu
    assert httpx.post(url + CHAT, params={"access_token": "24.bogus"}, json={}).json()["error_code"] == 110
    assert httpx.post(url + CHAT, json={}).json()["error_code"] == 110


# -- the error-code table, end to end ---------------------------------------------------------

ROWS = [
    (4, 429, True), (18, 429, True), (336501, 429, True), (336502, 429, True),
    (1, 503, True), (2, 503, True), (336100, 503, True),
    (336003, 400, False),
    (6, 502, False), (13, 502, False), (14, 502, False), (100, 502, False),
    (17, 429, False), (19, 429, False),
]


@pytest.mark.parametrize(("code", "status", "retryable"), ROWS)
@pytest.mark.parametrize("streaming", [False, True])
def test_error_code_reaches_the_caller_as_mapped(emu, redis_server, code, status, retryable, streaming) -> None:
    url, app = emu
    app.inject(code, msg=f"baidu says {code}")

    async def go() -> None:
        async with opened(token_backend(url), redis_server.url) as a:
            if streaming:
                await collect(a, hello())
            else:
                await a.complete(hello())

    with pytest.raises(UpstreamError) as exc:
        run(go())
    assert (exc.value.status, exc.value.retryable) == (status, retryable)
    assert f"baidu says {code}" in exc.value.message and f"error_code {code}" in exc.value.message
    if status == 502:
        assert "gateway's credentials" in exc.value.message
    assert app.chat_calls == 1  # not retried


@pytest.mark.parametrize("code", [110, 111])
def test_110_or_111_twice_is_a_credential_error_after_one_refresh(emu, redis_server, code) -> None:
    url, app = emu
    app.inject(code, times=2)

    async def go() -> None:
        async with opened(token_backend(url), redis_server.url) as a:
            await a.complete(hello())

    with pytest.raises(UpstreamAuthError) as exc:
        run(go())
    assert exc.value.status == 502 and "gateway's credentials" in exc.value.message
    assert (app.token_calls, app.chat_calls) == (2, 2)


def test_an_error_inside_the_stream_ends_it_with_an_error(emu, redis_server) -> None:
    url, app = emu
    app.inject(336100, after_chunks=2)

    async def go() -> list[str]:
        got: list[str] = []
        async with opened(token_backend(url), redis_server.url) as a:
            with pytest.raises(UpstreamError) as exc:
                async for c in a.stream(hello("a b c d e f g h i j")):
                    got.append(c.text)
            assert exc.value.status == 503
        return got

    assert len(run(go())) == 2


# -- token refresh --------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["injected", "expired"])
@pytest.mark.parametrize("streaming", [False, True])
def test_111_refreshes_the_token_and_retries_once_successfully(emu, redis_server, how, streaming) -> None:
    url, app = emu

    async def go() -> str:
        async with opened(token_backend(url), redis_server.url) as a:
            await a.complete(hello("warm up"))
            if how == "injected":
                app.inject(111)
            else:
                app.expire_tokens()
            if streaming:
                return "".join(c.text for c in await collect(a, hello("after expiry")))
            return (await a.complete(hello("after expiry"))).text

    assert run(go()) == "Hello! You said: after expiry"
    assert app.token_calls == 2
    first, failed, retried = app.received
    assert failed.outcome == 111 and retried.outcome == 0
    assert failed.query["access_token"] == first.query["access_token"] != retried.query["access_token"]


def test_token_is_shared_through_redis_by_separate_adapter_instances(emu, redis_server) -> None:
    url, app = emu

    async def go() -> None:
        for _ in range(3):  # three "processes" one after the other
            async with opened(token_backend(url), redis_server.url) as a:
                await a.complete(hello())

    run(go())
    assert app.token_calls == 1


def test_200_concurrent_requests_through_two_instances_fetch_exactly_one_token(emu, redis_server) -> None:
    url, app = emu
    app.token_latency = 0.3  # a slow token endpoint widens the thundering-herd window

    async def go() -> list[str]:
        async with opened(token_backend(url), redis_server.url) as a, \
                opened(token_backend(url), redis_server.url) as b:
            results = await asyncio.gather(*(
                (a if i % 2 else b).complete(hello(f"req {i}")) for i in range(200)))
            assert a.token_fetches + b.token_fetches == 1
            return [r.text for r in results]

    texts = run(go())
    assert texts == [f"Hello! You said: req {i}" for i in range(200)]
    assert app.token_calls == 1
    assert len({r.query["access_token"] for r in app.received}) == 1


def test_a_short_lived_token_is_refreshed_ahead_of_expiry_without_any_failure(emu, redis_server) -> None:
    url, app = emu
    app.token_ttl = 2

    async def go() -> None:
        async with opened(token_backend(url), redis_server.url) as a, \
                opened(token_backend(url), redis_server.url) as b:
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                await asyncio.gather(a.complete(hello()), b.complete(hello()))
                await asyncio.sleep(0.02)

    run(go())
    assert all(r.outcome == 0 for r in app.received)  # never a 111: refreshed ahead
    assert 3 <= app.token_calls <= 4  # about once per 1.6 s (a fifth of the life ahead)


def test_the_token_source_survives_a_dead_store(emu) -> None:
    url, app = emu

    async def go() -> str:
        async with opened(token_backend(url), f"redis://127.0.0.1:{free_port()}/0") as a:
            await a.complete(hello())
            return (await a.complete(hello("still here"))).text

    assert run(go()) == "Hello! You said: still here"
    assert app.token_calls == 1


# -- request mapping and response flags, end to end -------------------------------------------

def test_system_even_count_consecutive_users_and_temperature_0_arrive_as_a_valid_body(emu, redis_server) -> None:
    url, app = emu
    req = ChatRequest(model="llama_3_8b", temperature=0.0, user="alice", messages=[
        Message("system", "You are terse."), Message("user", "Hi"), Message("user", "Are you there?"),
        Message("assistant", "Yes."), Message("user", "Good"), Message("user", "Answer me"),
    ])

    async def go() -> None:
        async with opened(token_backend(url), redis_server.url) as a:
            await a.complete(req)

    run(go())
    sent = msgspec.json.decode(app.received[0].body, type=BaiduChatRequest)
    assert validate_request(sent) is None
    assert [m.role for m in sent.messages] == ["user", "assistant", "user"]
    assert sent.messages[0].content == "You are terse.\n\nHi\n\nAre you there?"
    assert sent.temperature is not None and 0 < sent.temperature <= 1
    assert sent.system is None and "system" not in app.received[0].json()
    assert sent.user_id == "alice"


def test_over_long_input_is_refused_before_any_call(emu, redis_server) -> None:
    url, app = emu

    async def go() -> None:
        async with opened(token_backend(url), redis_server.url) as a:
            await a.complete(hello("x" * 4801))

    with pytest.raises(UpstreamBadRequest, match="at most 4800"):
        run(go())
    assert app.chat_calls == 0


@pytest.mark.parametrize(("flags", "reason"), [
    ({"is_truncated": True}, "length"), ({"need_clear_history": True}, "content_filter")])
def test_truncation_and_safety_flags_become_finish_reasons(emu, redis_server, flags, reason) -> None:
    url, app = emu
    app.respond_with("partial answer", **flags)
    app.respond_with("partial answer", **flags)

    async def go() -> tuple[str, str | None]:
        async with opened(token_backend(url), redis_server.url) as a:
            r = await a.complete(hello())
            chunks = await collect(a, hello())
            return r.finish_reason, chunks[-1].finish_reason

    assert run(go()) == (reason, reason)


def test_closing_the_stream_early_closes_the_upstream_connection(emu, redis_server) -> None:
    url, app = emu
    app.chunk_delay = 0.1

    async def go() -> None:
        async with opened(token_backend(url), redis_server.url) as a:
            stream = a.stream(hello(" ".join(f"w{i}" for i in range(60))))
            async for _ in stream:
                break
            await stream.aclose()
            for _ in range(50):
                if app.streams_cancelled:
                    return
                await asyncio.sleep(0.05)

    run(go())
    assert app.streams_cancelled == 1


def test_an_unknown_endpoint_is_a_configuration_error(emu, redis_server) -> None:
    url, _ = emu

    async def go() -> None:
        async with opened(token_backend(url, endpoint="no_such_model"), redis_server.url) as a:
            await a.complete(hello())

    with pytest.raises(UpstreamError) as exc:
        run(go())
    assert exc.value.code == "upstream_endpoint_not_found" and not exc.value.retryable


# -- secrets never reach the logs -------------------------------------------------------------

def test_logs_and_errors_carry_no_secret_key_and_no_access_token(emu, redis_server, caplog) -> None:
    url, app = emu
    caplog.set_level(logging.DEBUG)
    errors: list[str] = []

    async def go() -> None:
        async with opened(token_backend(url), redis_server.url) as a:
            await a.complete(hello())
            await collect(a, hello())
            app.inject(111)
            await a.complete(hello())
            app.inject(110, times=2)
            try:
                await a.complete(hello())
            except UpstreamError as exc:
                errors.append(str(exc))
        async with opened(token_backend(url, secret_key="another-secret"), redis_server.url, "b2") as a:
            try:
                await a.complete(hello())
            except UpstreamError as exc:
                errors.append(str(exc))
        async with opened(aksk_backend(url), redis_server.url) as a:
            await a.complete(hello())

    run(go())
    text = caplog.text + "\n".join(errors)
    assert app.tokens and "access_token=***" in caplog.text  # httpx did log the URLs, redacted
    for token in app.tokens:
        assert token not in text
    for secret in (DEMO_SECRET_KEY, DEMO_IAM_SECRET, "another-secret"):
        assert secret not in text
    assert hashlib.sha256(next(iter(app.tokens)).encode()).hexdigest()[:8] in caplog.text  # fingerprints only
