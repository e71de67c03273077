"""Values: ``bytes`` are stored as they are; ``str`` and other objects are
marked so a read returns the same type (``str`` as UTF-8, anything else as
MessagePack, the seed's behaviour). A ``bytes`` value that begins with the
marker byte is escaped, so every ``bytes`` value reads back unchanged."""

from typing import Any

import msgpack

_MARK = b"\x00"
_STR, _PACK, _BYTES = b"s", b"m", b"b"


def encode(value: Any) -> bytes:
    """The stored form of ``value``."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        return _MARK + _BYTES + raw if raw.startswith(_MARK) else raw
    if isinstance(value, str):
        return _MARK + _STR + value.encode("utf-8")
    return _MARK + _PACK + msgpack.packb(value, use_bin_type=True)


def decode(raw: bytes) -> Any:
    """The value ``encode`` stored."""
    if not raw.startswith(_MARK) or len(raw) < 2:
        return raw
    tag, body = raw[1:2], raw[2:]
    if tag == _STR:
        return body.decode("utf-8")
    if tag == _PACK:
        return msgpack.unpackb(body, raw=False)
    if tag == _BYTES:
        return body
    return raw
