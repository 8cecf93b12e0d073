"""The Baidu door, end to end: the real qianfan SDK (and plain HTTP) -> gateway -> OpenAI emulator.

The qianfan SDK reads its settings from the environment once per process, so every SDK call
runs in a child process configured only by QIANFAN_* variables (QIANFAN_CACHE_DIR and the
working directory keep it away from the developer's own ~/.qianfan and .env).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from adapters.baidu.signer import canonical_time, sign
from adapters.loopback import LoopbackServer
from adapters.openai.emulator import EmulatorControl, create_emulator
from adapters.types import UpstreamBadRequest, UpstreamQuotaExhausted, UpstreamRateLimited, UpstreamUnavailable
from gateway.errors import (
    AuthenticationFailed,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    QuotaExceeded,
    RateLimited,
    StoreUnavailableError,
    UpstreamFailed,
)
from gateway.inbound.baidu_codec import fault_for
from tests.support import free_port, gateway_process, start_gateway, write_config

KEY = "sk-test-alice"
OTHER_KEY = "sk-test-bob"
CHAT = "/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/"
SYNC_FIELDS = ["id", "object", "created", "result", "is_truncated", "need_clear_history", "usage"]
STREAM_FIELDS = ["id", "object", "created", "sentence_id", "is_end", "is_truncated", "result",
                 "need_clear_history", "usage"]


@pytest.fixture(scope="module")
def emulator() -> Iterator[tuple[LoopbackServer, EmulatorControl]]:
    ctl = EmulatorControl()
    with LoopbackServer(create_emulator(ctl)) as server:
        yield server, ctl


@pytest.fixture(autouse=True)
def _reset(emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    emulator[1].reset()


def config_text(emulator_url: str, store: str = "memory://", token_ttl: int = 2592000) -> str:
    dead = free_port()  # nothing listens here
    return f"""
store: {{url: "{store}"}}
inbound: {{baidu: {{token_ttl: {token_ttl}}}}}
backends:
  vllm: {{kind: openai, base_url: "{emulator_url}/v1", model: meta-llama/Meta-Llama-3-8B-Instruct,
          timeout: {{connect: 1, read: 5}}}}
  down: {{kind: openai, base_url: "http://127.0.0.1:{dead}/v1", model: m, timeout: {{connect: 1, read: 5}}}}
models:
  llama-3-8b: {{targets: [{{backend: vllm}}], baidu_endpoint: llama_3_8b}}
  echo: {{targets: [{{backend: vllm}}]}}
  secret-model: {{targets: [{{backend: vllm}}]}}
  broken: {{targets: [{{backend: down}}]}}
keys:
  - {{name: alice-app, key: {KEY}, user: alice, models: [llama-3-8b, echo, broken]}}
  - {{name: bob-app, key: {OTHER_KEY}, user: bob}}
"""


@pytest.fixture(scope="module")
def gateway(emulator: tuple[LoopbackServer, EmulatorControl]) -> Iterator[str]:
    with start_gateway(config_text(emulator[0].url)) as url:
        yield url


@pytest.fixture(scope="module")
def token(gateway: str) -> str:
    r = httpx.post(gateway + "/oauth/2.0/token", params={
        "grant_type": "client_credentials", "client_id": "alice-app", "client_secret": KEY})
    return r.json()["access_token"]


def chat(url: str, body: dict | bytes, endpoint: str = "llama_3_8b", token: str | None = None,
         headers: dict[str, str] | None = None) -> httpx.Response:
    params = {"access_token": token} if token is not None else None
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + CHAT + endpoint, params=params, content=content, timeout=10,
                      headers={"content-type": "application/json", **(headers or {})})


def user(text: str) -> dict[str, list[dict[str, str]]]:
    return {"messages": [{"role": "user", "content": text}]}


def events(r: httpx.Response) -> list[dict]:
    """The `data:` events of a Baidu stream, checking the framing on the way."""
    assert r.headers["content-type"] == "text/event-stream"
    blocks = r.text.split("\n\n")
    assert blocks[-1] == "", "the stream ends with a blank line"
    out = []
    for block in blocks[:-1]:
        assert block.startswith("data: ") and "\n" not in block, block  # one compact line an event
        out.append(json.loads(block[6:]))
    return out


def compact(r: httpx.Response) -> bool:
    return r.content == json.dumps(r.json(), separators=(",", ":"), ensure_ascii=False).encode()


# --- the real qianfan SDK -------------------------------------------------------------------


def run_qianfan(tmp_path: Path, env: dict[str, str], code: str) -> dict:
    """Run `code` with the qianfan SDK in a child process configured only by `env`; it prints
    one JSON value on its last line (or the exception it raised)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QIANFAN_")}
    script = ("import asyncio, json, qianfan\n"
              "def main():\n" + "".join(f"    {line}\n" for line in code.strip().splitlines()) +
              "try:\n    out = main()\n"
              "except Exception as e:\n    out = {'raised': type(e).__name__, 'message': str(e)}\n"
              "print(json.dumps(out))\n")
    p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**clean, "QIANFAN_CACHE_DIR": str(tmp_path / "cache"), **env})
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def ak_sk(url: str, secret: str = KEY) -> dict[str, str]:
    return {"QIANFAN_BASE_URL": url, "QIANFAN_AK": "alice-app", "QIANFAN_SK": secret}


def iam(url: str, secret: str = KEY) -> dict[str, str]:
    # The console URL only redirects the SDK's service-list lookup to the gateway as well.
    return {"QIANFAN_BASE_URL": url, "QIANFAN_CONSOLE_API_BASE_URL": url,
            "QIANFAN_ACCESS_KEY": "alice-app", "QIANFAN_SECRET_KEY": secret}


def test_qianfan_sync_do_with_api_key_and_secret_gets_the_backends_answer(gateway: str, tmp_path: Path) -> None:
    body = run_qianfan(tmp_path, ak_sk(gateway), """
r = qianfan.ChatCompletion(endpoint="llama_3_8b").do(messages=[{"role": "user", "content": "hello from qianfan"}])
return r.body
""")
    assert body["result"] == "You said: hello from qianfan"
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    assert body["id"].startswith("as-") and body["is_truncated"] is False


def test_qianfan_sync_stream_gets_every_piece_and_the_final_usage(gateway: str, tmp_path: Path) -> None:
    chunks = run_qianfan(tmp_path, ak_sk(gateway), """
s = qianfan.ChatCompletion(endpoint="llama_3_8b").do(messages=[{"role": "user", "content": "one two three"}],
                                                     stream=True)
return [c.body for c in s]
""")
    assert "".join(c["result"] for c in chunks) == "You said: one two three"
    assert [c["sentence_id"] for c in chunks] == list(range(len(chunks)))
    assert [c["is_end"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}


def test_qianfan_async_ado_answers_and_streams(gateway: str, tmp_path: Path) -> None:
    out = run_qianfan(tmp_path, ak_sk(gateway), """
async def go():
    c = qianfan.ChatCompletion(endpoint="llama_3_8b")
    r = await c.ado(messages=[{"role": "user", "content": "async hi"}])
    s = await c.ado(messages=[{"role": "user", "content": "async stream"}], stream=True)
    return [r.body, [x.body async for x in s]]
return asyncio.run(go())
""")
    full, chunks = out
    assert full["result"] == "You said: async hi"
    assert "".join(c["result"] for c in chunks) == "You said: async stream"
    assert chunks[-1]["is_end"] is True and chunks[-1]["usage"]["completion_tokens"] == 4


def test_qianfan_iam_mode_signatures_are_verified_and_answered(gateway: str, tmp_path: Path) -> None:
    out = run_qianfan(tmp_path, iam(gateway), """
c = qianfan.ChatCompletion(endpoint="llama_3_8b")
r = c.do(messages=[{"role": "user", "content": "signed hello"}], request_id="my-request-7")
return [r.body, [x.body for x in c.do(messages=[{"role": "user", "content": "signed stream"}], stream=True)]]
""")
    full, chunks = out
    assert full["result"] == "You said: signed hello"
    assert "".join(c["result"] for c in chunks) == "You said: signed stream"


def test_qianfan_iam_mode_with_a_wrong_secret_is_refused(gateway: str, tmp_path: Path,
                                                          emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    out = run_qianfan(tmp_path, iam(gateway, secret="sk-not-the-key"), """
return qianfan.ChatCompletion(endpoint="llama_3_8b").do(messages=[{"role": "user", "content": "x"}]).body
""")
    assert out.get("raised") == "RequestError"
    assert "SignatureDoesNotMatch, cause: Fail to authn user: Signature does not match" in out["message"]
    assert emulator[1].requests == []


def test_qianfan_with_a_wrong_api_secret_gets_no_token(gateway: str, tmp_path: Path) -> None:
    out = run_qianfan(tmp_path, ak_sk(gateway, secret="sk-not-the-key"), """
return qianfan.ChatCompletion(endpoint="llama_3_8b").do(messages=[{"role": "user", "content": "x"}]).body
""")
    assert out.get("raised") == "AuthError", out


def test_qianfan_iam_mode_finds_gateway_aliases_in_the_service_list(gateway: str, tmp_path: Path) -> None:
    body = run_qianfan(tmp_path, iam(gateway), """
return qianfan.ChatCompletion(model="echo").do(messages=[{"role": "user", "content": "by model name"}]).body
""")
    assert body.get("result") == "You said: by model name", body


def test_qianfan_retries_a_transient_upstream_failure_and_gets_the_answer(
        gateway: str, tmp_path: Path, emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    ctl = emulator[1]
    ctl.fail_status, ctl.fail_times = 503, 1  # answered as 336100, which the SDK retries
    body = run_qianfan(tmp_path, ak_sk(gateway), """
return qianfan.ChatCompletion(endpoint="llama_3_8b").do(messages=[{"role": "user", "content": "again"}]).body
""")
    assert body.get("result") == "You said: again", body
    assert len(ctl.requests) == 2


# --- the three request examples of Baidu's Meta-Llama-3-8B page, over plain HTTP ----------------


def test_single_turn_example_has_the_documented_response_shape(gateway: str, token: str) -> None:
    r = chat(gateway, user("Please introduce yourself"), token=token)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == SYNC_FIELDS and compact(r)
    assert body["id"].startswith("as-") and body["object"] == "chat.completion"
    assert abs(body["created"] - time.time()) < 60
    assert body["result"] == "You said: Please introduce yourself"
    assert (body["is_truncated"], body["need_clear_history"]) == (False, False)
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    assert r.headers["x-baidu-request-id"] == body["id"]


def test_multi_turn_example_has_the_documented_response_shape(
        gateway: str, token: str, emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    turns = [{"role": "user", "content": "Please introduce yourself"},
             {"role": "assistant", "content": "I am Llama 3, a language model."},
             {"role": "user", "content": "What can you do?"}]
    r = chat(gateway, {"messages": turns}, token=token)
    body = r.json()
    assert list(body) == SYNC_FIELDS and compact(r)
    assert body["result"] == "You said: What can you do?"
    assert emulator[1].requests[-1]["messages"] == turns
    assert body["usage"]["prompt_tokens"] == 3 + 7 + 4 + 3 * 4


def test_streaming_example_has_the_documented_event_stream(gateway: str, token: str) -> None:
    r = chat(gateway, {**user("Please introduce yourself"), "stream": True}, token=token)
    assert r.status_code == 200
    evs = events(r)
    assert all(list(e) == STREAM_FIELDS for e in evs)
    assert [e["sentence_id"] for e in evs] == list(range(len(evs)))
    assert [e["is_end"] for e in evs].count(True) == 1 and evs[-1]["is_end"] is True
    assert evs[-1]["result"] == "" and evs[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 5,
                                                             "total_tokens": 12}
    assert all(e["usage"]["completion_tokens"] == 0 for e in evs[:-1])
    assert "".join(e["result"] for e in evs) == "You said: Please introduce yourself"
    assert len({e["id"] for e in evs}) == 1 and evs[0]["id"].startswith("as-")


# --- validation, exactly as Baidu does it ---------------------------------------------------

U, A = "user", "assistant"


def turns(*roles: str) -> list[dict[str, str]]:
    return [{"role": r, "content": f"turn {i}"} for i, r in enumerate(roles)]


@pytest.mark.parametrize("body, needle", [
    ({"stream": False}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": turns(U, A)}, "the length of messages must be an odd number"),
    ({"messages": turns(A, U, A)}, "role"),
    ({"messages": turns(U, U, U)}, "role"),
    ({"messages": [{"role": U, "content": "x" * 4801}]}, "4800"),
    ({"messages": [*turns(U, A), {"role": U, "content": "y" * 4790}]}, "4800"),
    ({**user("hi"), "temperature": 0}, "temperature"),
    ({**user("hi"), "temperature": 1.01}, "temperature"),
    ({**user("hi"), "top_p": 1.5}, "top_p"),
    ({**user("hi"), "top_p": -0.1}, "top_p"),
    ({**user("hi"), "penalty_score": 0.9}, "penalty_score"),
    ({**user("hi"), "penalty_score": 2.1}, "penalty_score"),
    ({**user("hi"), "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({**user("hi"), "stop": ["x" * 21]}, "stop"),
    ({**user("hi"), "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": U, "content": ["parts"]}]}, "content"),
], ids=["missing", "empty", "even-count", "starts-with-assistant", "no-alternation", "content-over-4800",
        "total-over-4800", "temperature-0", "temperature-over-1", "top_p-over-1", "top_p-negative",
        "penalty-under-1", "penalty-over-2", "five-stops", "stop-over-20-chars", "temperature-not-a-number",
        "content-not-a-string"])
def test_each_validation_rule_answers_336003(gateway: str, token: str, body: dict, needle: str,
                                             emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    r = chat(gateway, body, token=token)
    assert r.status_code == 200 and compact(r)
    err = r.json()
    assert err["error_code"] == 336003 and needle in err["error_msg"], err
    assert emulator[1].requests == []


def test_values_on_the_boundaries_are_accepted(gateway: str, token: str,
                                               emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    for extra in ({"temperature": 1.0, "top_p": 0, "penalty_score": 1.0}, {"top_p": 1, "penalty_score": 2},
                  {"stop": ["x" * 20, "b", "c", "d"], "temperature": 0.01}):
        body = {"messages": [*turns(U, A), {"role": U, "content": "z" * (4800 - 12)}], **extra}
        assert chat(gateway, body, token=token).json()["result"].startswith("You said: z"), extra
    assert len(emulator[1].requests) == 3


def test_a_body_that_is_not_json_is_336002(gateway: str, token: str) -> None:
    for raw in (b"{nope", b""):
        assert chat(gateway, raw, token=token).json()["error_code"] == 336002


def test_a_wrong_http_method_is_336101(gateway: str, token: str) -> None:
    for method in ("GET", "PUT"):
        r = httpx.request(method, gateway + CHAT + "llama_3_8b", params={"access_token": token})
        assert r.status_code == 200 and r.json()["error_code"] == 336101


def test_what_the_sdk_adds_is_tolerated_and_vendor_inputs_reach_the_backend(
        gateway: str, token: str, emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    body = {**user("x"), "stream": False, "penalty_score": 1.3, "top_k": 5, "my_knob": 7,
            "extra_parameters": {"request_source": "qianfan_py_sdk_v0.4.12.3"}, "user_id": "u-1"}
    r = chat(gateway, body, token=token, headers={"Request_id": "sdk-py-0.4.12.3-AbCdEfGhIjKlMnOp"})
    assert r.json()["result"] == "You said: x"
    sent = emulator[1].requests[-1]
    assert (sent["repetition_penalty"], sent["top_k"], sent["my_knob"]) == (1.3, 5, 7)
    assert "extra_parameters" not in sent and "penalty_score" not in sent


def test_max_output_tokens_cuts_the_answer_and_marks_it_truncated(gateway: str, token: str) -> None:
    body = chat(gateway, {**user("a b c d e"), "max_output_tokens": 3}, token=token).json()
    assert (body["result"], body["is_truncated"]) == ("You said: a", True)
    assert body["usage"]["completion_tokens"] == 3


def test_a_system_field_becomes_the_system_turn(gateway: str, token: str,
                                                emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    chat(gateway, {**user("hi"), "system": "Be terse."}, token=token)
    assert emulator[1].requests[-1]["messages"][0] == {"role": "system", "content": "Be terse."}


# --- authentication -------------------------------------------------------------------------


def test_token_endpoint_answers_baidus_token_body(gateway: str) -> None:
    r = httpx.post(gateway + "/oauth/2.0/token?grant_type=client_credentials&client_id=alice-app"
                   f"&client_secret={KEY}", headers={"content-type": "application/json"})
    assert r.status_code == 200 and compact(r)
    body = r.json()
    assert list(body) == ["access_token", "expires_in", "refresh_token", "scope", "session_key", "session_secret"]
    assert body["access_token"].startswith("24.") and body["expires_in"] == 2592000
    assert KEY not in r.text


@pytest.mark.parametrize("params, error, description", [
    ({"grant_type": "client_credentials", "client_id": "nobody", "client_secret": KEY},
     "invalid_client", "unknown client id"),
    ({"grant_type": "client_credentials", "client_id": "alice-app", "client_secret": OTHER_KEY},
     "invalid_client", "Client authentication failed"),
    ({"grant_type": "password", "client_id": "alice-app", "client_secret": KEY}, "unsupported_grant_type", ""),
], ids=["wrong-id", "wrong-secret", "wrong-grant"])
def test_token_endpoint_refuses_wrong_credentials_in_baidus_words(gateway: str, params: dict, error: str,
                                                                  description: str) -> None:
    r = httpx.post(gateway + "/oauth/2.0/token", params=params)
    assert r.status_code >= 400
    assert r.json()["error"] == error and description in r.json()["error_description"]
    assert "access_token" not in r.json()


def test_unknown_or_missing_credentials_are_110(gateway: str) -> None:
    assert chat(gateway, user("x"), token="24.not-a-token").json()["error_code"] == 110
    assert chat(gateway, user("x"), token="").json()["error_code"] == 110
    r = chat(gateway, user("x"))
    assert r.status_code == 200 and r.json()["error_code"] == 110
    assert r.json()["error_msg"] == "Access token invalid or no longer valid"


def test_an_expired_token_is_111(emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    with start_gateway(config_text(emulator[0].url, token_ttl=1)) as url:
        r = httpx.post(url + "/oauth/2.0/token", params={
            "grant_type": "client_credentials", "client_id": "alice-app", "client_secret": KEY})
        tok = r.json()["access_token"]
        assert r.json()["expires_in"] == 1
        assert chat(url, user("fresh"), token=tok).json()["result"] == "You said: fresh"
        time.sleep(1.1)
        r = chat(url, user("stale"), token=tok)
        assert r.status_code == 200 and r.json()["error_code"] == 111


def test_bearer_keys_authenticate_plain_http_clients(gateway: str) -> None:
    ok = chat(gateway, user("bearer"), headers={"authorization": f"Bearer {KEY}"})
    assert ok.json()["result"] == "You said: bearer"
    assert chat(gateway, user("x"), headers={"authorization": "Bearer sk-wrong"}).json()["error_code"] == 110


def signed(url: str, body: dict, access_key: str = "alice-app", secret: str = KEY, age: float = 0,
           listed: str | None = None) -> httpx.Response:
    """A bce-auth-v1 request the way the qianfan SDK builds one (host with port, request_id)."""
    host = url.removeprefix("http://")
    path = CHAT + "llama_3_8b"
    stamp = canonical_time(time.time() - age)
    headers = {"Content-Type": "application/json", "Host": host, "x-bce-date": stamp, "request_id": "r-1"}
    sig = sign("POST", path, {}, headers, access_key=access_key, secret_key=secret, timestamp=stamp,
               headers_to_sign=["content-type", "host", "x-bce-date", "request_id"])
    auth = sig.authorization if listed is None else f"{sig.auth_string_prefix}/{listed}/{sig.signature}"
    return httpx.post(url + path, content=json.dumps(body), headers={**headers, "Authorization": auth})


def test_signature_is_checked_with_sorted_headers_and_the_host_port(gateway: str) -> None:
    # The Python SDK lists the signed headers unsorted; the gateway sorts them as Baidu does.
    r = signed(gateway, user("signed"), listed="request_id;x-bce-date;host;content-type")
    assert r.json()["result"] == "You said: signed"


@pytest.mark.parametrize("kw, status, code", [
    ({"secret": OTHER_KEY}, 403, "SignatureDoesNotMatch"),
    ({"access_key": "nobody"}, 401, "NotFound"),
    ({"age": 3600}, 403, "RequestExpired"),
], ids=["wrong-secret", "unknown-access-key", "stale-date"])
def test_bad_signatures_are_refused_with_bce_error_headers(gateway: str, kw: dict, status: int, code: str,
                                                           emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    r = signed(gateway, user("x"), **kw)
    assert r.status_code == status
    assert r.headers["x-bce-error-code"] == code and r.headers["x-bce-error-message"].startswith(code + ", cause: ")
    assert emulator[1].requests == []


# --- endpoints and error codes --------------------------------------------------------------


def test_endpoints_map_to_aliases_by_baidu_endpoint_or_by_name(gateway: str, token: str) -> None:
    assert chat(gateway, user("a"), "llama_3_8b", token).json()["result"] == "You said: a"
    assert chat(gateway, user("b"), "echo", token).json()["result"] == "You said: b"
    # An alias that declares a baidu_endpoint answers there only.
    assert chat(gateway, user("c"), "llama-3-8b", token).json()["error_code"] == 3


def test_an_unknown_endpoint_is_error_code_3(gateway: str, token: str) -> None:
    for path in (CHAT + "completions_pro", "/rpc/2.0/ai_custom/v1/wenxinworkshop/embeddings/embedding-v1"):
        r = httpx.post(gateway + path, params={"access_token": token}, json=user("x"))
        assert r.status_code == 200 and r.json() == {"error_code": 3, "error_msg": "Unsupported openapi method",
                                                     "id": r.json()["id"]}


def test_an_alias_the_key_may_not_use_is_error_code_6(gateway: str, token: str) -> None:
    assert chat(gateway, user("x"), "secret-model", token).json()["error_code"] == 6
    bob = chat(gateway, user("x"), "secret-model", headers={"authorization": f"Bearer {OTHER_KEY}"})
    assert bob.json()["result"] == "You said: x"


def test_an_unavailable_upstream_is_336100_with_or_without_streaming(gateway: str, token: str) -> None:
    for stream in (False, True):
        r = chat(gateway, {**user("x"), "stream": stream}, "broken", token)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        assert r.json()["error_code"] == 336100 and compact(r)


def test_upstream_throttling_is_18_and_upstream_refusal_is_336003(
        gateway: str, token: str, emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    emulator[1].fail_status = 429
    assert chat(gateway, user("x"), token=token).json()["error_code"] == 18
    emulator[1].fail_status = 400
    assert chat(gateway, user("x"), token=token).json()["error_code"] == 336003


def test_a_stream_failing_midway_ends_with_a_336000_event(
        gateway: str, token: str, emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    emulator[1].drop_after = 2
    evs = events(chat(gateway, {**user("a b c d e f"), "stream": True}, token=token))
    assert "".join(e.get("result", "") for e in evs[:-1]) == "You said:"
    assert evs[-1]["error_code"] == 336000 and evs[-1]["error_msg"]
    assert not any(e.get("is_end") for e in evs)


def test_stream_lines_never_contain_the_word_event_for_the_go_sdk(gateway: str, token: str) -> None:
    r = chat(gateway, {**user("an event happened"), "stream": True}, token=token)
    assert "event" not in r.text
    assert "".join(e["result"] for e in events(r)) == "You said: an event happened"


@pytest.mark.parametrize("err, code", [
    (RateLimited("slow down", limit="rpm"), 18),
    (RateLimited("slow down", limit="concurrency"), 18),
    (RateLimited("slow down", limit="tpm"), 4),
    (QuotaExceeded("spent"), 17),
    (PermissionDenied("no"), 6),
    (ModelNotFound("no such model"), 3),
    (AuthenticationFailed("who?"), 110),
    (InvalidRequest("bad"), 336003),
    (StoreUnavailableError("redis down"), 336100),
    (UpstreamFailed(UpstreamUnavailable("down")), 336100),
    (UpstreamFailed(UpstreamRateLimited("busy")), 18),
    (UpstreamFailed(UpstreamQuotaExhausted("spent")), 17),
    (UpstreamFailed(UpstreamBadRequest("nope")), 336003),
], ids=lambda v: v if isinstance(v, int) else type(v).__name__ + ":" + str(getattr(v, "limit", "")))
def test_gateway_errors_become_the_baidu_codes_clients_react_to(err: Exception, code: int) -> None:
    fault = fault_for(err)  # type: ignore[arg-type]
    assert fault.code == code and fault.message


# --- one gateway's token in another process; the two doors agree ---------------------------


def test_a_token_issued_by_one_gateway_process_is_accepted_by_another(
        emulator: tuple[LoopbackServer, EmulatorControl], redis_server, tmp_path: Path) -> None:
    redis_server.flushall()
    path = write_config(tmp_path, config_text(emulator[0].url, store=redis_server.url))
    with gateway_process(path) as first, gateway_process(path) as second:
        tok = httpx.post(first + "/oauth/2.0/token", params={
            "grant_type": "client_credentials", "client_id": "alice-app", "client_secret": KEY}).json()["access_token"]
        assert chat(second, user("elsewhere"), token=tok).json()["result"] == "You said: elsewhere"
        assert chat(second, user("x"), token=tok + "0").json()["error_code"] == 110
    # The store holds the token's hash, never the token.
    import redis

    client = redis.Redis.from_url(redis_server.url)
    keys = client.keys("*baidu*")
    assert keys and all(tok.encode() not in k and tok.encode() not in (client.get(k) or b"") for k in keys)


def test_openai_and_baidu_doors_give_the_same_answer(gateway: str, token: str) -> None:
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"},
                    {"role": "user", "content": "Tell me about llamas"}]
    oa = openai.OpenAI(base_url=gateway + "/v1", api_key=KEY, max_retries=0)
    o = oa.chat.completions.create(model="llama-3-8b", messages=conversation)
    b = chat(gateway, {"messages": conversation}, token=token).json()
    assert b["result"] == o.choices[0].message.content == "You said: Tell me about llamas"
    assert (b["usage"]["prompt_tokens"], b["usage"]["completion_tokens"]) == \
        (o.usage.prompt_tokens, o.usage.completion_tokens)
    streamed = events(chat(gateway, {"messages": conversation, "stream": True}, token=token))
    pieces = oa.chat.completions.create(model="llama-3-8b", messages=conversation, stream=True)
    assert "".join(e["result"] for e in streamed) == \
        "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)


def test_gateway_limits_and_quotas_answer_in_baidus_codes(
        emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    """rpm -> 18, tpm -> 4, quota -> 17, end to end through the Baidu door (HTTP 200 bodies)."""
    config = config_text(emulator[0].url).replace(
        "  - {name: bob-app, key: " + OTHER_KEY + ", user: bob}",
        "  - {name: bob-app, key: " + OTHER_KEY + ", user: bob, limits: {rpm: 1}}\n"
        "  - {name: carol-app, key: sk-carol, user: carol, limits: {tpm: 60}}\n"
        "  - {name: dave-app, key: sk-dave, user: dave}\n"
        "users:\n  dave: {quota: {requests_per_day: 1}}")
    bearer = {"authorization": f"Bearer {OTHER_KEY}"}
    with start_gateway(config) as url:
        assert "result" in chat(url, user("one"), headers=bearer).json()
        refused = chat(url, user("two"), headers=bearer)
        assert refused.status_code == 200 and refused.json()["error_code"] == 18
        small = {**user("hi"), "max_output_tokens": 2}
        carol = {"authorization": "Bearer sk-carol"}
        answers = [chat(url, small, headers=carol).json() for _ in range(12)]
        assert any(a.get("error_code") == 4 for a in answers), answers
        dave = {"authorization": "Bearer sk-dave"}
        assert "result" in chat(url, user("one"), headers=dave).json()
        assert chat(url, user("two"), headers=dave).json()["error_code"] == 17
