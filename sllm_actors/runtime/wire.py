"""The envelope around every message on a ZeroMQ socket: ``[header, address, body]``.

``header`` is ``b"SLLM/<version>"`` so a peer speaking another protocol version is told so by name;
``address`` names the node a message is for when it is relayed through the controller (empty for
the controller itself); ``body`` is :func:`sllm_actors.messages.encode`'s msgpack.
"""

from __future__ import annotations

from sllm_actors.messages import MAX_BODY_BYTES, PROTOCOL_VERSION, Message, ProtocolError, decode, encode

__all__ = ["HEADER", "pack", "unpack"]

HEADER_PREFIX = b"SLLM/"
HEADER = HEADER_PREFIX + str(PROTOCOL_VERSION).encode()


def pack(msg: Message, address: str = "") -> list[bytes]:
    return [HEADER, address.encode(), encode(msg)]


def unpack(frames: list[bytes]) -> tuple[str, Message]:
    """Frames to (address, message); ProtocolError naming the problem otherwise."""
    if len(frames) != 3:
        raise ProtocolError(f"expected 3 frames [header, address, body], got {len(frames)}")
    header, address, body = frames
    if header != HEADER:
        if header.startswith(HEADER_PREFIX):
            theirs = header[len(HEADER_PREFIX):].decode(errors="replace")
            raise ProtocolError(
                f"protocol version {theirs} is not supported; this side speaks version {PROTOCOL_VERSION}"
            )
        raise ProtocolError(f"not an sllm-actors frame (header {header[:16]!r})")
    if len(body) > MAX_BODY_BYTES:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the limit of {MAX_BODY_BYTES} bytes")
    try:
        address_text = address.decode()
    except UnicodeDecodeError:
        raise ProtocolError("address frame is not UTF-8") from None
    return address_text, decode(body)
