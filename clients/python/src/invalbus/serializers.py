"""How values become bytes for the node: small pluggable classes, chosen by dotted path in the
Django backend's `OPTIONS["SERIALIZER"]` (as django-redis does).

Integers (not bools) are stored as decimal text so that the node's `Incr` can add to them; every
other value is pickled (Django's own convention). A pickle starts with byte 0x80, so the two
never look alike.
"""

from __future__ import annotations

import json
import pickle
from typing import Any, Protocol


class Serializer(Protocol):
    """Turns values into bytes and back."""

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


def _is_int(value: Any) -> bool:
    return type(value) is int


def _int_or_none(data: bytes) -> int | None:
    if data and (data[:1].isdigit() or (data[:1] == b"-" and data[1:2].isdigit())):
        try:
            return int(data)
        except ValueError:
            return None
    return None


class PickleSerializer:
    """Pickle (highest protocol), with integers as decimal text. The default."""

    def __init__(self, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
        self.protocol = protocol

    def dumps(self, value: Any) -> bytes:
        if _is_int(value):
            return b"%d" % value
        return pickle.dumps(value, self.protocol)

    def loads(self, data: bytes) -> Any:
        n = _int_or_none(data)
        if n is not None:
            return n
        return pickle.loads(data)


class JSONSerializer:
    """JSON (for values that other languages read too), with integers as decimal text."""

    def dumps(self, value: Any) -> bytes:
        if _is_int(value):
            return b"%d" % value
        return json.dumps(value, separators=(",", ":")).encode()

    def loads(self, data: bytes) -> Any:
        n = _int_or_none(data)
        if n is not None:
            return n
        return json.loads(data)
