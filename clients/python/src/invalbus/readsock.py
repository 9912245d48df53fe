"""`ReadSocket`: the node's read socket (`read_listen = "unix:/path"`), the sidecar's Get and
GetMany in a minimal binary protocol (see `node/src/readsock.rs`), for reads faster than a
grpcio call. Same answers and reservations as `Client.get` / `Client.get_many`.

One connection per thread, opened lazily (and again after a fork or an error)."""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Sequence

from .client import Entry
from .errors import AuthError, InvalbusError, InvalidArgument, Unavailable

_LEN = struct.Struct("<I")
_HIT = struct.Struct("<QBQB")


class ReadSocket:
    """Reads through a node's read socket."""

    def __init__(self, address: str, *, token: str | None = None, cache: str = "default", timeout: float = 5.0) -> None:
        self.path = address.removeprefix("unix:")
        self.cache = cache
        self.timeout = timeout
        token = token if token is not None else os.environ.get("INVALBUS_TOKEN", "")
        self._hello = b"IBR1" + token.encode()
        cache_b = cache.encode()
        if len(cache_b) > 255:
            raise ValueError("cache name longer than 255 bytes")
        self._prefix = bytes([len(cache_b)]) + cache_b
        self._local = threading.local()

    def _conn(self) -> socket.socket:
        s: socket.socket | None = getattr(self._local, "sock", None)
        if s is not None and self._local.pid == os.getpid():
            return s
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
            s.sendall(_LEN.pack(len(self._hello)) + self._hello)
            answer = self._recv(s)
        except OSError as e:
            s.close()
            raise Unavailable(f"read socket {self.path}: {e}") from None
        if answer[:1] != b"\x00":
            s.close()
            raise AuthError(answer[1:].decode(errors="replace"))
        self._local.sock = s
        self._local.pid = os.getpid()
        return s

    @staticmethod
    def _recv_exact(s: socket.socket, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise ConnectionResetError("the node closed the read socket")
            buf += chunk
        return bytes(buf)

    def _recv(self, s: socket.socket) -> bytes:
        head = s.recv(65536)
        if len(head) < 4:
            head += self._recv_exact(s, 4 - len(head))
        (n,) = _LEN.unpack_from(head)
        body = head[4:]
        if len(body) < n:
            body += self._recv_exact(s, n - len(body))
        return body

    def _drop(self) -> None:
        s = getattr(self._local, "sock", None)
        self._local.sock = None
        if s is not None:
            s.close()

    def get_many(self, keys: Sequence[str], *, reserve: bool = False) -> list[Entry]:
        parts = [b"\x01\x01" if reserve else b"\x01\x00", self._prefix, struct.pack("<H", len(keys))]
        for k in keys:
            kb = k.encode()
            parts.append(struct.pack("<H", len(kb)))
            parts.append(kb)
        body = b"".join(parts)
        s = self._conn()
        try:
            s.sendall(_LEN.pack(len(body)) + body)
            answer = self._recv(s)
        except OSError as e:
            self._drop()
            raise Unavailable(f"read socket {self.path}: {e}") from None
        if answer[:1] == b"\xff":
            raise InvalidArgument(answer[1:].decode(errors="replace"))
        try:
            return self._entries(answer, len(keys))
        except (struct.error, IndexError, UnicodeDecodeError) as e:
            self._drop()
            raise InvalbusError(f"read socket: a malformed answer ({e})") from None

    def get(self, key: str, *, reserve: bool = False) -> Entry:
        return self.get_many([key], reserve=reserve)[0]

    @staticmethod
    def _entries(b: bytes, n: int) -> list[Entry]:
        out = []
        i = 1
        for _ in range(n):
            if b[i] == 0:
                rl = b[i + 1]
                out.append(Entry(False, reservation=b[i + 2 : i + 2 + rl].decode()))
                i += 2 + rl
                continue
            ttl_ms, has_version, version, ntags = _HIT.unpack_from(b, i + 1)
            i += 1 + _HIT.size
            tags = []
            for _ in range(ntags):
                (tl,) = struct.unpack_from("<H", b, i)
                tags.append(b[i + 2 : i + 2 + tl].decode())
                i += 2 + tl
            (vl,) = _LEN.unpack_from(b, i)
            value = b[i + 4 : i + 4 + vl]
            i += 4 + vl
            out.append(Entry(True, value, tuple(tags), version if has_version else None, ttl_ms))
        return out

    def close(self) -> None:
        self._drop()
