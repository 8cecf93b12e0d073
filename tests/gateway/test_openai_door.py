"""The OpenAI door, end to end: the official openai SDK -> gateway (uvicorn, loopback) -> emulator."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from adapters.loopback import LoopbackServer
from adapters.openai.emulator import EmulatorControl, create_emulator
from tests.support import free_port, start_gateway

KEY = "sk-test-alice"
OTHER_KEY = "sk-test-bob"


@pytest.fixture(scope="module")
def emulator() -> Iterator[tuple[LoopbackServer, EmulatorControl]]:
    ctl = EmulatorControl()
    with LoopbackServer(create_emulator(ctl)) as server:
        yield server, ctl


@pytest.fixture(autouse=True)
def _reset(emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    emulator[1].reset()


@pytest.fixture(scope="module")
def gateway(emulator: tuple[LoopbackServer, EmulatorControl]) -> Iterator[str]:
    server, _ = emulator
    dead = free_port()  # nothing listens here
    config = f"""
backends:
  vllm: {{kind: openai, base_url: "{server.url}/v1", model: meta-llama/Meta-Llama-3-8B-Instruct,
          timeout: {{connect: 1, read: 5}}}}
  down: {{kind: openai, base_url: "http://127.0.0.1:{dead}/v1", model: m, timeout: {{connect: 1, read: 5}}}}
models:
  llama-3-8b: {{targets: [{{backend: vllm}}]}}
  secret-model: {{targets: [{{backend: vllm}}]}}
  broken: {{targets: [{{backend: down}}]}}
keys:
  - {{name: alice-app, key: {KEY}, user: alice, models: [llama-3-8b, broken]}}
  - {{name: bob-app, key: {OTHER_KEY}, user: bob}}
"""
    with start_gateway(config) as url:
        yield url


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def test_sync_chat_returns_the_emulators_answer_with_usage(gateway: str) -> None:
    r = client(gateway).chat.completions.create(
        model="llama-3-8b", messages=[{"role": "system", "content": "Be terse."},
                                      {"role": "user", "content": "hello gateway"}])
    assert r.choices[0].message.content == "You said: hello gateway"
    assert r.choices[0].finish_reason == "stop"
    assert r.model == "llama-3-8b"
    # prompt: 2 + 2 words, 4 framing tokens a message; answer: 4 tokens
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (12, 4, 16)


def test_sync_streaming_chat_forwards_every_piece_and_usage(gateway: str) -> None:
    stream = client(gateway).chat.completions.create(
        model="llama-3-8b", messages=[{"role": "user", "content": "one two three"}], stream=True,
        stream_options={"include_usage": True})
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == "You said: one two three"
    assert finish == "stop"
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (7, 5)


def test_async_client_streams_and_completes(gateway: str) -> None:
    async def run() -> tuple[str, str]:
        c = openai.AsyncOpenAI(base_url=gateway + "/v1", api_key=KEY, max_retries=0)
        r = await c.chat.completions.create(model="llama-3-8b",
                                            messages=[{"role": "user", "content": "async hi"}])
        text = ""
        async for chunk in await c.chat.completions.create(
                model="llama-3-8b", messages=[{"role": "user", "content": "async stream"}], stream=True):
            text += "".join(ch.delta.content or "" for ch in chunk.choices)
        await c.close()
        return r.choices[0].message.content or "", text

    full, streamed = asyncio.run(run())
    assert full == "You said: async hi"
    assert streamed == "You said: async stream"


def test_completions_take_a_plain_prompt(gateway: str, emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    r = client(gateway).completions.create(model="llama-3-8b", prompt="Once upon a time", max_tokens=4)
    assert r.choices[0].text == "You said: Once upon"
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (4, 4)
    sent = emulator[1].requests[-1]
    assert sent["prompt"] == "Once upon a time" and "messages" not in sent
    stream = client(gateway).completions.create(model="llama-3-8b", prompt="a b", stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == "You said: a b"


def test_unknown_fields_travel_to_the_backend_as_vendor_inputs(
        gateway: str, emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    client(gateway).chat.completions.create(
        model="llama-3-8b", messages=[{"role": "user", "content": "x"}], temperature=0.2,
        extra_body={"top_k": 40, "repetition_penalty": 1.1, "stop_token_ids": [128009]})
    sent = emulator[1].requests[-1]
    assert sent["model"] == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert (sent["top_k"], sent["repetition_penalty"], sent["stop_token_ids"]) == (40, 1.1, [128009])
    assert sent["temperature"] == 0.2


def test_bad_or_missing_key_is_401(gateway: str) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        client(gateway, "sk-wrong").chat.completions.create(
            model="llama-3-8b", messages=[{"role": "user", "content": "x"}])
    assert err.value.code == "invalid_api_key"
    r = httpx.post(gateway + "/v1/chat/completions", json={"model": "llama-3-8b", "messages": []})
    assert r.status_code == 401


@pytest.mark.parametrize("model", ["no-such-model", "secret-model"])
def test_unknown_or_forbidden_model_is_404(gateway: str, model: str) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client(gateway).chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
    assert err.value.code == "model_not_found"


def test_models_lists_only_the_aliases_the_key_may_use(gateway: str) -> None:
    assert sorted(m.id for m in client(gateway).models.list()) == ["broken", "llama-3-8b"]
    assert sorted(m.id for m in client(gateway, OTHER_KEY).models.list()) == [
        "broken", "llama-3-8b", "secret-model"]


@pytest.mark.parametrize(("body", "param"), [
    (b"{not json", None),
    (b'{"model": "llama-3-8b"}', "messages"),
    (b'{"model": "llama-3-8b", "messages": "hi"}', "messages"),
    (b'{"model": "llama-3-8b", "messages": [{"role": "user", "content": "x"}], "temperature": 9}',
     "temperature"),
    (b'{"model": "llama-3-8b", "messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}',
     "max_tokens"),
    (b'{"model": "llama-3-8b", "messages": [{"role": "wizard", "content": "x"}]}', "messages[0].role"),
    (b'{"model": "llama-3-8b", "messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}',
     "stop"),
])
def test_bad_input_is_400_naming_the_param(gateway: str, body: bytes, param: str | None) -> None:
    r = httpx.post(gateway + "/v1/chat/completions", content=body,
                   headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert err["message"]


def test_backend_down_is_502_within_the_connect_timeout(gateway: str) -> None:
    start = time.monotonic()
    r = httpx.post(gateway + "/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                   json={"model": "broken", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 502
    assert time.monotonic() - start < 1.5
    assert "down" in r.json()["error"]["message"]


def test_backend_429_becomes_429_with_retry_after(
        gateway: str, emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    emulator[1].fail_status, emulator[1].retry_after = 429, "7"
    with pytest.raises(openai.RateLimitError) as err:
        client(gateway).chat.completions.create(model="llama-3-8b", messages=[{"role": "user", "content": "x"}])
    assert err.value.response.headers["retry-after"] == "7"


def test_backend_5xx_and_malformed_json_are_502(
        gateway: str, emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    headers = {"authorization": f"Bearer {KEY}"}
    body = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "x"}]}
    emulator[1].fail_status = 500
    assert httpx.post(gateway + "/v1/chat/completions", headers=headers, json=body).status_code == 502
    emulator[1].fail_status, emulator[1].malformed = None, True
    r = httpx.post(gateway + "/v1/chat/completions", headers=headers, json=body)
    assert r.status_code == 502 and "malformed" in r.json()["error"]["message"]


def test_stream_cut_without_done_ends_with_an_error_event(
        gateway: str, emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    emulator[1].drop_after = 2
    stream = client(gateway).chat.completions.create(
        model="llama-3-8b", messages=[{"role": "user", "content": "a b c d e f"}], stream=True)
    with pytest.raises(openai.APIError) as err:
        for _ in stream:
            pass
    assert "without [DONE]" in str(err.value)


def test_request_id_is_echoed_or_generated(gateway: str) -> None:
    body = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "x"}]}
    headers = {"authorization": f"Bearer {KEY}"}
    r = httpx.post(gateway + "/v1/chat/completions", json=body, headers={**headers, "x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert r.headers["x-gateway-backend"] == "vllm" and r.headers["x-gateway-attempts"] == "1"
    r = httpx.post(gateway + "/v1/chat/completions", json={"model": "x"}, headers=headers)
    assert r.headers["x-request-id"].startswith("req-")


def test_client_disconnect_mid_stream_closes_the_upstream(
        gateway: str, emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    ctl = emulator[1]
    ctl.chunk_delay = 0.2
    with httpx.Client(timeout=10) as http, http.stream(
            "POST", gateway + "/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
            json={"model": "llama-3-8b", "stream": True,
                  "messages": [{"role": "user", "content": " ".join(["word"] * 40)}]}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        # leave after the first event: the emulator should see the gateway go within ~1 chunk
    deadline = time.monotonic() + 3
    while ctl.disconnects == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ctl.disconnects == 1
    assert ctl.completed_streams == 0


def test_stream_chunks_are_forwarded_as_they_arrive_not_held_back(
        gateway: str, emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    ctl = emulator[1]
    ctl.chunk_delay = 0.15
    try:
        arrivals: list[float] = []
        with httpx.Client(timeout=10) as http, http.stream(
                "POST", gateway + "/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                json={"model": "llama-3-8b", "stream": True,
                      "messages": [{"role": "user", "content": "one two three four five"}]}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                    arrivals.append(time.monotonic())
    finally:
        ctl.chunk_delay = 0.0
    assert len(arrivals) >= 4
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert min(gaps) > 0.08  # each chunk left when it came, none waited for the next


def test_health_and_readiness_need_no_key(gateway: str) -> None:
    assert httpx.get(gateway + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(gateway + "/readyz")
    assert ready.status_code == 200 and ready.json()["store_ok"] is True


def test_an_unexpected_error_in_a_chat_route_is_an_openai_500_without_a_traceback() -> None:
    from gateway.app import create_app
    from gateway.config import parse_config

    app = create_app(parse_config(f"""
backends: {{v: {{kind: openai, base_url: "http://127.0.0.1:9/v1", model: m}}}}
models: {{m: {{targets: [{{backend: v}}]}}}}
keys: [{{name: a, key: {KEY}, user: a}}]
""", env={}))

    async def broken(scope: object, receive: object, send: object) -> None:
        raise RuntimeError("secret internals")

    app.hot_routes["/v1/chat/completions"] = broken  # a fault injected where a bug would be
    with LoopbackServer(app) as server:
        r = httpx.post(server.url + "/v1/chat/completions", json={})
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error"
    assert "secret internals" not in r.text and "Traceback" not in r.text


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}]


def test_function_calls_come_back_whole(gateway: str, emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    r = client(gateway).chat.completions.create(
        model="llama-3-8b", messages=[{"role": "user", "content": "weather in Paris"}],
        tools=WEATHER, tool_choice="required")
    sent = emulator[1].requests[-1]
    assert sent["tools"] == WEATHER and sent["tool_choice"] == "required"
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"text": "weather in Paris"}
    # the backend's count passes through (the emulator counts the arguments' words)
    assert r.usage is not None and r.usage.completion_tokens == len(call.function.arguments.split())


def test_streamed_function_calls_arrive_in_pieces_that_add_up(gateway: str) -> None:
    stream = client(gateway).chat.completions.create(
        model="llama-3-8b", messages=[{"role": "user", "content": "weather in Oslo today"}],
        tools=WEATHER, tool_choice={"type": "function", "function": {"name": "get_weather"}},
        stream=True, stream_options={"include_usage": True})
    ids, names, args, finish, usage, pieces = [], [], "", None, None, 0
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                assert tc.index == 0
                pieces += 1
                ids += [tc.id] if tc.id else []
                names += [tc.function.name] if tc.function and tc.function.name else []
                args += (tc.function.arguments or "") if tc.function else ""
            finish = choice.finish_reason or finish
    assert pieces == 4  # the head (id, name) and three pieces of arguments, each forwarded
    assert len(ids) == 1 and names == ["get_weather"]
    assert json.loads(args) == {"text": "weather in Oslo today"}
    assert finish == "tool_calls"
    assert usage is not None and usage.completion_tokens == len(args.split())


def test_without_a_forced_call_tools_still_get_a_text_answer(gateway: str) -> None:
    r = client(gateway).chat.completions.create(
        model="llama-3-8b", messages=[{"role": "user", "content": "hi"}], tools=WEATHER)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content == "You said: hi"
