"""Baidu backends through the gateway: the openai SDK -> gateway -> adapter -> Baidu emulator.

In-thread gateways (start_gateway) for the behaviour; two real `llm-gateway serve` processes
sharing one Redis for the one-token-between-processes and short-expiry runs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import msgspec
import openai
import pytest

from adapters.baidu.emulator import (
    DEMO_ACCESS_KEY,
    DEMO_API_KEY,
    DEMO_IAM_SECRET,
    DEMO_SECRET_KEY,
    BaiduEmulator,
    create_emulator,
)
from adapters.baidu.wire import BaiduChatRequest, validate_request
from adapters.loopback import LoopbackServer
from tests.support import RedisServer, gateway_process, start_gateway, write_config

KEY = "sk-test-baidu"


@pytest.fixture(scope="module")
def emu() -> Iterator[tuple[str, BaiduEmulator]]:
    app = create_emulator()
    with LoopbackServer(app) as server:
        yield server.url, app


@pytest.fixture(autouse=True)
def _fresh(emu: tuple[str, BaiduEmulator]) -> None:
    app = emu[1]
    app.reset(forget_tokens=False)  # the module's gateway keeps its token across tests
    app.token_ttl, app.token_latency, app.chunk_delay = 2592000, 0.0, 0.0


def config_text(emu_url: str, store_url: str, margin: float = 3600) -> str:
    return f"""
store: {{url: "{store_url}"}}
backends:
  baidu-token:
    kind: baidu
    endpoint: llama_3_8b
    base_url: "{emu_url}"
    api_key: {DEMO_API_KEY}
    secret_key: {DEMO_SECRET_KEY}
    token_refresh_margin: {margin}
    timeout: {{connect: 2, read: 10}}
  baidu-iam:
    kind: baidu
    endpoint: llama_3_8b
    base_url: "{emu_url}"
    access_key: {DEMO_ACCESS_KEY}
    secret_key: {DEMO_IAM_SECRET}
    timeout: {{connect: 2, read: 10}}
models:
  llama-baidu: {{targets: [{{backend: baidu-token}}]}}
  llama-baidu-iam: {{targets: [{{backend: baidu-iam}}]}}
  llama-baidu-trimmed: {{targets: [{{backend: baidu-token}}], trim_history: true}}
keys:
  - {{name: test-app, key: {KEY}, user: tester}}
"""


@pytest.fixture(scope="module")
def gateway(emu: tuple[str, BaiduEmulator], redis_server: RedisServer) -> Iterator[str]:
    with start_gateway(config_text(emu[0], redis_server.url)) as url:
        yield url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)


MODELS = ["llama-baidu", "llama-baidu-iam"]


@pytest.mark.parametrize("model", MODELS)
def test_chat_through_the_gateway_in_both_auth_modes(gateway: str, emu, model: str) -> None:
    r = client(gateway).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello gateway"}])
    assert r.choices[0].message.content == "Hello! You said: hello gateway"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens > 0
    rec = emu[1].received[-1]
    assert ("access_token" in rec.query) == (model == "llama-baidu")
    assert ("authorization" in rec.headers) == (model == "llama-baidu-iam")


@pytest.mark.parametrize("model", MODELS)
def test_streaming_chat_through_the_gateway_in_both_auth_modes(gateway: str, emu, model: str) -> None:
    stream = client(gateway).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "one two three four five"}], stream=True,
        stream_options={"include_usage": True})
    pieces, usage, finish = [], None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == "Hello! You said: one two three four five"
    assert len([p for p in pieces if p]) >= 3  # forwarded piece by piece
    assert finish == "stop" and usage is not None and usage.completion_tokens > 0


def test_system_even_count_consecutive_users_and_temperature_0_arrive_as_a_valid_baidu_body(
        gateway: str, emu) -> None:
    client(gateway).chat.completions.create(model="llama-baidu", temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "user", "content": "Still there?"}, {"role": "assistant", "content": "Yes"},
        {"role": "user", "content": "Good"}, {"role": "user", "content": "Now answer"},
    ])
    sent = msgspec.json.decode(emu[1].received[-1].body, type=BaiduChatRequest)
    assert validate_request(sent) is None
    assert [m.role for m in sent.messages] == ["user", "assistant", "user"]
    assert sent.temperature is not None and sent.temperature > 0
    assert "system" not in emu[1].received[-1].json()


def test_the_principals_user_is_sent_as_user_id(gateway: str, emu) -> None:
    client(gateway).chat.completions.create(model="llama-baidu", messages=[{"role": "user", "content": "hi"}])
    assert emu[1].received[-1].json()["user_id"] == "tester"


def test_a_route_with_trim_history_drops_the_oldest_turns_instead_of_refusing(gateway: str, emu) -> None:
    old = [{"role": "user", "content": "x" * 2000}, {"role": "assistant", "content": "y" * 2000}]
    messages = [*old, *old, {"role": "user", "content": "latest question"}]
    with pytest.raises(openai.BadRequestError):
        client(gateway).chat.completions.create(model="llama-baidu", messages=messages)
    r = client(gateway).chat.completions.create(model="llama-baidu-trimmed", messages=messages)
    assert r.choices[0].message.content == "Hello! You said: latest question"
    sent = emu[1].received[-1].json()["messages"]
    assert sent[-1]["content"] == "latest question"
    assert sum(len(m["content"]) for m in sent) <= 4800 and len(sent) % 2 == 1


def test_an_injected_111_mid_run_is_refreshed_and_retried_and_the_client_sees_success(gateway: str, emu) -> None:
    c = client(gateway)
    c.chat.completions.create(model="llama-baidu", messages=[{"role": "user", "content": "before"}])
    calls = emu[1].token_calls
    emu[1].inject(111)
    r = c.chat.completions.create(model="llama-baidu", messages=[{"role": "user", "content": "after"}])
    assert r.choices[0].message.content == "Hello! You said: after"
    assert emu[1].token_calls == calls + 1
    assert [rec.outcome for rec in emu[1].received[-2:]] == [111, 0]


ROWS = [
    (4, 429, "rate limited"), (18, 429, "rate limited"), (336501, 429, "rate limited"),
    (336502, 429, "rate limited"),
    (1, 503, "temporarily unavailable"), (2, 503, "temporarily unavailable"),
    (336100, 503, "temporarily unavailable"),
    (336003, 400, "Baidu rejected the request: baidu says"),
    (6, 502, "refused the gateway's credentials"), (13, 502, "refused the gateway's credentials"),
    (14, 502, "refused the gateway's credentials"), (100, 502, "refused the gateway's credentials"),
    (17, 429, "used up its quota"), (19, 429, "used up its quota"),
]


@pytest.mark.parametrize(("code", "status", "says"), ROWS)
def test_each_baidu_error_code_reaches_the_client_with_its_status_and_message(
        gateway: str, emu, code: int, status: int, says: str) -> None:
    emu[1].inject(code, msg=f"baidu says {code}")
    with pytest.raises(openai.APIStatusError) as exc:
        client(gateway).chat.completions.create(model="llama-baidu", messages=[{"role": "user", "content": "x"}])
    assert exc.value.status_code == status
    message = exc.value.response.json()["error"]["message"]
    assert says in message and f"baidu says {code}" in message
    assert emu[1].chat_calls == 1


@pytest.mark.parametrize("code", [110, 111])
def test_110_or_111_again_after_the_refresh_is_a_502_naming_the_gateways_credentials(
        gateway: str, emu, code: int) -> None:
    emu[1].inject(code, times=2)
    with pytest.raises(openai.APIStatusError) as exc:
        client(gateway).chat.completions.create(model="llama-baidu", messages=[{"role": "user", "content": "x"}])
    assert exc.value.status_code == 502
    assert "refused the gateway's credentials" in exc.value.response.json()["error"]["message"]
    assert emu[1].chat_calls == 2


def test_a_stream_that_fails_before_its_first_piece_is_an_http_error(gateway: str, emu) -> None:
    emu[1].inject(18)
    with pytest.raises(openai.APIStatusError) as exc:
        list(client(gateway).chat.completions.create(
            model="llama-baidu", messages=[{"role": "user", "content": "x"}], stream=True))
    assert exc.value.status_code == 429


def test_a_stop_sequence_longer_than_baidu_allows_is_a_clear_400(gateway: str, emu) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client(gateway).chat.completions.create(
            model="llama-baidu", messages=[{"role": "user", "content": "x"}], stop=["x" * 21])
    assert "at most 20 characters" in exc.value.response.json()["error"]["message"]
    assert emu[1].chat_calls == 0


def test_gateway_logs_carry_no_secret_key_and_no_access_token(gateway: str, emu, caplog) -> None:
    caplog.set_level("DEBUG")
    c = client(gateway)
    for model in MODELS:
        c.chat.completions.create(model=model, messages=[{"role": "user", "content": "log me"}])
    emu[1].inject(110, times=2)
    with pytest.raises(openai.APIStatusError):
        c.chat.completions.create(model="llama-baidu", messages=[{"role": "user", "content": "x"}])
    assert emu[1].tokens and "access_token=***" in caplog.text
    for secret in (DEMO_SECRET_KEY, DEMO_IAM_SECRET, *emu[1].tokens):
        assert secret not in caplog.text


# -- two gateway processes sharing one Redis ---------------------------------------------------
# One pair of `llm-gateway serve` processes for the two tests below (each takes seconds to
# boot); the 200-request burst runs first, while neither process has a token yet.

@pytest.fixture(scope="module")
def processes(tmp_path_factory: pytest.TempPathFactory, emu,
              redis_server: RedisServer) -> Iterator[tuple[list[str], Path]]:
    tmp = tmp_path_factory.mktemp("baidu-gateways")
    redis_server.flushall()
    path = write_config(tmp, config_text(emu[0], redis_server.url, margin=0.5))
    procs = [gateway_process(path, log_path=tmp / f"gw{i}.log") for i in range(2)]
    urls: list[str] = ["", ""]
    with ExitStack() as stack:
        def start(i: int) -> None:  # boot both at once
            urls[i] = procs[i].__enter__()
            stack.callback(procs[i].__exit__, None, None, None)

        threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(urls), "a gateway process did not start"
        yield urls, tmp


def _assert_logs_clean(tmp: Path, app: BaiduEmulator, issued: set[str]) -> None:
    text = "".join(p.read_text() for p in tmp.glob("gw*.log"))
    assert "fetched access token" in text  # the logs were captured (httpx no longer logs URLs at INFO)
    for secret in (DEMO_SECRET_KEY, DEMO_IAM_SECRET, *issued):
        assert secret not in text


def test_two_gateway_processes_fetch_exactly_one_token_for_200_concurrent_requests(processes, emu) -> None:
    (urls, tmp), app = processes, emu[1]
    app.reset()
    app.token_latency = 0.3  # a slow token endpoint widens the thundering-herd window

    async def burst() -> list[str]:
        clients = [openai.AsyncOpenAI(base_url=u + "/v1", api_key=KEY, max_retries=0) for u in urls]
        try:
            results = await asyncio.gather(*(
                clients[i % 2].chat.completions.create(
                    model="llama-baidu", messages=[{"role": "user", "content": f"n{i}"}])
                for i in range(200)))
            return [r.choices[0].message.content or "" for r in results]
        finally:
            for c in clients:
                await c.close()

    texts = asyncio.run(burst())
    assert texts == [f"Hello! You said: n{i}" for i in range(200)]
    assert app.token_calls == 1
    assert len({r.query["access_token"] for r in app.received}) == 1
    _assert_logs_clean(tmp, app, set(app.tokens))


def test_a_30_second_run_with_3_second_tokens_never_fails_and_fetches_about_once_per_expiry(
        processes, emu) -> None:
    (urls, tmp), app = processes, emu[1]
    issued = set(app.tokens)
    app.token_ttl = 3
    app.expire_tokens()  # the processes' long-lived token now answers 111: they refresh and retry
    app.reset(forget_tokens=False)
    duration, failures, done = 30.0, [], [0]

    def worker(n: int, stop_at: float) -> None:
        c = openai.OpenAI(base_url=urls[n % 2] + "/v1", api_key=KEY, max_retries=0)
        i = 0
        while time.monotonic() < stop_at:
            i += 1
            try:
                if i % 3:
                    c.chat.completions.create(model="llama-baidu", messages=[{"role": "user", "content": "hi"}])
                else:
                    list(c.chat.completions.create(model="llama-baidu", stream=True,
                                                   messages=[{"role": "user", "content": "hi"}]))
                done[0] += 1
            except openai.APIError as exc:
                failures.append(repr(exc))
            time.sleep(0.02)

    stop_at = time.monotonic() + duration
    threads = [threading.Thread(target=worker, args=(n, stop_at)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []  # never an auth error (nor any other) to a client
    assert done[0] > 200
    # the expired token once, then one token per 2.5 s (refreshed 0.5 s ahead of its 3 s life)
    assert 10 <= app.token_calls <= 16, app.token_calls
    stale = sum(r.outcome in (110, 111) for r in app.received)
    assert stale <= 2 + app.token_calls // 4, stale  # refreshed ahead: Baidu rarely sees a lapsed token
    _assert_logs_clean(tmp, app, issued | set(app.tokens))


def test_tools_are_refused_with_a_400_not_dropped(gateway: str, emu) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    before = len(emu[1].received)
    with pytest.raises(openai.BadRequestError) as err:
        client(gateway).chat.completions.create(
            model="llama-baidu", messages=[{"role": "user", "content": "hi"}], tools=tools,
            tool_choice="required")
    assert "function calling" in err.value.message
    assert len(emu[1].received) == before  # nothing was sent to Baidu
