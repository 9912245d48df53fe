#!/usr/bin/env python3
"""Publish an invalbus invalidation batch straight onto NATS, from any service that is not Rust.

A Django signal handler, a cron job or a migration script can call this after its transaction
commits (or import `encode_batch` and `publish`). It needs nothing but Python 3: the batch is
the protobuf message `InvalidationBatch` of proto/proto/wire.proto, encoded by hand below, and
NATS is spoken over a plain socket (its text protocol: INFO, CONNECT, PUB, PING/PONG).

Every node of the namespace applies the batch as it would one of its peers': keys at a version
drop older entries and refuse older fills, tags and prefixes purge, `--all` flushes. Each run
is a new publisher (a random epoch, sequence 1), so runs never collide with each other.

Examples:
  publish.py --nats nats://publisher:SECRET@127.0.0.1:4222 --namespace blog \\
      --cache articles --key hello-world --version 7 --reason "edited in the CMS"
  publish.py --nats nats://127.0.0.1:4222 --namespace blog --tag author:42 --tag articles
  publish.py ... --ack     # wait for the JetStream stream's acknowledgement (needs the stream)

Exit status: 0 once the server has accepted the message (its PONG after our PUB, or the
stream's ack with --ack), 1 on any refusal (bad credentials, permissions, no stream), 2 on bad
arguments.
"""

import argparse
import json
import os
import secrets
import socket
import ssl
import sys
import time
import urllib.parse

# --- protobuf encoding (proto3 wire format) ---------------------------------------------------

def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_varint(number, value):
    return _varint(number << 3) + _varint(value)


def _field_bytes(number, data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    return _varint((number << 3) | 2) + _varint(len(data)) + data


def encode_invalidation(cache="", key=None, tag=None, prefix=None, all_=False, version=None,
                        reason="", actor="", purge_id=""):
    """One `invalbus.wire.v1.Invalidation`: exactly one of key, tag, prefix, all_."""
    if sum(x is not None and x is not False for x in (key, tag, prefix, all_ or None)) != 1:
        raise ValueError("an invalidation has exactly one target: key, tag, prefix or all")
    out = b""
    if cache:
        out += _field_bytes(1, cache)
    if key is not None:
        out += _field_bytes(2, key)
    elif tag is not None:
        out += _field_bytes(3, tag)
    elif prefix is not None:
        out += _field_bytes(4, prefix)
    else:
        out += _field_varint(5, 1)
    if version is not None:  # `optional`: present even when 0
        out += _field_varint(6, version)
    if reason:
        out += _field_bytes(7, reason)
    if actor:
        out += _field_bytes(8, actor)
    if purge_id:
        out += _field_bytes(9, purge_id)
    return out


def encode_batch(origin, epoch, seq, namespace, invalidations, timestamp_us=None):
    """One `invalbus.wire.v1.InvalidationBatch` from encoded invalidations."""
    if timestamp_us is None:
        timestamp_us = int(time.time() * 1_000_000)
    out = _field_bytes(1, origin) + _field_varint(2, epoch) + _field_varint(3, seq)
    out += _field_varint(4, timestamp_us)
    for inv in invalidations:
        out += _field_bytes(5, inv)
    out += _field_bytes(6, namespace)
    return out


# --- NATS text protocol ------------------------------------------------------------------------

class NatsError(Exception):
    pass


def _read_line(f):
    line = f.readline()
    if not line:
        raise NatsError("the server closed the connection")
    return line.decode("utf-8", "replace").rstrip("\r\n")


def publish(url, subject, payload, tls_ca=None, ack=False, timeout=10.0, name="invalbus-publish.py"):
    """Connects to the NATS server at `url` (nats://[user:pass@]host:port, or tls://), publishes
    `payload` on `subject`, and returns once the server has processed it (with `ack`: once the
    JetStream stream has stored it; returns the ack as a dict)."""
    u = urllib.parse.urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 4222
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        f = sock.makefile("rb")
        info_line = _read_line(f)
        if not info_line.startswith("INFO "):
            raise NatsError("not a NATS server: " + info_line[:80])
        info = json.loads(info_line[5:])
        if u.scheme == "tls" or tls_ca or info.get("tls_required"):
            ctx = ssl.create_default_context(cafile=tls_ca)
            sock = ctx.wrap_socket(sock, server_hostname=host)
            f = sock.makefile("rb")
        connect = {"verbose": False, "pedantic": False, "lang": "python", "version": "1",
                   "protocol": 1, "name": name, "headers": True, "no_responders": True}
        if u.username:
            connect["user"] = urllib.parse.unquote(u.username)
            connect["pass"] = urllib.parse.unquote(u.password or "")
        sock.sendall(b"CONNECT " + json.dumps(connect).encode() + b"\r\n")
        inbox = None
        if ack:
            inbox = "_INBOX." + secrets.token_hex(11)
            sock.sendall(("SUB %s 1\r\n" % inbox).encode())
            sock.sendall(("PUB %s %s %d\r\n" % (subject, inbox, len(payload))).encode() + payload + b"\r\n")
        else:
            sock.sendall(("PUB %s %d\r\n" % (subject, len(payload))).encode() + payload + b"\r\n")
        # The server answers PING after it has processed everything before it; a refusal
        # (authorization, permissions) comes as -ERR first.
        sock.sendall(b"PING\r\n")
        got_pong = False
        while True:
            line = _read_line(f)
            if line.startswith("-ERR"):
                raise NatsError(line[5:].strip(" '"))
            if line == "PING":
                sock.sendall(b"PONG\r\n")
            elif line == "PONG":
                got_pong = True
                if not ack:
                    return None
            elif line.startswith("MSG ") or line.startswith("HMSG "):
                parts = line.split()
                total = int(parts[-1])
                body = f.read(total + 2)[:total]
                if line.startswith("HMSG "):
                    hdr_len = int(parts[-2])
                    headers, body = body[:hdr_len], body[hdr_len:]
                    if b" 503" in headers.split(b"\r\n")[0]:
                        raise NatsError("no JetStream stream took the message (no responders)")
                reply = json.loads(body or b"{}")
                if "error" in reply:
                    raise NatsError("JetStream: %s" % reply["error"].get("description", reply["error"]))
                return reply
    finally:
        sock.close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--nats", default=os.environ.get("INVALBUS_NATS", "nats://127.0.0.1:4222"),
                   help="NATS URL, nats://user:password@host:port (env INVALBUS_NATS)")
    p.add_argument("--namespace", default=os.environ.get("INVALBUS_NAMESPACE", "default"),
                   help="the bus namespace (env INVALBUS_NAMESPACE)")
    p.add_argument("--cache", default="", help="cache name (default: every cache)")
    p.add_argument("--key", action="append", default=[], help="key to invalidate (repeatable)")
    p.add_argument("--version", type=int, help="version of the key after the write (one --key)")
    p.add_argument("--tag", action="append", default=[], help="tag to purge (repeatable)")
    p.add_argument("--prefix", action="append", default=[], help="key prefix to purge (repeatable)")
    p.add_argument("--all", action="store_true", help="flush the cache (or every cache)")
    p.add_argument("--reason", default="", help="why, for the audit log")
    p.add_argument("--actor", default=os.environ.get("USER", "python"), help="who, for the audit log")
    p.add_argument("--origin", default="py-" + secrets.token_hex(4),
                   help="publisher id (letters, digits, '-', '_'); default py-<random>")
    p.add_argument("--tls-ca", help="CA file to verify a TLS server")
    p.add_argument("--ack", action="store_true", help="wait for the JetStream stream's ack")
    a = p.parse_args(argv)

    if a.version is not None and len(a.key) != 1:
        p.error("--version goes with exactly one --key")
    if not (a.key or a.tag or a.prefix or a.all):
        p.error("nothing to invalidate: give --key, --tag, --prefix or --all")
    if not a.origin or any(not (c.isalnum() or c in "-_") for c in a.origin):
        p.error("--origin: use letters, digits, '-' or '_'")
    common = {"cache": a.cache, "reason": a.reason, "actor": a.actor}
    invs = [encode_invalidation(key=k, version=a.version, **common) for k in a.key]
    invs += [encode_invalidation(tag=t, **common) for t in a.tag]
    invs += [encode_invalidation(prefix=x, **common) for x in a.prefix]
    if a.all:
        invs.append(encode_invalidation(all_=True, **common))
    epoch = secrets.randbits(63) | 1
    batch = encode_batch(a.origin, epoch, 1, a.namespace, invs)
    subject = "invalbus.%s.inv.%s" % (a.namespace, a.origin)
    try:
        reply = publish(a.nats, subject, batch, tls_ca=a.tls_ca, ack=a.ack)
    except (OSError, NatsError, ValueError) as e:
        print("publish.py: %s" % e, file=sys.stderr)
        return 1
    where = " (stream %s, seq %s)" % (reply.get("stream"), reply.get("seq")) if reply else ""
    print("published %d invalidation(s) as %s epoch %d seq 1 on %s%s"
          % (len(invs), a.origin, epoch, subject, where))
    return 0


if __name__ == "__main__":
    sys.exit(main())
