"""Replicate end to end: the official openai SDK -> gateway (uvicorn, loopback) -> Replicate emulator."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from adapters.loopback import LoopbackServer
from adapters.replicate.emulator import DEFAULT_TOKEN, EmulatorControl, create_emulator
from gateway.config import load_config
from tests.support import ROOT, start_gateway

KEY = "sk-test-replicate"
LLAMA3_CHAT = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant."
    "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
SEED_PROMPT = "<|user|>\nHow many llamas can you fit in a car?<|end|>\n<|assistant|>"
SEED_INPUT = {
    "prompt": SEED_PROMPT, "length_penalty": 1, "presence_penalty": 1.15, "prompt_template": "{prompt}",
    "max_tokens": 512, "min_tokens": 0, "temperature": 0.6, "top_p": 0.9, "log_performance_metrics": False,
}
BABBLE = "Three, if they are small.<|end|>" + " and then the llama said hello" * 40


@pytest.fixture(scope="module")
def emulator() -> Iterator[tuple[LoopbackServer, EmulatorControl]]:
    app = create_emulator(token_delay=0.002, deployments={"acme/llama-prod": "meta/meta-llama-3-8b-instruct"})
    with LoopbackServer(app) as server:
        yield server, app.control


@pytest.fixture(autouse=True)
def _reset(emulator: tuple[LoopbackServer, EmulatorControl]) -> None:
    emulator[1].reset()


@pytest.fixture
def ctl(emulator: tuple[LoopbackServer, EmulatorControl]) -> EmulatorControl:
    return emulator[1]


@pytest.fixture(scope="module")
def gateway(emulator: tuple[LoopbackServer, EmulatorControl]) -> Iterator[str]:
    url = emulator[0].url
    config = f"""
backends:
  rep-instruct:
    {{kind: replicate, api_token: {DEFAULT_TOKEN}, model: meta/meta-llama-3-8b-instruct, base_url: "{url}",
     wait_seconds: 5, timeout: {{connect: 1, read: 5, cold_boot: 0.3, generation: 5}}}}
  rep-base:
    {{kind: replicate, api_token: {DEFAULT_TOKEN}, model: meta/meta-llama-3-8b, base_url: "{url}",
     wait_seconds: 5, timeout: {{connect: 1, read: 5, cold_boot: 0.3, generation: 5}}}}
  rep-deploy:
    {{kind: replicate, api_token: {DEFAULT_TOKEN}, deployment: acme/llama-prod, base_url: "{url}",
     wait_seconds: 5, timeout: {{connect: 1, read: 5, cold_boot: 0.3, generation: 5}}}}
  rep-bad-token:
    {{kind: replicate, api_token: r8_not_the_token, model: meta/meta-llama-3-8b, base_url: "{url}"}}
models:
  llama-3-8b-instruct: {{targets: [{{backend: rep-instruct}}]}}
  llama-3-8b: {{targets: [{{backend: rep-base}}]}}
  misconfigured: {{targets: [{{backend: rep-bad-token}}]}}
  llama-prod: {{targets: [{{backend: rep-deploy}}]}}
keys:
  - {{name: app, key: {KEY}, user: alice}}
"""
    with start_gateway(config) as gw:
        yield gw


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)


def job(ctl: EmulatorControl) -> Any:
    assert len(ctl.jobs) == 1, f"expected one prediction, saw {len(ctl.jobs)}"
    return next(iter(ctl.jobs.values()))


def wait_for_cancel(ctl: EmulatorControl, pid: str, within: float) -> float | None:
    deadline = time.monotonic() + within
    while ctl.cancelled(pid) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return ctl.cancelled(pid)


def test_chat_answers_with_the_models_text_and_usage_from_metrics(gateway: str, ctl: EmulatorControl) -> None:
    r = client(gateway).chat.completions.create(
        model="llama-3-8b-instruct", messages=[{"role": "user", "content": "hello replicate"}])
    metrics = job(ctl).pred.metrics
    assert r.choices[0].message.content == "You said: hello replicate"
    assert r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (
        metrics.input_token_count, metrics.output_token_count)


def test_streamed_chat_forwards_the_pieces_and_usage_from_metrics(gateway: str, ctl: EmulatorControl) -> None:
    stream = client(gateway).chat.completions.create(
        model="llama-3-8b-instruct", messages=[{"role": "user", "content": "stream it"}], stream=True,
        stream_options={"include_usage": True})
    pieces, usage, finish = [], None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    pred = job(ctl).pred
    assert pieces == pred.output and "".join(pieces) == "You said: stream it"
    assert finish == "stop"
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (
        pred.metrics.input_token_count, pred.metrics.output_token_count)


def test_the_chat_prompt_is_the_exact_llama3_template(gateway: str, ctl: EmulatorControl) -> None:
    client(gateway).chat.completions.create(model="llama-3-8b-instruct", messages=[
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"}])
    sent = ctl.inputs[-1]
    assert sent["prompt"] == LLAMA3_CHAT
    assert sent["prompt_template"] == "{prompt}"


def test_the_seed_request_input_arrives_unchanged_through_completions(gateway: str,
                                                                       ctl: EmulatorControl) -> None:
    r = client(gateway).completions.create(
        model="llama-3-8b", prompt=SEED_PROMPT, max_tokens=512, temperature=0.6, top_p=0.9,
        presence_penalty=1.15, extra_body={"length_penalty": 1, "prompt_template": "{prompt}",
                                           "min_tokens": 0, "log_performance_metrics": False})
    assert ctl.inputs == [SEED_INPUT]
    assert r.choices[0].text.startswith("You said: <|user|>")


def test_a_stop_sequence_cuts_the_output_and_cancels_the_prediction(gateway: str,
                                                                     ctl: EmulatorControl) -> None:
    ctl.reply, ctl.token_delay = BABBLE, 0.005
    r = client(gateway).completions.create(model="llama-3-8b", prompt=SEED_PROMPT, stop=["<|end|>"])
    assert r.choices[0].text == "Three, if they are small."
    assert r.choices[0].finish_reason == "stop"
    pred = job(ctl).pred
    assert ctl.cancelled(pred.id) is not None and pred.status == "canceled"

    ctl.reset()
    ctl.reply, ctl.token_delay = BABBLE, 0.005
    stream = client(gateway).chat.completions.create(
        model="llama-3-8b-instruct", messages=[{"role": "user", "content": "x"}], stop=["<|end|>"],
        stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "Three, if they are small."
    assert ctl.cancelled(job(ctl).pred.id) is not None


def test_client_disconnect_mid_stream_cancels_the_prediction_within_a_second(gateway: str,
                                                                             ctl: EmulatorControl) -> None:
    ctl.reply, ctl.token_delay = BABBLE, 0.02
    stream = client(gateway).chat.completions.create(
        model="llama-3-8b-instruct", messages=[{"role": "user", "content": "x"}], stream=True)
    seen = 0
    for chunk in stream:
        seen += sum(1 for c in chunk.choices if c.delta.content)
        if seen >= 2:
            break
    stream.close()
    closed = time.monotonic()
    pred = job(ctl).pred
    at = wait_for_cancel(ctl, pred.id, 1.0)
    assert at is not None and at - closed < 1.0
    assert pred.status == "canceled" and len(pred.output) < len(job(ctl).tokens)


def test_a_cold_boot_longer_than_the_timeout_is_504_and_cancels(gateway: str, ctl: EmulatorControl) -> None:
    ctl.cold_boot = 3.0
    with pytest.raises(openai.APIStatusError) as err:
        client(gateway).chat.completions.create(
            model="llama-3-8b-instruct", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 504 and "cold boot" in err.value.message
    assert ctl.cancelled(job(ctl).pred.id) is not None


def test_processing_after_prefer_wait_is_polled_to_completion(gateway: str, ctl: EmulatorControl) -> None:
    ctl.sync_hold, ctl.token_delay = 0.05, 0.02
    r = client(gateway).chat.completions.create(
        model="llama-3-8b-instruct", messages=[{"role": "user", "content": "take your time"}])
    assert r.choices[0].message.content == "You said: take your time"
    assert job(ctl).gets >= 1 and ctl.cancellations == []


def test_a_failed_prediction_is_502_with_its_error_text(gateway: str, ctl: EmulatorControl) -> None:
    ctl.fail_prediction = "E1002 PromptTooLong: Prompt length (9000) exceeds maximum input length (8192)"
    with pytest.raises(openai.APIStatusError) as err:
        client(gateway).chat.completions.create(
            model="llama-3-8b-instruct", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 502
    assert "Prompt length (9000) exceeds maximum input length (8192)" in err.value.message


def test_throttling_is_429_with_retry_after(gateway: str, ctl: EmulatorControl) -> None:
    ctl.fail_create(429, retry_after="7")
    with pytest.raises(openai.RateLimitError) as err:
        client(gateway).chat.completions.create(
            model="llama-3-8b-instruct", messages=[{"role": "user", "content": "x"}])
    assert err.value.response.headers["retry-after"] == "7"


def test_input_refused_by_replicate_is_400_with_its_detail(gateway: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(gateway).completions.create(model="llama-3-8b", prompt="x", extra_body={"signal": 1})
    assert "Additional property signal is not allowed" in err.value.message


def test_a_refused_replicate_token_is_a_502_gateway_credential_problem(gateway: str) -> None:
    with pytest.raises(openai.APIStatusError) as err:
        client(gateway).completions.create(model="misconfigured", prompt="x")
    assert err.value.status_code == 502 and "credential" in err.value.message
    assert "r8_not_the_token" not in err.value.message


def test_the_example_config_has_both_llama3_models_on_replicate() -> None:
    cfg = load_config(Path(ROOT, "config/replicate.example.yaml"),
                      env={"REPLICATE_API_TOKEN": "r8_x", "ALICE_KEY": "sk-a"})
    models = {b.model for b in cfg.backends.values() if b.__struct_config__.tag == "replicate"}
    assert models == {"meta/meta-llama-3-8b-instruct", "meta/meta-llama-3-8b"}


def test_tools_are_refused_with_a_400_not_dropped(gateway: str, ctl: EmulatorControl) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError) as err:
        client(gateway).chat.completions.create(
            model="llama-3-8b-instruct", messages=[{"role": "user", "content": "hi"}], tools=tools)
    assert "function calling" in err.value.message
    assert not ctl.jobs  # nothing was sent to Replicate
    r = client(gateway).chat.completions.create(  # tool_choice "none": the tools are not needed
        model="llama-3-8b-instruct", messages=[{"role": "user", "content": "hi"}], tools=tools,
        tool_choice="none")
    assert r.choices[0].message.content == "You said: hi"


def test_a_deployment_is_called_on_its_own_path_whole_and_streamed(gateway: str, ctl: EmulatorControl) -> None:
    r = client(gateway).chat.completions.create(
        model="llama-prod", messages=[{"role": "user", "content": "hello deployment"}])
    assert r.choices[0].message.content == "You said: hello deployment"
    stream = client(gateway).chat.completions.create(
        model="llama-prod", messages=[{"role": "user", "content": "and streamed"}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "You said: and streamed"
    assert [c.path for c in ctl.creates] == ["/v1/deployments/acme/llama-prod/predictions"] * 2
    assert all("version" not in c.body for c in ctl.creates)
