"""adapters/http1.py against scripted HTTP servers on 127.0.0.1 (real sockets, real parsing)."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from adapters import http1
from tests.support import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]


class Server:
    """A raw asyncio server whose per-connection behaviour is the test's `handler`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.open = 0
        self.requests: list[bytes] = []
        self.eof = asyncio.Event()  # some client connection ended
        self.port = 0

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        try:
            await self.handler(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            self.eof.set()
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        body = await reader.readexactly(length)
        self.requests.append(head + body)
        return body


def _ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
    while (body := await srv.read_request(reader)) is not None:
        writer.write(_ok(b"echo:" + body))


def test_keep_alive_reuses_one_connection_and_sends_the_configured_headers() -> None:
    async def main() -> None:
        async with Server(echo_forever) as srv:
            pool = http1.Pool(srv.base, headers={"authorization": "Bearer sk-up"})
            for i in range(5):
                status, headers, raw = await pool.request("POST", "/chat/completions", b"n%d" % i)
                assert (status, raw, headers["content-length"]) == (200, b"echo:n%d" % i, str(len(raw)))
            assert srv.connections == 1
            head = srv.requests[0].split(b"\r\n")
            assert head[0] == b"POST /v1/chat/completions HTTP/1.1"
            assert f"host: 127.0.0.1:{srv.port}".encode() in head and b"authorization: Bearer sk-up" in head
            await pool.aclose()

    asyncio.run(main())


def test_a_chunked_body_is_handed_over_as_it_arrives() -> None:
    got_first = asyncio.Event()

    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await asyncio.wait_for(got_first.wait(), 5)  # the rest only once the client saw the first
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await srv.read_request(reader)  # and the connection serves a second request
        writer.write(_ok(b"again"))
        await writer.drain()

    async def main() -> None:
        async with Server(chunked) as srv:
            pool = http1.Pool(srv.base)
            resp = await pool.send("POST", "/x", b"{}")
            assert await resp.read_some() == b"first"
            got_first.set()
            assert await resp.read_some() == b"second"
            assert await resp.read_some() == b"" and resp.at_eof
            assert (await pool.request("POST", "/x", b"{}"))[2] == b"again"
            assert srv.connections == 1

    asyncio.run(main())


def test_an_idle_connection_closed_by_the_server_is_replaced_without_sending_twice() -> None:
    async def one_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(_ok(b"ok"))  # keep-alive as far as the headers say, then gone
        await writer.drain()

    async def main() -> None:
        async with Server(one_then_close) as srv:
            pool = http1.Pool(srv.base)
            for _ in range(3):
                assert (await pool.request("POST", "/x", b"{}"))[2] == b"ok"
                await asyncio.sleep(0.02)  # the close reaches us while the connection is idle
            assert len(srv.requests) == 3 and srv.connections == 3

    asyncio.run(main())


def test_a_close_racing_our_write_resends_once_on_a_fresh_connection() -> None:
    async def serve_one_then_drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                  srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(_ok(b"ok"))
        await writer.drain()
        await reader.read(1)  # the next request arrives: hang up without reading it
        writer.transport.abort()

    async def main() -> None:
        async with Server(serve_one_then_drop) as srv:
            pool = http1.Pool(srv.base)
            for _ in range(3):
                assert (await pool.request("POST", "/x", b"{}"))[2] == b"ok"
            assert len(srv.requests) == 3 and srv.connections == 3

    asyncio.run(main())


def test_a_body_cut_short_is_an_error_and_the_connection_is_dropped() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
        await writer.drain()

    async def main() -> None:
        async with Server(cut) as srv:
            pool = http1.Pool(srv.base)
            with pytest.raises(http1.CutShort):
                await pool.request("POST", "/x", b"{}")
            assert pool._count == 0 and not pool._idle

    asyncio.run(main())


def test_a_silent_server_is_a_read_timeout_and_the_connection_is_closed() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)
        await reader.read()  # until the client goes

    async def main() -> None:
        async with Server(silent) as srv:
            pool = http1.Pool(srv.base, read_timeout=0.3)
            started = time.monotonic()
            with pytest.raises(http1.ReadTimeout):
                await pool.request("POST", "/x", b"{}")
            assert 0.25 < time.monotonic() - started < 2
            await asyncio.wait_for(srv.eof.wait(), 2)  # the server saw us hang up
            assert pool._count == 0

    asyncio.run(main())


def test_nothing_listening_is_connect_failed() -> None:
    async def main() -> None:
        pool = http1.Pool(f"http://127.0.0.1:{free_port()}")
        with pytest.raises(http1.ConnectFailed, match="ConnectionRefused"):
            await pool.request("POST", "/x", b"{}")
        assert pool._count == 0

    asyncio.run(main())


def test_a_response_left_early_closes_its_connection() -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while True:
            writer.write(b"4\r\ntick\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)

    async def main() -> None:
        async with Server(endless) as srv:
            pool = http1.Pool(srv.base)
            resp = await pool.send("POST", "/x", b"{}")
            assert (await resp.read_some()).startswith(b"tick")
            resp.release()
            await asyncio.wait_for(srv.eof.wait(), 2)
            assert pool._count == 0 and srv.open == 0

    asyncio.run(main())


def test_max_connections_makes_callers_wait_their_turn() -> None:
    async def slow_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        while (body := await srv.read_request(reader)) is not None:
            await asyncio.sleep(0.02)
            writer.write(_ok(body))

    async def main() -> None:
        async with Server(slow_echo) as srv:
            pool = http1.Pool(srv.base, max_connections=2)
            out = await asyncio.gather(*[pool.request("POST", "/x", b"%d" % i) for i in range(8)])
            assert [raw for _, _, raw in out] == [b"%d" % i for i in range(8)]
            assert srv.connections == 2

    asyncio.run(main())


def test_a_cancelled_caller_frees_its_connection() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)
        await reader.read()

    async def main() -> None:
        async with Server(silent) as srv:
            pool = http1.Pool(srv.base, max_connections=1)
            task = asyncio.ensure_future(pool.request("POST", "/x", b"{}"))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(srv.eof.wait(), 2)
            assert pool._count == 0
            srv.handler = echo_forever  # and the pool's one slot serves the next caller
            assert (await asyncio.wait_for(pool.request("POST", "/x", b"a"), 2))[2] == b"echo:a"

    asyncio.run(main())


def test_connection_close_from_the_server_is_honoured() -> None:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(_ok(b"bye", b"connection: close\r\n"))
        await writer.drain()
        await reader.read()

    async def main() -> None:
        async with Server(closing) as srv:
            pool = http1.Pool(srv.base)
            for _ in range(3):
                assert (await pool.request("POST", "/x", b"{}"))[2] == b"bye"
            assert srv.connections == 3 and pool._count == 0

    asyncio.run(main())


def test_https_verifies_the_certificate_against_the_trusted_roots(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)

    async def main() -> None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, key)
        srv = Server(echo_forever)
        srv.server = await asyncio.start_server(srv._serve, "127.0.0.1", 0, ssl=tls)
        port = srv.server.sockets[0].getsockname()[1]
        with pytest.raises(http1.ConnectFailed, match="SSLCertVerificationError"):  # not trusted yet
            await http1.Pool(f"https://localhost:{port}/v1").request("POST", "/x", b"{}")
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        pool = http1.Pool(f"https://localhost:{port}/v1")
        for i in range(3):
            assert (await pool.request("POST", "/x", b"%d" % i))[2] == b"echo:%d" % i
        assert srv.connections == 1  # one kept-alive connection (the refused handshake never was one)
        await pool.aclose()
        await asyncio.wait_for(srv.eof.wait(), 2)
        srv.server.close()

    asyncio.run(main())
