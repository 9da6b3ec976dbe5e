"""openpi's wire format: msgpack frames whose numpy arrays are maps tagged `__ndarray__`.

An array travels as {b"__ndarray__": True, b"data": raw bytes (C order), b"dtype": dtype.str,
b"shape": [dims]}; a numpy scalar as {b"__npgeneric__": True, b"data": value, b"dtype": str}.
Keys are msgpack bin (bytes), as openpi_client.msgpack_numpy writes them. Only number and bool
dtypes travel: object, void and complex (as openpi) and also string, bytes, datetime and
timedelta (no observation field takes them; a prompt is a msgpack str) are refused both ways, so
nothing here can ever run code from a frame.

Decoding is strict (frames come from the network): anything malformed raises ProtocolError with
a one-line message the server sends back to the client.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

_KINDS = "biuf"  # bools and numbers: every other kind is refused


class ProtocolError(ValueError):
    """A frame that cannot be decoded or is not a request the server understands."""


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _KINDS:
            raise TypeError(f"cannot send a numpy array of dtype {obj.dtype}")
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in _KINDS:
            raise TypeError(f"cannot send a numpy scalar of dtype {obj.dtype}")
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _dtype(spec: Any) -> np.dtype:
    if not isinstance(spec, (str, bytes)):
        raise ProtocolError(f"array dtype must be a numpy dtype string like '<f4', got {type(spec).__name__}")
    try:
        dt = np.dtype(spec.decode() if isinstance(spec, bytes) else spec)
    except (TypeError, ValueError, UnicodeDecodeError):
        raise ProtocolError(f"unknown array dtype {spec!r}") from None
    if dt.kind not in _KINDS:
        raise ProtocolError(f"array dtype {dt} is not allowed (numbers and bools only)")
    return dt


def _decode(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        dt = _dtype(obj.get(b"dtype"))
        shape, data = obj.get(b"shape"), obj.get(b"data")
        if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ProtocolError(f"array shape must be a list of non-negative ints, got {shape!r}")
        if not isinstance(data, bytes):
            raise ProtocolError("array data must be msgpack bin (bytes)")
        if len(data) != math.prod(shape) * dt.itemsize:
            raise ProtocolError(f"array data has {len(data)} bytes, shape {list(shape)} of {dt} needs "
                                f"{math.prod(shape) * dt.itemsize}")
        # A copy: frombuffer over the frame's bytes would be read-only.
        return np.frombuffer(data, dtype=dt).reshape(shape).copy()
    if b"__npgeneric__" in obj:
        dt = _dtype(obj.get(b"dtype"))
        data = obj.get(b"data")  # a msgpack scalar of the dtype's kind: np.bool_("no") is True
        kinds = {"b": (bool,), "i": (int,), "u": (int,), "f": (int, float)}[dt.kind]
        if not isinstance(data, kinds) or (dt.kind != "b" and isinstance(data, bool)):
            raise ProtocolError(f"bad numpy scalar {str(data)[:40]!r} for dtype {dt}")
        try:
            return dt.type(data)
        except (TypeError, ValueError, OverflowError):
            raise ProtocolError(f"bad numpy scalar {obj.get(b'data')!r} for dtype {dt}") from None
    return obj


def ws_url(host: str, port: int) -> str:
    """The address clients connect to, as a URL: an IPv6 host in brackets (ws://[::1]:8000)."""
    return f"ws://[{host}]:{port}" if ":" in host else f"ws://{host}:{port}"


def packb(obj: Any) -> bytes:
    """Encode a reply (or, for clients and tests, a request) in openpi's format."""
    return msgpack.packb(obj, default=_encode, use_bin_type=True)


# Items of msgpack lists a frame may hold in all. Arrays travel as bin; a list of pixels decodes at
# ~1 s per MiB on the server's event loop (every client waits), and no observation field takes one.
MAX_LIST_ITEMS = 65536


class _ListBudget:
    def __init__(self) -> None:
        self.left = MAX_LIST_ITEMS

    def __call__(self, items: list) -> list:
        self.left -= len(items)
        if self.left < 0:
            raise ProtocolError(f"frame holds more than {MAX_LIST_ITEMS} msgpack list items; send arrays as "
                                "numpy arrays (msgpack-numpy), not nested lists")
        return items


def unpackb(data: bytes) -> Any:
    """Decode one frame; raises ProtocolError on anything malformed."""
    try:
        return msgpack.unpackb(data, object_hook=_decode, list_hook=_ListBudget(), raw=False)
    except ProtocolError:
        raise
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise ProtocolError(f"malformed msgpack frame ({type(e).__name__})") from None
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        # msgpack reports truncated data as ValueError, bad map keys as TypeError.
        raise ProtocolError(f"malformed msgpack frame ({_short(e)})") from None


def _short(e: Exception, n: int = 120) -> str:
    s = str(e).splitlines()[0] if str(e) else type(e).__name__
    return s if len(s) <= n else s[: n - 3] + "..."


def parse_request(frame: Any) -> dict:
    """A decoded frame -> the request dict; checks the top level only (the robot transform
    checks keys, shapes and values of the observation itself)."""
    if not isinstance(frame, dict):
        raise ProtocolError(f"a request must be a msgpack map (observation dict), got {type(frame).__name__}")
    bad = [k for k in frame if not isinstance(k, str)]
    if bad:
        raise ProtocolError(f"request keys must be strings, got {[repr(k)[:40] for k in bad[:3]]}")
    return frame
