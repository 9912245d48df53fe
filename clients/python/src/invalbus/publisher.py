"""Publishing invalidations straight onto NATS, for a Python process that runs no node (a cron
job, a migration script): batches of `invalbus.wire.v1.InvalidationBatch` (the generated
`wire_pb2` classes) over nats-py. Needs the `nats` extra: `pip install "invalbus[nats]"`.

Every node of the namespace applies a batch as it would one of its peers', if it trusts the
key that signed it. A `Publisher` is a publisher of its own: its origin id, its signing key
(an nkey seed, `SU...`: list its public key `U...` in the nodes' `[trust]`), a random epoch,
and sequence numbers from 1 with no gaps (a receiver that sees a gap flushes), so keep one per
process and publish through it in order.

    seed = open("publisher.nk", "rb").read().strip()
    async with await Publisher.connect("nats://127.0.0.1:4222", namespace="blog", seed=seed) as p:
        await p.publish([invalidation(cache="articles", key="hello-world", version=7)], ack=True)

What is signed (proto/wire.proto, `Signed`): the Ed25519 signature covers
`b"invalbus.v2:batch:" + sha256(body)`, where `body` is the encoded `InvalidationBatch` carried,
byte for byte, in the envelope, and `sha256(body)` its 32-byte digest.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import time
from types import TracebackType
from typing import Any

from ._pb import wire_pb2

_ORIGIN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def new_seed() -> bytes:
    """A new random signing key, as an nkey user seed (`SU...`)."""
    import nkeys

    return bytes(nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER))


def public_key(seed: bytes) -> str:
    """The public nkey (`U...`) of a seed: what the nodes' trust policy lists."""
    import nkeys

    return nkeys.from_seed(bytearray(seed)).public_key.decode()


def seal(seed: bytes, kind: str, body: bytes) -> bytes:
    """`body` (an encoded message of `kind`: batch, heartbeat or receipt) in a `Signed`
    envelope, signed with `seed`."""
    import nkeys

    kp = nkeys.from_seed(bytearray(seed))
    signature = kp.sign(b"invalbus.v2:" + kind.encode() + b":" + hashlib.sha256(body).digest())
    return wire_pb2.Signed(body=body, signer=kp.public_key.decode(), signature=signature).SerializeToString()


class PublishError(Exception):
    """NATS refused the message (authorization, permissions) or no stream stored it."""


def invalidation(
    *,
    cache: str = "",
    key: str | None = None,
    tag: str | None = None,
    prefix: str | None = None,
    all: bool = False,
    version: int | None = None,
    reason: str = "",
    actor: str = "",
) -> wire_pb2.Invalidation:
    """One invalidation with exactly one target: key, tag, prefix or all."""
    if sum(x is not None for x in (key, tag, prefix)) + int(all) != 1:
        raise ValueError("an invalidation has exactly one target: key, tag, prefix or all")
    if version is not None and key is None:
        raise ValueError("a version goes with a key target")
    inv = wire_pb2.Invalidation(cache=cache, reason=reason, actor=actor)
    if key is not None:
        inv.key = key
    elif tag is not None:
        inv.tag = tag
    elif prefix is not None:
        inv.prefix = prefix
    else:
        inv.all = True
    if version is not None:
        inv.version = version
    return inv


class Publisher:
    """One publisher: an origin with a random epoch and its own sequence."""

    def __init__(self, nc: Any, namespace: str, origin: str | None = None, *, seed: bytes | None = None) -> None:
        origin = origin or "py-" + secrets.token_hex(4)
        if not _ORIGIN.match(origin):
            raise ValueError("origin: 1 to 64 letters, digits, '-' or '_'")
        self.seed = seed.strip() if seed else new_seed()
        self.public_key = public_key(self.seed)
        self.nc = nc
        self.namespace = namespace
        self.origin = origin
        self.epoch = secrets.randbits(63) | 1
        self.seq = 0
        self._errors: list[Exception] = []

    @classmethod
    async def connect(
        cls, url: str, *, namespace: str, origin: str | None = None, seed: bytes | None = None, **options: Any
    ) -> Publisher:
        """Connects to NATS (nats-py's `connect` options pass through, e.g. `tls`). `seed`: the
        signing key (an nkey seed); without it, a new key of this publisher's own, which only
        nodes that pin keys on first use accept."""
        import nats

        box: list[Exception] = []

        async def on_error(e: Exception) -> None:
            box.append(e)

        options.setdefault("connect_timeout", 10)
        options.setdefault("allow_reconnect", False)
        nc = await nats.connect(url, error_cb=on_error, name="invalbus-python-publisher", **options)
        p = cls(nc, namespace, origin, seed=seed)
        p._errors = box
        return p

    @property
    def subject(self) -> str:
        return f"invalbus.{self.namespace}.inv.{self.origin}"

    async def publish(self, invalidations: list[wire_pb2.Invalidation], *, ack: bool = False) -> Any:
        """Publishes one batch. Returns once the server has processed it (with `ack`: once the
        JetStream stream has stored it; returns the stream's ack)."""
        if not invalidations:
            raise ValueError("an empty batch")
        self.seq += 1
        batch = wire_pb2.InvalidationBatch(
            origin=self.origin,
            epoch=self.epoch,
            seq=self.seq,
            timestamp_us=int(time.time() * 1_000_000),
            invalidations=invalidations,
            namespace=self.namespace,
        )
        payload = seal(self.seed, "batch", batch.SerializeToString())
        return await publish_raw(self.nc, self.subject, payload, ack=ack, errors=self._errors)

    async def close(self) -> None:
        """Drains and closes the connection (what is queued is sent first)."""
        await self.nc.drain()

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()


async def publish_raw(nc: Any, subject: str, payload: bytes, *, ack: bool = False, errors: list[Exception]) -> Any:
    """Publishes `payload` and waits for the server (or the stream, with `ack`)."""
    from nats.js.errors import NoStreamResponseError

    if ack:
        try:
            return await nc.jetstream().publish(subject, payload)
        except NoStreamResponseError:
            raise PublishError("no JetStream stream took the message (no responders)") from None
        except Exception as e:  # nats-py raises its own error types for refusals
            raise PublishError(str(e)) from e
    await nc.publish(subject, payload)
    # The server answers a PING after it has processed what came before it; a refusal
    # (permissions) comes as -ERR before that PONG, and nats-py hands it to the error callback
    # as it reads it. Twice: nats-py writes a flush's PING straight to the socket but the PUB
    # through its buffer, so the first PING can overtake the PUB; the second cannot.
    await nc.flush()
    await nc.flush()
    if errors:
        raise PublishError(str(errors[-1]))
    return None


def publish(url: str, subject: str, payload: bytes, *, ack: bool = False, **options: Any) -> Any:
    """Blocking: connects, publishes one raw message on `subject`, waits, and closes."""

    async def run() -> Any:
        p = await Publisher.connect(url, namespace="-", **options)
        try:
            return await publish_raw(p.nc, subject, payload, ack=ack, errors=p._errors)
        finally:
            await p.nc.close()

    return asyncio.run(run())
