"""Test plumbing: a private redis-server, gateway processes, free ports, waiting for URLs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


class RedisServer:
    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError(
                "redis-server not found: install it (Debian/Ubuntu: apt-get install redis-server; "
                "macOS: brew install redis)"
            )
        self.exe = exe
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="gw-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def flushall(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"FLUSHALL\r\n")
            s.recv(16)


@contextmanager
def gateway_process(config_path: Path, port: int | None = None, env: dict[str, str] | None = None,
                    workers: int = 1, log_path: Path | None = None) -> Iterator[str]:
    """`llm-gateway serve` in a child process; yields its base URL."""
    port = port or free_port()
    log = open(log_path or os.devnull, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config_path),
         "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
        cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url + "/healthz", proc=proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextmanager
def start_gateway(config_text: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """The gateway app from a YAML text, served by uvicorn in a thread on loopback; yields its URL.

    Use `gateway_process` instead when a test needs a separate OS process (two gateways
    sharing one Redis, killing a process)."""
    from adapters.loopback import LoopbackServer
    from gateway.app import create_app
    from gateway.config import parse_config

    config = parse_config(config_text, "<test>", env=env if env is not None else {})
    server = LoopbackServer(create_app(config)).start()
    try:
        yield server.url
    finally:
        server.stop()


def write_config(tmp_dir: Path, text: str, name: str = "gateway.yaml") -> Path:
    path = Path(tmp_dir) / name
    path.write_text(text)
    return path


class EmulatedUpstream:
    """An OpenAI-compatible emulator on loopback with its fault-injection control."""

    def __init__(self) -> None:
        from adapters.loopback import LoopbackServer
        from adapters.openai.emulator import EmulatorControl, create_emulator

        self.ctl = EmulatorControl()
        self.server = LoopbackServer(create_emulator(self.ctl)).start()

    @property
    def base(self) -> str:
        return self.server.url + "/v1"
