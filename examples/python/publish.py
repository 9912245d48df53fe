#!/usr/bin/env python3
"""Publish an invalbus invalidation batch onto NATS from Python (no node needed): the package's
`invalbus.publisher` (nats-py and the generated protobuf classes of proto/wire.proto).

    pip install "./clients/python[nats]"
    publish.py --nats nats://publisher:SECRET@127.0.0.1:4222 --namespace blog \\
        --cache articles --key hello-world --version 7 --reason "edited in the CMS"
    publish.py --nats nats://127.0.0.1:4222 --namespace blog --tag author:42 --ack

Exit status: 0 once the server (or with --ack, the JetStream stream) took the batch, 1 on a
refusal, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import sys

from invalbus.publisher import Publisher, PublishError, invalidation, publish

__all__ = ["main", "publish"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nats", default=os.environ.get("INVALBUS_NATS", "nats://127.0.0.1:4222"))
    p.add_argument("--namespace", default=os.environ.get("INVALBUS_NAMESPACE", "default"))
    p.add_argument("--cache", default="", help="cache name (default: every cache)")
    p.add_argument("--key", action="append", default=[], help="key to invalidate (repeatable)")
    p.add_argument("--version", type=int, help="version of the key after the write (one --key)")
    p.add_argument("--tag", action="append", default=[], help="tag to purge (repeatable)")
    p.add_argument("--prefix", action="append", default=[], help="key prefix to purge (repeatable)")
    p.add_argument("--all", action="store_true", help="flush the cache (or every cache)")
    p.add_argument("--reason", default="")
    p.add_argument("--actor", default=os.environ.get("USER", "python"))
    p.add_argument("--origin", help="publisher id (letters, digits, '-', '_'); default py-<random>")
    p.add_argument(
        "--key-file",
        default=os.environ.get("INVALBUS_KEY_FILE"),
        help="signing key: an nkey seed file (SU...); default a new key for this run",
    )
    p.add_argument("--tls-ca", help="CA file to verify a TLS server")
    p.add_argument("--ack", action="store_true", help="wait for the JetStream stream's ack")
    a = p.parse_args(argv)
    if a.version is not None and len(a.key) != 1:
        p.error("--version goes with exactly one --key")
    common = {"cache": a.cache, "reason": a.reason, "actor": a.actor}
    invs = [invalidation(key=k, version=a.version, **common) for k in a.key]
    invs += [invalidation(tag=t, **common) for t in a.tag]
    invs += [invalidation(prefix=x, **common) for x in a.prefix]
    if a.all:
        invs.append(invalidation(all=True, **common))
    if not invs:
        p.error("nothing to invalidate: give --key, --tag, --prefix or --all")

    async def run() -> str:
        tls = ssl.create_default_context(cafile=a.tls_ca) if a.tls_ca else None
        seed = None
        if a.key_file:
            with open(a.key_file, "rb") as f:
                seed = f.read().strip()
        pub = await Publisher.connect(a.nats, namespace=a.namespace, origin=a.origin, seed=seed, tls=tls)
        async with pub:
            ack = await pub.publish(invs, ack=a.ack)
        where = f" (stream {ack.stream}, seq {ack.seq})" if ack else ""
        return f"published {len(invs)} invalidation(s) as {pub.origin} epoch {pub.epoch} seq 1{where}"

    try:
        print(asyncio.run(run()))
    except ValueError as e:
        p.error(str(e))
    except (
        OSError,
        PublishError,
        Exception,
    ) as e:  # nats-py's connect errors have no common base
        print(f"publish.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
