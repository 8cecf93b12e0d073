"""Processes the benchmark starts, and what it measures about them from /proc.

`Server` runs a command in its own session and stops the whole group; `rss_mb` and `cpu_s`
add up a process tree; `Sampler` tracks a tree's peak RSS while a run goes on.

Adapted from ../shared/bench/bench.py (the project's reference harness).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from pathlib import Path
from urllib.parse import urlsplit

CLK_TCK = os.sysconf("SC_CLK_TCK")


class Server:
    """A server process in its own session; stop() signals the whole group."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path,
                 env: dict[str, str] | None = None, cpus: str | None = None) -> None:
        if cpus:
            argv = ["taskset", "-c", cpus, *argv]
        self.name, self.log = name, open(log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            if not self.alive():
                break
            try:
                os.killpg(self.pid, sig)  # the group id is our child's pid
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        # Anything the server left in its group (a helper it double-forked) goes too.
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self.log.close()


def tree(root: int) -> list[int]:
    """Pids of root and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def rss_mb(root: int) -> float:
    total = 0
    for pid in tree(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return round(total / 1024, 1)


def cpu_s(root: int) -> float:
    """utime + stime of a process tree, in seconds."""
    total = 0
    for pid in tree(root):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK_TCK


def system_busy_s() -> float:
    """CPU seconds spent busy (not idle, not waiting for I/O) on all cpus since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


class Sampler(threading.Thread):
    """Tracks the peak RSS of a process tree while a measurement runs."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.peak = pid, every, 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            self.done.wait(self.every)

    def stop(self) -> float:
        self.done.set()
        self.join()
        return max(self.peak, rss_mb(self.pid))


def port_in_use(url: str) -> bool:
    u = urlsplit(url)
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((u.hostname or "127.0.0.1", u.port or 80)) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_cpus(spec: str) -> set[int]:
    """'0-2,5' -> {0, 1, 2, 5} (taskset -c syntax)."""
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus
