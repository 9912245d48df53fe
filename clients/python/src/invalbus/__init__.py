"""invalbus for Python: a typed client of a node's sidecar cache (blocking and asyncio), an
in-process layer kept coherent by the node, and (in `invalbus.django`) a Django cache backend.

    from invalbus import Client
    c = Client("unix:/run/invalbus.sock", token="…", cache="default")
    c.set("greeting", b"hello")
"""

from .client import AsyncClient, Client, Entry, SetItem, WatchEvent
from .errors import (
    AuthError,
    IntegerOverflow,
    InvalbusError,
    InvalidArgument,
    KeyNotFound,
    NotAnInteger,
    ReservationLost,
    Unavailable,
)
from .local import LocalLayer
from .readsock import ReadSocket

__all__ = [
    "AsyncClient",
    "AuthError",
    "Client",
    "Entry",
    "IntegerOverflow",
    "InvalbusError",
    "InvalidArgument",
    "KeyNotFound",
    "LocalLayer",
    "NotAnInteger",
    "ReadSocket",
    "ReservationLost",
    "SetItem",
    "Unavailable",
    "WatchEvent",
]
