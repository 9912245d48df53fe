"""Typed errors of the invalbus client: one class per thing a caller may want to handle."""

from __future__ import annotations

import grpc


class InvalbusError(Exception):
    """Anything the node refused or could not do."""


class Unavailable(InvalbusError):
    """The node could not be reached, or NATS did not take a write's invalidation in time."""


class InvalidArgument(InvalbusError):
    """The node refused the request as malformed (an empty key, a tag with a NUL byte, …)."""


class AuthError(InvalbusError):
    """No token, a wrong token, or a token without the `cache` role."""


class KeyNotFound(InvalbusError, KeyError):
    """Incr of a key that the node holds no value for."""


class NotAnInteger(InvalbusError, TypeError):
    """Incr of a value that is not an integer."""


class IntegerOverflow(InvalbusError, OverflowError):
    """Incr past a signed 64-bit integer."""


class ReservationLost(InvalbusError):
    """Fill of a reservation the node no longer holds (expired or dropped): nothing was cached."""


def from_rpc(e: grpc.RpcError) -> InvalbusError:
    """The typed error for a failed call."""
    code = e.code() if hasattr(e, "code") else None
    detail = (e.details() if hasattr(e, "details") else None) or str(e)
    cls: type[InvalbusError]
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        cls = Unavailable
    elif code == grpc.StatusCode.INVALID_ARGUMENT:
        cls = InvalidArgument
    elif code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        cls = AuthError
    elif code == grpc.StatusCode.NOT_FOUND:
        cls = KeyNotFound
    elif code == grpc.StatusCode.OUT_OF_RANGE:
        cls = IntegerOverflow
    elif code == grpc.StatusCode.FAILED_PRECONDITION:
        cls = ReservationLost if "reservation" in detail else NotAnInteger
    else:
        cls = InvalbusError
    name = code.name if code is not None else "ERROR"
    return cls(f"{name}: {detail}")
