"""Test fixtures: real nats-server and invalbus-node processes on free ports, a TCP proxy that
can cut a node's NATS link, and waiting for conditions with a deadline (never fixed sleeps).

Also used by the coherence checker and the benchmark (`python -m tests.cluster` is not a thing:
import it with the tests directory on sys.path).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
TOKEN = "pytest-cache-token-0123456789"
#: Generous: the suite runs on a shared 2-core machine.
DEADLINE = 60.0
#: What the nodes log (to their node.log; a failed test's report shows the end of it): the
#: gate's changes, the stream follower's and the NATS client's connection events.
NODE_LOG = "warn,invalbus=info,invalbus::receiver=debug,invalbus::stream=debug,async_nats=info"
#: Clusters not closed yet, and the logs of nodes stopped since the current test began: what a
#: failed test's report shows (see `conftest.py`).
OPEN_CLUSTERS: list[Cluster] = []
STOPPED_LOGS: list[tuple[str, str]] = []


def node_bin() -> str:
    b = os.environ.get("INVALBUS_NODE_BIN") or str(REPO / "target" / "release" / "invalbus-node")
    if not Path(b).exists():
        raise RuntimeError(f"{b} not found: build it with `cargo build --release -p invalbus-node`")
    return b


def nats_bin() -> str:
    return os.environ.get("NATS_SERVER_BIN") or shutil.which("nats-server") or "/usr/sbin/nats-server"


def _port_range() -> range:
    """The widest stretch of ports above 10,000 outside the kernel's ephemeral range."""
    try:
        low, high = (int(p) for p in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2])
    except (OSError, ValueError):
        low, high = 32768, 60999
    below, above = range(10000, max(low, 10000)), range(max(high + 1, 10000), 65535)
    return below if len(below) >= len(above) else above


_PORTS = _port_range()
_next_port = random.randrange(len(_PORTS)) if _PORTS else 0


def free_port() -> int:
    """A loopback port that was free a moment ago.

    Taken below the ephemeral range, from a random point and then in turn, so that neither
    `bind(0)` nor the outgoing connections of the processes under test (whose local ports come
    from that range) can be handed it before the server binds it.
    """
    global _next_port
    for _ in range(len(_PORTS)):
        port = _PORTS[_next_port % len(_PORTS)]
        _next_port += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, cond: Callable[[], object], deadline: float = DEADLINE, every: float = 0.02) -> object:
    """Polls `cond` until it returns something truthy; fails the test after `deadline` seconds."""
    end = time.monotonic() + deadline
    last: BaseException | None = None
    while time.monotonic() < end:
        try:
            r = cond()
            if r:
                return r
        except Exception as e:
            last = e
        time.sleep(every)
    raise AssertionError(
        f"timed out after {deadline} s waiting for {what}" + (f" (last error: {last!r})" if last else "")
    )


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class NatsServer:
    """A nats-server on a free loopback port (JetStream on), in its own directory."""

    def __init__(self, workdir: Path, jetstream: bool = True) -> None:
        self.port = free_port()
        self.dir = workdir / f"nats-{self.port}"
        self.dir.mkdir(parents=True)
        args = [nats_bin(), "-a", "127.0.0.1", "-p", str(self.port)]
        if jetstream:
            args += ["-js", "-sd", str(self.dir / "js")]
        self.log = open(self.dir / "nats.log", "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for("nats-server to listen", lambda: _port_open(self.port))

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target port; `cut()` drops every connection and refuses new
    ones (a node's NATS link going dark), `heal()` lets them through again."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self._open = threading.Event()
        self._open.set()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if not self._open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for s in (client, upstream):
                # Relay small NATS messages at once (Nagle would hold them for the peer's ACK).
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data or not self._open.is_set():
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def cut(self) -> None:
        self._open.clear()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def heal(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self.sock.close()


class Node:
    """An `invalbus-node serve` process with a config file: one cache `default` (and any others),
    the test token, listening on a Unix socket (or TCP with `tcp=True`)."""

    def __init__(
        self,
        workdir: Path,
        nats_url: str,
        namespace: str,
        node_id: str,
        *,
        tcp: bool = False,
        jetstream: bool = True,
        ttl_secs: int = 300,
        caches: tuple[str, ...] = ("default",),
        extra_toml: str = "",
        max_staleness_ms: int | None = None,
    ) -> None:
        self.dir = workdir / node_id
        self.dir.mkdir(parents=True)
        self.node_id = node_id
        if tcp:
            self.port = free_port()
            self.address = f"127.0.0.1:{self.port}"
        else:
            self.address = f"unix:{self.dir / 'node.sock'}"
        self.read_address = f"unix:{self.dir / 'read.sock'}"
        cache_tables = "".join(
            f'\n[[caches]]\nname = "{c}"\nmax_entries = 100000\nttl_secs = {ttl_secs}\n' for c in caches
        )
        (self.dir / "node.toml").write_text(
            f'node_id = "{node_id}"\nnamespace = "{namespace}"\nlisten = "{self.address}"\n'
            f'read_listen = "{self.read_address}"\n'
            + (f"max_staleness_ms = {max_staleness_ms}\n" if max_staleness_ms is not None else "")
            + f'[nats]\nurl = "{nats_url}"\n[jetstream]\nenabled = {"true" if jetstream else "false"}\n'
            f'[[tokens]]\nname = "pytest"\ntoken = "{TOKEN}"\nroles = ["cache", "read", "purge"]\n'
            + cache_tables
            + extra_toml
        )
        self.log = open(self.dir / "node.log", "wb")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", NODE_LOG))
        self.proc = subprocess.Popen(
            [node_bin(), "serve", "--config", str(self.dir / "node.toml")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        wait_for(f"node {node_id} to serve", self._ready)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"node {self.node_id} exited: {self.log_text()[-2000:]}")
        from invalbus import Client

        c = Client(self.address, token=TOKEN, timeout=2.0)
        try:
            c.get("ready-probe")
            return True
        finally:
            c.close()

    def client(self, **kwargs: object) -> object:
        from invalbus import Client

        kwargs.setdefault("token", TOKEN)
        return Client(self.address, **kwargs)  # type: ignore[arg-type]

    def log_text(self) -> str:
        self.log.flush()
        return (self.dir / "node.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.log.closed:
            STOPPED_LOGS.append((self.node_id, self.log_text()))
        self.log.close()


class Cluster:
    """One nats-server and the nodes started on it; everything stops in `close()`."""

    def __init__(self, workdir: Path | None = None, jetstream: bool = True) -> None:
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="invalbus-py-")
        self.dir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.namespace = "py" + uuid.uuid4().hex[:8]
        self.jetstream = jetstream
        self.nats = NatsServer(self.dir, jetstream)
        self.nodes: list[Node] = []
        self.proxies: list[TcpProxy] = []
        OPEN_CLUSTERS.append(self)

    def node(self, node_id: str, *, via_proxy: bool = False, **kwargs: object) -> Node:
        url = self.nats.url
        if via_proxy:
            proxy = TcpProxy(self.nats.port)
            self.proxies.append(proxy)
            url = proxy.url
        n = Node(self.dir, url, self.namespace, node_id, jetstream=self.jetstream, **kwargs)  # type: ignore[arg-type]
        n.proxy = self.proxies[-1] if via_proxy else None  # type: ignore[attr-defined]
        self.nodes.append(n)
        return n

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self in OPEN_CLUSTERS:
            OPEN_CLUSTERS.remove(self)
        for n in self.nodes:
            n.stop()
        for p in self.proxies:
            p.close()
        self.nats.stop()
        if self._tmp is not None:
            self._tmp.cleanup()


def serves(node: Node) -> bool:
    """True when a read on `node` is served from its cache (its staleness gate is open)."""
    c = node.client()
    key = "serving-probe-" + uuid.uuid4().hex
    try:
        c.set(key, b"x")
        return bool(c.get(key).found)
    finally:
        c.close()


def peers_connected(a: Node, b: Node) -> bool:
    """True once an invalidation made through `a` reaches `b` (both joined the bus)."""
    ca, cb = a.client(), b.client()
    key = "peer-probe-" + uuid.uuid4().hex
    try:
        cb.set(key, b"x")
        ca.delete([key])
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            if not cb.get(key).found:
                return True
            time.sleep(0.01)
        return False
    finally:
        ca.close()
        cb.close()


@contextlib.contextmanager
def cluster(**kwargs: object) -> Iterator[Cluster]:
    c = Cluster(**kwargs)  # type: ignore[arg-type]
    try:
        yield c
    finally:
        c.close()
