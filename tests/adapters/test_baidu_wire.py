"""The Baidu body rules, the response mapping, the error-code table and the backend config."""

from __future__ import annotations

import msgspec
import pytest

from adapters.baidu import Backend
from adapters.baidu.errors import from_error_code, redact
from adapters.baidu.wire import (
    BaiduChatResponse,
    BaiduUsage,
    from_baidu,
    to_baidu,
    validate_request,
)
from adapters.types import ChatRequest, Message, UpstreamBadRequest


def chat(*turns: tuple[str, str], **kw: object) -> ChatRequest:
    return ChatRequest(model="llama_3_8b", messages=[Message(r, c) for r, c in turns], **kw)  # type: ignore[arg-type]


def roles(req: ChatRequest, **kw: object) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in to_baidu(req, **kw).messages]  # type: ignore[arg-type]


def test_system_is_folded_into_the_first_user_turn_and_never_sent_as_a_field() -> None:
    body = to_baidu(chat(("system", "Be terse."), ("user", "hi")))
    assert [(m.role, m.content) for m in body.messages] == [("user", "Be terse.\n\nhi")]
    assert b"system" not in msgspec.json.encode(body)


def test_even_conversation_with_consecutive_users_becomes_odd_and_alternating() -> None:
    req = chat(("system", "S"), ("user", "a"), ("user", "b"), ("assistant", "c"), ("user", "d"), ("user", "e"))
    assert roles(req) == [("user", "S\n\na\n\nb"), ("assistant", "c"), ("user", "d\n\ne")]
    assert validate_request(to_baidu(req)) is None


def test_leading_assistant_turns_are_dropped_and_consecutive_assistants_merged() -> None:
    req = chat(("assistant", "x"), ("user", "a"), ("assistant", "b"), ("assistant", "c"), ("user", "d"))
    assert roles(req) == [("user", "a"), ("assistant", "b\n\nc"), ("user", "d")]


def test_a_conversation_ending_with_the_assistant_is_refused_with_a_clear_400() -> None:
    with pytest.raises(UpstreamBadRequest, match="last message must come from the user") as exc:
        to_baidu(chat(("user", "a"), ("assistant", "b")))
    assert exc.value.status == 400


def test_a_system_only_request_is_sent_as_the_user_turn() -> None:
    assert roles(chat(("system", "Tell a joke"))) == [("user", "Tell a joke")]


def test_a_plain_prompt_becomes_one_user_turn() -> None:
    assert roles(ChatRequest(model="m", prompt="Once upon")) == [("user", "Once upon")]


@pytest.mark.parametrize(("given", "sent"), [(0.0, 0.01), (0.5, 0.5), (1.0, 1.0), (1.7, 1.0)])
def test_temperature_is_mapped_into_zero_exclusive_to_one(given: float, sent: float) -> None:
    assert to_baidu(chat(("user", "a"), temperature=given)).temperature == sent


def test_top_p_top_k_and_penalties_are_mapped_into_baidus_ranges() -> None:
    body = to_baidu(chat(("user", "a"), top_p=1.5, top_k=0, frequency_penalty=1.0, presence_penalty=-2.0))
    assert (body.top_p, body.top_k, body.penalty_score) == (1.0, None, 1.5)
    body = to_baidu(chat(("user", "a"), top_k=40, presence_penalty=2.0))
    assert (body.top_k, body.penalty_score) == (40, 2.0)
    body = to_baidu(chat(("user", "a"), frequency_penalty=-1.0))
    assert body.penalty_score == 1.0
    body = to_baidu(chat(("user", "a"), extra={"repetition_penalty": 3.0, "unknown": 1}))
    assert body.penalty_score == 2.0
    assert b"unknown" not in msgspec.json.encode(body)
    assert to_baidu(chat(("user", "a"))).penalty_score is None


def test_user_id_comes_from_the_principal() -> None:
    assert to_baidu(chat(("user", "a"), user="alice")).user_id == "alice"


def test_stop_within_limits_is_sent_as_given() -> None:
    assert to_baidu(chat(("user", "a"), stop=["<|eot_id|>", "END"])).stop == ["<|eot_id|>", "END"]


@pytest.mark.parametrize(("stop", "why"), [
    (["a", "b", "c", "d", "e"], "at most 4 stop sequences"),
    (["x" * 21], "at most 20 characters"),
])
def test_stop_beyond_baidus_limits_is_refused_not_trimmed(stop: list[str], why: str) -> None:
    with pytest.raises(UpstreamBadRequest, match=why):
        to_baidu(chat(("user", "a"), stop=stop))


def test_content_over_4800_characters_is_refused() -> None:
    with pytest.raises(UpstreamBadRequest, match="at most 4800"):
        to_baidu(chat(("user", "x" * 4801)))
    assert to_baidu(chat(("user", "x" * 4800))).messages[0].content == "x" * 4800


def test_trim_history_drops_the_oldest_pairs_but_keeps_the_system_text() -> None:
    req = chat(("system", "S"), ("user", "a" * 3000), ("assistant", "b" * 1000), ("user", "c" * 1000))
    assert roles(req, trim_history=True) == [("user", "S\n\n" + "c" * 1000)]
    with pytest.raises(UpstreamBadRequest):
        to_baidu(chat(("user", "c" * 5000)), trim_history=True)


def test_from_baidu_maps_result_flags_and_reported_usage() -> None:
    resp = BaiduChatResponse(id="as-1", result="hi", usage=BaiduUsage(3, 2, 5))
    r = from_baidu(resp, model="llama_3_8b")
    assert (r.text, r.finish_reason, r.id, r.model) == ("hi", "stop", "as-1", "llama_3_8b")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.source) == (3, 2, "reported")
    assert from_baidu(BaiduChatResponse(result="x", is_truncated=True)).finish_reason == "length"
    assert from_baidu(BaiduChatResponse(need_clear_history=True, is_truncated=True)).finish_reason == "content_filter"


@pytest.mark.parametrize(("code", "status", "retryable", "kind"), [
    (4, 429, True, "rate_limit_exceeded"), (18, 429, True, "rate_limit_exceeded"),
    (336501, 429, True, "rate_limit_exceeded"), (336502, 429, True, "rate_limit_exceeded"),
    (1, 503, True, "upstream_unavailable"), (2, 503, True, "upstream_unavailable"),
    (336100, 503, True, "upstream_unavailable"),
    (336003, 400, False, "invalid_request"),
    (6, 502, False, "upstream_auth_error"), (13, 502, False, "upstream_auth_error"),
    (14, 502, False, "upstream_auth_error"), (100, 502, False, "upstream_auth_error"),
    (110, 502, False, "upstream_auth_error"), (111, 502, False, "upstream_auth_error"),
    (17, 429, False, "upstream_quota_exhausted"), (19, 429, False, "upstream_quota_exhausted"),
])
def test_error_code_table(code: int, status: int, retryable: bool, kind: str) -> None:
    err = from_error_code(code, "msg from baidu", "b1")
    assert (err.status, err.retryable, err.code) == (status, retryable, kind)
    assert "msg from baidu" in err.message


def test_redact_removes_tokens_and_secrets_from_urls() -> None:
    url = "http://h/x?access_token=24.abc-123&client_id=AK&client_secret=SK&a=1"
    assert redact(url) == "http://h/x?access_token=***&client_id=***&client_secret=***&a=1"


def cfg(**kw: object) -> Backend:
    return msgspec.convert({"kind": "baidu", "endpoint": "llama_3_8b", **kw}, Backend)


def test_config_picks_the_auth_mode_from_the_credential_pair() -> None:
    assert cfg(api_key="k", secret_key="s").auth_mode == "access_token"
    assert cfg(access_key="k", secret_key="s").auth_mode == "signature"
    assert cfg(api_key="k", secret_key="s").base_url == "https://aip.baidubce.com"


@pytest.mark.parametrize(("kw", "why"), [
    ({"api_key": "k"}, "secret_key is required"),
    ({"secret_key": "s"}, "exactly one of api_key"),
    ({"api_key": "k", "access_key": "a", "secret_key": "s"}, "not both"),
    ({"api_key": "k", "secret_key": "s", "base_url": "aip.baidubce.com"}, "base_url"),
])
def test_config_refuses_a_missing_or_ambiguous_credential_pair(kw: dict, why: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=why):
        cfg(**kw)


def test_config_repr_shows_no_secret() -> None:
    text = repr(cfg(api_key="the-api-key", secret_key="the-secret"))
    assert "the-secret" not in text and "the-api-key" not in text
