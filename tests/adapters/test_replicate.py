"""The Replicate adapter against the Replicate emulator, over loopback HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import msgspec
import pytest

from adapters.base import AdapterContext
from adapters.loopback import LoopbackServer
from adapters.replicate import Backend, ReplicateAdapter, build
from adapters.replicate.emulator import DEFAULT_TOKEN, EmulatorControl, create_emulator, version_id
from adapters.types import (
    ChatChunk,
    ChatRequest,
    Message,
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamTimeout,
)
from gateway.store import open_store

INSTRUCT = "meta/meta-llama-3-8b-instruct"
BASE = "meta/meta-llama-3-8b"
T = TypeVar("T")

LLAMA3_CHAT = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant."
    "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
SEED_INPUT = {
    "prompt": "<|user|>\nHow many llamas can you fit in a car?<|end|>\n<|assistant|>",
    "length_penalty": 1, "presence_penalty": 1.15, "prompt_template": "{prompt}",
    "max_tokens": 512, "min_tokens": 0, "temperature": 0.6, "top_p": 0.9,
    "log_performance_metrics": False,
}
BABBLE = "Three, if they are small.<|end|>" + " and then the llama said hello" * 40


@pytest.fixture(scope="module")
def emulator() -> Iterator[tuple[str, EmulatorControl]]:
    app = create_emulator(token_delay=0.002)
    with LoopbackServer(app) as server:
        yield server.url, app.control


@pytest.fixture(autouse=True)
def _reset(emulator: tuple[str, EmulatorControl]) -> None:
    emulator[1].reset()


@pytest.fixture
def url(emulator: tuple[str, EmulatorControl]) -> str:
    return emulator[0]


@pytest.fixture
def ctl(emulator: tuple[str, EmulatorControl]) -> EmulatorControl:
    return emulator[1]


def backend(url: str, **over: Any) -> Backend:
    raw: dict[str, Any] = {"kind": "replicate", "api_token": DEFAULT_TOKEN, "model": INSTRUCT,
                           "base_url": url, "wait_seconds": 5}
    raw.update(over)
    return msgspec.convert(raw, Backend)


def run(url: str, body: Callable[[ReplicateAdapter], Awaitable[T]], **over: Any) -> T:
    """Build an adapter, run `body` with it in a fresh event loop, close it."""
    async def main() -> T:
        adapter = build(backend(url, **over), AdapterContext("rep", open_store("memory://")))
        try:
            return await body(adapter)
        finally:
            await adapter.aclose()
    return asyncio.run(main())


def chat(*turns: tuple[str, str], **kw: Any) -> ChatRequest:
    return ChatRequest(model=INSTRUCT, messages=[Message(r, c) for r, c in turns], **kw)


async def collect(adapter: ReplicateAdapter, req: ChatRequest) -> list[ChatChunk]:
    return [c async for c in adapter.stream(req)]


def only_prediction(ctl: EmulatorControl) -> Any:
    assert len(ctl.jobs) == 1, f"expected one prediction, saw {len(ctl.jobs)}"
    return next(iter(ctl.jobs.values()))


# -- what is sent ---------------------------------------------------------------------------

def test_chat_prompt_is_the_exact_llama3_template_with_a_raw_prompt_template(url: str,
                                                                             ctl: EmulatorControl) -> None:
    req = chat(("system", "You are a helpful assistant."), ("user", "What is 2+2?"),
               ("assistant", "4."), ("user", "And 3+3?"))
    result = run(url, lambda a: a.complete(req))
    sent = ctl.inputs[-1]
    assert sent["prompt"] == LLAMA3_CHAT
    assert sent["prompt_template"] == "{prompt}"
    assert sent["stop_sequences"] == "<|eot_id|>,<|end_of_text|>"
    assert result.text == "You said: And 3+3?"
    assert ctl.creates[-1].path == f"/v1/models/{INSTRUCT}/predictions"


def test_completion_sends_the_seed_input_object_unchanged(url: str, ctl: EmulatorControl) -> None:
    known = ("prompt", "max_tokens", "temperature", "top_p", "presence_penalty")
    req = ChatRequest(model=BASE, **{k: SEED_INPUT[k] for k in known},
                      extra={k: v for k, v in SEED_INPUT.items() if k not in known})
    run(url, lambda a: a.complete(req), model=BASE)
    assert ctl.inputs[-1] == SEED_INPUT
    assert ctl.creates[-1].body == {"input": SEED_INPUT}  # no `version`, no `stream` on this route


def test_input_defaults_go_under_the_clients_own_values(url: str, ctl: EmulatorControl) -> None:
    req = ChatRequest(model=BASE, prompt="Once", temperature=0.2, extra={"top_k": 7})
    run(url, lambda a: a.complete(req), model=BASE,
        input_defaults={"presence_penalty": 1.15, "temperature": 0.6, "top_k": 50})
    assert ctl.inputs[-1] == {"prompt": "Once", "presence_penalty": 1.15, "temperature": 0.2, "top_k": 7}


def test_version_backend_creates_through_predictions_with_the_version(url: str, ctl: EmulatorControl) -> None:
    version = f"{BASE}:{version_id(BASE)}"
    result = run(url, lambda a: a.complete(ChatRequest(model=BASE, prompt="hi there")),
                 model=None, version=version)
    assert ctl.creates[-1].path == "/v1/predictions"
    assert ctl.creates[-1].body["version"] == version
    assert result.text == "You said: hi there"


def test_the_token_goes_in_a_bearer_header_and_never_to_the_stream_url(url: str, ctl: EmulatorControl) -> None:
    run(url, lambda a: collect(a, chat(("user", "x"))))
    assert ctl.stream_requests and "authorization" not in ctl.stream_requests[-1]
    assert ctl.stream_requests[-1]["accept"] == "text/event-stream"


# -- answers --------------------------------------------------------------------------------

def test_non_streaming_chat_joins_the_output_and_reports_usage_from_metrics(url: str,
                                                                            ctl: EmulatorControl) -> None:
    result = run(url, lambda a: a.complete(chat(("user", "hello replicate"))), lifetime=600)
    job = only_prediction(ctl)
    assert result.text == "You said: hello replicate"
    assert result.id == job.pred.id and result.finish_reason == "stop"
    assert job.pred.metrics.output_token_count == len(job.pred.output) > 1
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.source) == (
        job.pred.metrics.input_token_count, job.pred.metrics.output_token_count, "reported")
    assert (ctl.creates[-1].prefer, ctl.creates[-1].cancel_after) == ("wait=5", "600s")


def test_streaming_forwards_each_piece_as_it_arrives_then_usage(url: str, ctl: EmulatorControl) -> None:
    ctl.token_delay = 0.02

    async def body(a: ReplicateAdapter) -> tuple[list[ChatChunk], list[float]]:
        chunks, times = [], []
        async for c in a.stream(chat(("user", "one two three four five"))):
            chunks.append(c)
            times.append(time.monotonic())
        return chunks, times

    chunks, times = run(url, body)
    job = only_prediction(ctl)
    texts = [c.text for c in chunks if c.text]
    assert "".join(texts) == "You said: one two three four five"
    assert texts == job.pred.output  # one chunk per output event: nothing buffered
    assert times[-1] - times[0] > 0.02 * (len(texts) - 2)  # pieces arrived over time
    last = chunks[-1]
    assert last.finish_reason == "stop" and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.source) == (
        job.pred.metrics.input_token_count, len(texts), "reported")
    assert ctl.creates[-1].prefer is None and ctl.creates[-1].body["stream"] is True
    assert ctl.cancellations == []


def test_usage_is_estimated_when_metrics_carry_no_token_counts(url: str, ctl: EmulatorControl) -> None:
    ctl.report_token_counts = False
    result = run(url, lambda a: a.complete(chat(("user", "count me"))))
    chunks = run(url, lambda a: collect(a, chat(("user", "count me"))))
    assert result.usage.source == "estimated" and result.usage.prompt_tokens > 0
    assert result.usage.completion_tokens == len(tokens_of(ctl, 0))
    assert chunks[-1].usage is not None and chunks[-1].usage.source == "estimated"


def tokens_of(ctl: EmulatorControl, n: int) -> list[str]:
    return list(ctl.jobs.values())[n].pred.output


def test_finish_reason_is_length_when_max_tokens_is_used_up(url: str) -> None:
    result = run(url, lambda a: a.complete(chat(("user", "a long enough question"), max_tokens=3)))
    assert result.finish_reason == "length" and result.usage.completion_tokens == 3


# -- stop sequences -------------------------------------------------------------------------

def test_stop_sequence_cuts_a_non_streaming_answer_and_cancels_the_prediction(url: str,
                                                                              ctl: EmulatorControl) -> None:
    ctl.reply, ctl.token_delay = BABBLE, 0.005
    req = ChatRequest(model=BASE, prompt=SEED_INPUT["prompt"], stop=["<|end|>"])
    result = run(url, lambda a: a.complete(req), model=BASE)
    job = only_prediction(ctl)
    assert result.text == "Three, if they are small."
    assert result.finish_reason == "stop"
    assert ctl.cancelled(job.pred.id) is not None and job.pred.status == "canceled"
    assert len(job.pred.output) < len(job.tokens) / 2  # cancelled as the stop appeared
    assert ctl.creates[-1].prefer is None  # read as a stream, not waited for
    assert ctl.inputs[-1]["stop_sequences"] == "<|end|>"
    assert result.usage.source == "estimated" and result.usage.completion_tokens >= 8


def test_stop_sequence_split_across_pieces_never_reaches_the_stream(url: str, ctl: EmulatorControl) -> None:
    ctl.reply = "alpha beta STOPHERE gamma delta epsilon zeta"
    chunks = run(url, lambda a: collect(a, chat(("user", "x"), stop=["STOPHERE", "a,b"])))
    text = "".join(c.text for c in chunks)
    assert text == "alpha beta "
    assert chunks[-1].finish_reason == "stop"
    assert ctl.cancelled(only_prediction(ctl).pred.id) is not None
    # a stop with a comma cannot travel in stop_sequences; it is still cut locally
    assert ctl.inputs[-1]["stop_sequences"] == "<|eot_id|>,<|end_of_text|>,STOPHERE"


# -- cancel on early end --------------------------------------------------------------------

def test_closing_the_stream_early_cancels_the_prediction_within_a_second(url: str,
                                                                          ctl: EmulatorControl) -> None:
    ctl.reply, ctl.token_delay = BABBLE, 0.01

    async def body(a: ReplicateAdapter) -> float:
        gen = a.stream(chat(("user", "x")))
        await anext(gen)
        await anext(gen)
        closed = time.monotonic()
        await gen.aclose()  # type: ignore[attr-defined]
        return closed

    closed = run(url, body)
    job = only_prediction(ctl)
    deadline = time.monotonic() + 1
    while ctl.cancelled(job.pred.id) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    at = ctl.cancelled(job.pred.id)
    assert at is not None and at - closed < 1.0
    assert job.pred.status == "canceled"


def test_a_timeout_around_complete_cancels_the_prediction(url: str, ctl: EmulatorControl) -> None:
    ctl.reply, ctl.token_delay, ctl.sync_hold = BABBLE, 0.01, 0.05

    async def body(a: ReplicateAdapter) -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await a.complete(chat(("user", "x")))

    run(url, body)
    assert ctl.cancelled(only_prediction(ctl).pred.id) is not None


def test_cold_boot_longer_than_the_timeout_is_504_and_cancels(url: str, ctl: EmulatorControl) -> None:
    ctl.cold_boot = 3.0
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as err:
        run(url, lambda a: a.complete(chat(("user", "x"))), timeout={"cold_boot": 0.3})
    assert time.monotonic() - started < 1.0  # no Prefer: wait hold longer than the cold-boot bound
    assert ctl.creates[-1].prefer is None
    assert err.value.status == 504 and "cold boot" in err.value.message
    job = only_prediction(ctl)
    assert ctl.cancelled(job.pred.id) is not None and job.pred.status == "canceled"


def test_cold_boot_longer_than_the_timeout_while_streaming_is_504_and_cancels(url: str,
                                                                             ctl: EmulatorControl) -> None:
    ctl.cold_boot = 3.0
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as err:
        run(url, lambda a: collect(a, chat(("user", "x"))), timeout={"cold_boot": 0.3})
    assert 0.3 <= time.monotonic() - started < 1.5
    assert "cold boot" in err.value.message
    assert ctl.cancelled(only_prediction(ctl).pred.id) is not None


def test_a_booted_model_slow_to_its_first_token_is_not_a_cold_boot_timeout(url: str,
                                                                           ctl: EmulatorControl) -> None:
    # booted at 0.1 s, first token at 1.0 s: the cold-boot deadline (0.6 s) falls in between,
    # with margins wide enough for a loaded CI machine
    ctl.cold_boot, ctl.token_delay, ctl.reply = 0.1, 0.9, "Fine."
    chunks = run(url, lambda a: collect(a, chat(("user", "ok"))),
                 timeout={"cold_boot": 0.6, "generation": 5})
    assert "".join(c.text for c in chunks) == "Fine."
    assert only_prediction(ctl).gets >= 2  # the status check at the cold-boot deadline, then metrics
    assert ctl.cancellations == []


def test_generation_longer_than_its_timeout_is_504_and_cancels(url: str, ctl: EmulatorControl) -> None:
    ctl.reply, ctl.token_delay = BABBLE, 0.02
    with pytest.raises(UpstreamTimeout) as err:
        run(url, lambda a: collect(a, chat(("user", "x"))), timeout={"generation": 0.3})
    assert "generating" in err.value.message
    assert ctl.cancelled(only_prediction(ctl).pred.id) is not None


def test_processing_after_prefer_wait_is_polled_to_completion(url: str, ctl: EmulatorControl) -> None:
    ctl.sync_hold, ctl.token_delay = 0.05, 0.02  # answers `processing` with partial output
    result = run(url, lambda a: a.complete(chat(("user", "poll me until I am done"))))
    job = only_prediction(ctl)
    assert result.text == "You said: poll me until I am done"
    assert job.gets >= 1
    assert result.usage.source == "reported"
    assert ctl.cancellations == []


# -- failures -------------------------------------------------------------------------------

def test_a_failed_prediction_is_502_with_its_error_text(url: str, ctl: EmulatorControl) -> None:
    ctl.fail_prediction = "E2101 TritonTimeout: Triton timed out after 120s"
    with pytest.raises(UpstreamError) as err:
        run(url, lambda a: a.complete(chat(("user", "x"))))
    assert err.value.status == 502 and "E2101 TritonTimeout: Triton timed out after 120s" in err.value.message
    ctl.fail_after_tokens = 2
    with pytest.raises(UpstreamError) as err:
        run(url, lambda a: collect(a, chat(("user", "x"))))
    assert err.value.status == 502 and "Triton timed out" in err.value.message


def test_a_prompt_error_of_the_runtime_fails_the_prediction(url: str) -> None:
    req = ChatRequest(model=BASE, prompt="x", extra={"prompt_template": "no placeholder"})
    with pytest.raises(UpstreamError) as err:
        run(url, lambda a: a.complete(req), model=BASE)
    assert "E1003" in err.value.message and not err.value.retryable


def test_429_on_create_is_rate_limited_with_retry_after(url: str, ctl: EmulatorControl) -> None:
    ctl.fail_create(429, retry_after="7")
    with pytest.raises(UpstreamRateLimited) as err:
        run(url, lambda a: a.complete(chat(("user", "x"))))
    assert (err.value.status, err.value.retryable, err.value.retry_after) == (429, True, 7.0)
    assert ctl.jobs == {}


def test_5xx_on_create_is_retryable_unavailable(url: str, ctl: EmulatorControl) -> None:
    ctl.fail_create(503)
    with pytest.raises(UpstreamError) as err:
        run(url, lambda a: collect(a, chat(("user", "x"))))
    assert err.value.status == 502 and err.value.retryable


def test_a_refused_token_is_a_gateway_credential_error_that_never_shows_the_token(url: str) -> None:
    with pytest.raises(UpstreamAuthError) as err:
        run(url, lambda a: a.complete(chat(("user", "x"))), api_token="r8_wrong_secret_token")
    assert err.value.status == 502 and "credential" in err.value.message
    assert "r8_wrong_secret_token" not in repr(err.value) + str(err.value)
    assert "r8_wrong_secret_token" not in repr(backend(url, api_token="r8_wrong_secret_token"))


def test_an_unknown_model_is_502_naming_the_model(url: str) -> None:
    with pytest.raises(UpstreamError) as err:
        run(url, lambda a: a.complete(chat(("user", "x"))), model="meta/no-such-model")
    assert err.value.status == 502 and "meta/no-such-model" in err.value.message


def test_input_rejected_by_replicate_is_400_with_its_detail(url: str) -> None:
    req = chat(("user", "x"), extra={"signal": 1})
    with pytest.raises(UpstreamBadRequest) as err:
        run(url, lambda a: a.complete(req))
    assert err.value.status == 400 and "Additional property signal is not allowed" in err.value.message


def test_a_cut_stream_is_a_protocol_error_and_cancels(url: str, ctl: EmulatorControl) -> None:
    ctl.reply, ctl.cut_stream_after, ctl.token_delay = BABBLE, 3, 0.01
    with pytest.raises(UpstreamProtocolError):
        run(url, lambda a: collect(a, chat(("user", "x"))))
    assert ctl.cancelled(only_prediction(ctl).pred.id) is not None


def test_a_stream_cut_after_the_prediction_finished_still_delivers_everything(url: str,
                                                                              ctl: EmulatorControl) -> None:
    ctl.cut_stream_after, ctl.cold_boot = 2, 0.2

    async def body(a: ReplicateAdapter) -> str:
        gen = a.stream(chat(("user", "the whole answer please")))
        text = ""
        async for c in gen:
            text += c.text
        return text

    ctl.token_delay = 0.0  # finished before the stream connects: replay, then the cut
    assert run(url, body) == "You said: the whole answer please"


# -- configuration --------------------------------------------------------------------------

@pytest.mark.parametrize(("over", "message"), [
    ({"model": None}, "exactly one of model"),
    ({"version": f"{BASE}:{'a' * 64}"}, "exactly one of model"),
    ({"deployment": "acme/llama-prod"}, "exactly one of model"),
    ({"model": None, "deployment": "llama-prod"}, "deployment: expected owner/name"),
    ({"model": "llama"}, "owner/name"),
    ({"base_url": "https://api.replicate.com/v1"}, "without /v1"),
    ({"wait_seconds": 0}, "between 1 and 60"),
    ({"timeout": {"cold_bot": 1}}, "unknown field"),
])
def test_config_refuses_nonsense(over: dict[str, Any], message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        backend("http://127.0.0.1:1", **over)
