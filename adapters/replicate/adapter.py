"""The Replicate adapter: Llama 3 predictions, streamed over SSE or waited for, never left running.

Non-streaming requests create the prediction with `Prefer: wait=N` and, when the answer is not
terminal yet, poll `urls.get` with backoff. Streaming requests (and non-streaming ones with stop
sequences, so the cancel comes as soon as the stop appears) read `urls.stream` and forward each
output piece as it arrives. Whatever ends a request early (a stop sequence, the consumer closing
the stream, a timeout, a cold boot that lasts too long, a cut stream) sends
`POST /v1/predictions/{id}/cancel`, once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import httpx
import msgspec

from adapters.base import AdapterContext
from adapters.replicate.config import ReplicateBackend
from adapters.replicate.errors import (
    error_from_status,
    prediction_canceled,
    prediction_failed,
    transport_error,
)
from adapters.replicate.prompt import to_replicate
from adapters.replicate.run import TIMED_OUT, ChunkReader, PredictionRun
from adapters.replicate.stops import StopCutter, cut_at_stop
from adapters.replicate.wire import (
    CreatePrediction,
    Prediction,
    done_reason,
    prediction_decoder,
    stream_error_detail,
)
from adapters.sse import SSEDecoder, SSEEvent
from adapters.types import (
    ChatChunk,
    ChatRequest,
    ChatResult,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)

log = logging.getLogger("adapters.replicate")
_encode = msgspec.json.Encoder().encode
_FIRST_POLL, _MAX_POLL, _MAX_POLL_FAILURES = 0.1, 2.0, 3
_CUT_GRACE = 1.0  # seconds a cut stream's prediction gets to reach a terminal status
_CANCEL_TIMEOUT = 5.0
_STREAM_HEADERS = {"accept": "text/event-stream", "cache-control": "no-store"}


class ReplicateAdapter:
    def __init__(self, cfg: ReplicateBackend, ctx: AdapterContext) -> None:
        self.name = ctx.name
        self.cfg = cfg
        t = cfg.timeout
        self._base = cfg.base_url.rstrip("/")
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=t.connect, read=t.read, write=t.read, pool=t.connect),
            limits=httpx.Limits(max_connections=cfg.max_connections,
                                max_keepalive_connections=cfg.max_connections),
        )
        self._stream_timeout = httpx.Timeout(connect=t.connect, read=None, write=t.read, pool=t.connect)
        self._auth = {"authorization": f"Bearer {cfg.api_token}"}
        if cfg.model is not None:
            self._create_url, self._version = f"{self._base}/v1/models/{cfg.model}/predictions", None
        elif cfg.deployment is not None:
            self._create_url, self._version = f"{self._base}/v1/deployments/{cfg.deployment}/predictions", None
        else:
            self._create_url, self._version = f"{self._base}/v1/predictions", cfg.version
        # A held create cannot be cancelled (its id is unknown until it answers), so the hold
        # never outlasts the cold-boot or generation bound (under a second: no hold, just polls).
        self._wait = min(cfg.wait_seconds, math.floor(min(t.cold_boot, t.generation)))
        self._cancels: set[asyncio.Task[Prediction | None]] = set()

    # -- the Adapter protocol -------------------------------------------------------------

    async def complete(self, req: ChatRequest) -> ChatResult:
        if req.stop:
            return await self._complete_streamed(req)
        run = await self._create(req, wait=True)
        try:
            pred = await self._until_terminal(run)
        finally:
            if not run.settled:
                await self._cancel_shielded(run)
        self._log_metrics(pred)
        if pred.status != "succeeded":
            raise self._terminal_error(pred)
        text = pred.text()
        return ChatResult(text=text, finish_reason=run.finish_reason(pred),
                          usage=run.usage(pred, text), id=pred.id, model=pred.model or "")

    async def stream(self, req: ChatRequest) -> AsyncIterator[ChatChunk]:
        run = await self._create(req, wait=False)
        async with aclosing(self._run_stream(run, req)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def aclose(self) -> None:
        if self._cancels:
            await asyncio.wait(set(self._cancels), timeout=_CANCEL_TIMEOUT)
        await self._client.aclose()

    # -- create, poll, cancel -------------------------------------------------------------

    async def _create(self, req: ChatRequest, *, wait: bool) -> PredictionRun:
        inp = to_replicate(req, self.cfg.input_defaults)
        body = _encode(CreatePrediction(input=inp, version=self._version, stream=not wait))
        headers = {**self._auth, "content-type": "application/json"}
        timeout: httpx.Timeout | None = None
        if wait and self._wait:
            headers["prefer"] = f"wait={self._wait}"
            t = self.cfg.timeout
            timeout = httpx.Timeout(connect=t.connect, read=self._wait + 5.0, write=t.read, pool=t.connect)
        if self.cfg.lifetime is not None:
            headers["cancel-after"] = f"{math.ceil(self.cfg.lifetime)}s"
        created = time.monotonic()
        try:
            resp = await self._client.post(self._create_url, content=body, headers=headers,
                                           timeout=timeout or httpx.USE_CLIENT_DEFAULT)
        except httpx.HTTPError as exc:
            raise transport_error(self.name, exc) from None
        if resp.status_code not in (200, 201):
            raise error_from_status(self.name, self.cfg.target, resp.status_code, resp.headers,
                                    resp.content, creating=True)
        return PredictionRun(self._decode(resp.content), inp, created)

    async def _until_terminal(self, run: PredictionRun) -> Prediction:
        t = self.cfg.timeout
        delay, failures = _FIRST_POLL, 0
        while not run.pred.terminal:
            deadline, phase = run.deadline(t.cold_boot, t.generation)
            now = time.monotonic()
            if now >= deadline:
                raise self._timeout(run, phase)
            await asyncio.sleep(min(delay, deadline - now))
            delay = min(delay * 1.5, _MAX_POLL)
            try:
                pred = await self._get(run)
            except UpstreamError as exc:
                failures += 1
                if not exc.retryable or failures >= _MAX_POLL_FAILURES:
                    raise
                delay = max(delay, exc.retry_after or 0.0)
                continue
            failures = 0
            run.saw(pred)
        return run.pred

    async def _get(self, run: PredictionRun) -> Prediction:
        url = self._api_url(run.pred.urls.get, f"/v1/predictions/{run.pred.id}")
        try:
            resp = await self._client.get(url, headers=self._auth)
        except httpx.HTTPError as exc:
            raise transport_error(self.name, exc) from None
        if resp.status_code != 200:
            raise error_from_status(self.name, self.cfg.target, resp.status_code, resp.headers,
                                    resp.content, creating=False)
        return self._decode(resp.content)

    async def _final_state(self, run: PredictionRun) -> Prediction | None:
        """The terminal prediction (for its metrics) after a stream's `done`; None if unreadable."""
        try:
            pred = await self._get(run)
        except UpstreamError as exc:
            log.warning("backend %s: no metrics for prediction %s: %s", self.name, run.pred.id, exc.message)
            return None
        run.saw(pred)
        self._log_metrics(pred)
        return pred

    async def _cancel(self, run: PredictionRun) -> Prediction | None:
        run.settled = True
        pid = run.pred.id
        url = self._api_url(run.pred.urls.cancel, f"/v1/predictions/{pid}/cancel")
        try:
            resp = await self._client.post(url, headers=self._auth, timeout=_CANCEL_TIMEOUT)
        except httpx.HTTPError as exc:
            log.warning("backend %s: cancel of prediction %s failed: %s", self.name, pid, type(exc).__name__)
            return None
        if resp.status_code != 200:
            log.warning("backend %s: cancel of prediction %s answered HTTP %s", self.name, pid,
                        resp.status_code)
            return None
        log.info("backend %s: canceled prediction %s", self.name, pid)
        try:
            return prediction_decoder.decode(resp.content)
        except msgspec.DecodeError:
            return None

    async def _cancel_shielded(self, run: PredictionRun) -> Prediction | None:
        """Cancel in a task of its own, so that it completes even when the caller's task is
        being cancelled (client gone, gateway timeout)."""
        task = asyncio.get_running_loop().create_task(self._cancel(run))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)
        return await asyncio.shield(task)

    # -- streaming ------------------------------------------------------------------------

    async def _complete_streamed(self, req: ChatRequest) -> ChatResult:
        run = await self._create(req, wait=False)
        parts: list[str] = []
        last = ChatChunk()
        async with aclosing(self._run_stream(run, req)) as chunks:
            async for chunk in chunks:
                parts.append(chunk.text)
                last = chunk
        text = "".join(parts)
        return ChatResult(text=text, finish_reason=last.finish_reason or "stop",
                          usage=last.usage or run.usage(None, text), id=run.pred.id,
                          model=run.pred.model or "")

    async def _run_stream(self, run: PredictionRun, req: ChatRequest) -> AsyncIterator[ChatChunk]:
        try:
            if not run.pred.urls.stream:
                async for chunk in self._unstreamed(run, req):
                    yield chunk
                return
            cutter = StopCutter(req.stop or ())
            received: list[str] = []
            outcome, error = "", None
            async with self._client.stream("GET", run.pred.urls.stream, headers=_STREAM_HEADERS,
                                           timeout=self._stream_timeout) as resp:
                if resp.status_code != 200:
                    raise error_from_status(self.name, self.cfg.target, resp.status_code, resp.headers,
                                            await resp.aread(), creating=False)
                if not resp.headers.get("content-type", "").startswith("text/event-stream"):
                    raise UpstreamProtocolError(f"backend {self.name}: Replicate stream is not SSE")
                async with aclosing(self._events(run, resp)) as events:
                    async for ev in events:
                        if ev.event == "output":
                            run.pieces += 1
                            received.append(ev.data)
                            text = cutter.feed(ev.data)
                            if text:
                                yield ChatChunk(text=text)
                            if cutter.hit:
                                final = await self._cancel_shielded(run)
                                yield ChatChunk(finish_reason="stop", usage=run.usage(final, ""))
                                return
                        elif ev.event == "error":
                            error = stream_error_detail(ev.data)
                        elif ev.event == "done":
                            outcome = done_reason(ev.data)
                            break
            if outcome == "":  # the stream ended without `done`
                rest = await self._rest_after_cut(run, "".join(received))
                text = cutter.feed(rest)
                if text:
                    yield ChatChunk(text=text)
            elif outcome == "canceled":
                run.settled = True
                raise prediction_canceled(self.name, run.pred.id)
            elif outcome != "succeeded":
                run.settled = True
                raise prediction_failed(self.name, run.pred.id, error)
            run.settled = True
            tail = cutter.flush()
            if tail:
                yield ChatChunk(text=tail)
            final = await self._final_state(run)
            reason = "stop" if cutter.hit else run.finish_reason(final)
            yield ChatChunk(finish_reason=reason, usage=run.usage(final, ""))
        except httpx.HTTPError as exc:
            raise transport_error(self.name, exc) from None
        finally:
            if not run.settled:
                await self._cancel_shielded(run)

    async def _events(self, run: PredictionRun, resp: httpx.Response) -> AsyncIterator[SSEEvent]:
        """SSE events, bounded by the cold-boot, generation and idle (`timeout.read`) limits."""
        t = self.cfg.timeout
        reader, decoder = ChunkReader(resp), SSEDecoder()
        try:
            while True:
                deadline, phase = run.deadline(t.cold_boot, t.generation)
                wait = deadline - time.monotonic()
                idle = phase == "generation" and t.read < wait
                chunk = await reader.next(t.read if idle else wait)
                if chunk is TIMED_OUT:
                    if idle:
                        raise UpstreamTimeout(f"backend {self.name}: Replicate sent nothing for "
                                              f"{t.read:g}s (prediction {run.pred.id})")
                    if phase == "generation":
                        raise self._timeout(run, phase)
                    run.saw(await self._get(run))  # cold-boot deadline: is it still starting?
                    if run.pred.status == "starting":
                        raise self._timeout(run, phase)
                    continue  # booted: keep reading, now under the generation bound
                if chunk is None:
                    return
                assert isinstance(chunk, bytes)
                for ev in decoder.feed(chunk):
                    if ev.event == "output" and run.processing_since is None:
                        run.processing_since = time.monotonic()
                    yield ev
        finally:
            reader.close()

    async def _rest_after_cut(self, run: PredictionRun, received: str) -> str:
        """The stream was cut: if the prediction succeeded anyway, the output not yet seen.

        A prediction that is still running gets a short grace to finish (a cut just before
        `done` is common: the output is complete, the status not yet); one still running after
        it is a protocol error, and the caller cancels it."""
        pred = await self._get(run)
        run.saw(pred)
        grace, delay = time.monotonic() + _CUT_GRACE, _FIRST_POLL
        while not pred.terminal and time.monotonic() < grace:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
            pred = await self._get(run)
            run.saw(pred)
        if pred.status == "succeeded":
            full = pred.text()
            return full[len(received):] if full.startswith(received) else ""
        if pred.terminal:
            raise self._terminal_error(pred)
        raise UpstreamProtocolError(f"backend {self.name}: Replicate stream for prediction {pred.id} "
                                    "ended before `done`")

    async def _unstreamed(self, run: PredictionRun, req: ChatRequest) -> AsyncIterator[ChatChunk]:
        """A model without `urls.stream`: wait for the whole output, then send it as one piece."""
        pred = await self._until_terminal(run)
        self._log_metrics(pred)
        if pred.status != "succeeded":
            raise self._terminal_error(pred)
        text, hit = cut_at_stop(pred.text(), req.stop or ())
        if text:
            yield ChatChunk(text=text)
        yield ChatChunk(finish_reason="stop" if hit else run.finish_reason(pred),
                        usage=run.usage(pred, text))

    # -- small helpers --------------------------------------------------------------------

    def _api_url(self, url: str | None, path: str) -> str:
        # The token goes only to the configured API root, whatever URL a body names.
        if url and url.startswith(self._base + "/"):
            return url
        return self._base + path

    def _decode(self, raw: bytes) -> Prediction:
        try:
            return prediction_decoder.decode(raw)
        except msgspec.DecodeError:
            raise UpstreamProtocolError(f"backend {self.name}: Replicate sent an unreadable prediction") \
                from None

    def _timeout(self, run: PredictionRun, phase: str) -> UpstreamTimeout:
        t = self.cfg.timeout
        if phase == "cold_boot":
            what = f"was still starting (cold boot) after {t.cold_boot:g}s"
        else:
            what = f"did not finish generating within {t.generation:g}s"
        return UpstreamTimeout(f"backend {self.name}: Replicate model {self.cfg.target} {what}; "
                               f"prediction {run.pred.id} canceled")

    def _terminal_error(self, pred: Prediction) -> UpstreamError:
        if pred.status == "failed":
            return prediction_failed(self.name, pred.id, pred.error)
        return prediction_canceled(self.name, pred.id)

    def _log_metrics(self, pred: Prediction) -> None:
        m = pred.metrics
        if m is not None:
            log.info("backend %s: prediction %s %s predict_time=%s time_to_first_token=%s",
                     self.name, pred.id, pred.status, m.predict_time, m.time_to_first_token)


def build(cfg: ReplicateBackend, ctx: AdapterContext) -> ReplicateAdapter:
    return ReplicateAdapter(cfg, ctx)
