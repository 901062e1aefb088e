"""Property-based fuzz of the wire decoder: whatever bytes arrive, ``decode`` returns a valid message or
raises ProtocolError, never anything else (an exception of another type in the IO thread would be a
bug the transport only logs, and a message of the wrong shape would reach an actor)."""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sllm_actors.runtime import wire
from sllm_actors.messages import (
    _REGISTRY,
    MAX_BODY_BYTES,
    Message,
    ProtocolError,
    _type_problem,
    decode,
    encode,
)

# CI runs a bounded number; SLLM_FUZZ_EXAMPLES raises it for a long run.
EXAMPLES = int(os.environ.get("SLLM_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

TAGS = sorted(_REGISTRY)
_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
            | st.floats(allow_nan=True) | st.text(max_size=20) | st.binary(max_size=20))
garbage = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.integers(-1000, 1000), inner,
                                                                max_size=4),
    max_leaves=12,
)

clean = st.recursive(  # what a well-behaved peer sends where a field is Any: msgpack with string keys
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _value_for(annotation: Any, wild: bool = True) -> st.SearchStrategy[Any]:
    """Mostly a value of the field's type (so decoding gets past the first field), sometimes garbage."""
    origin = typing.get_origin(annotation)
    if annotation is str:
        good: st.SearchStrategy[Any] = st.text(max_size=30)
    elif annotation is int:
        good = st.integers(min_value=-(2**63), max_value=2**63 - 1)
    elif annotation is float:
        good = st.floats(allow_nan=True) | st.integers(min_value=-(2**53), max_value=2**53)
    elif annotation is bool:
        good = st.booleans()
    elif annotation is bytes:
        good = st.binary(max_size=64)
    elif origin is list:
        (item,) = typing.get_args(annotation)
        good = st.lists(_value_for(item, wild), max_size=4)
    elif origin is dict:
        good = st.dictionaries(st.text(max_size=8), garbage if wild else clean, max_size=4)
    elif annotation is Any:
        good = garbage if wild else clean
    else:  # X | None
        good = st.one_of([_value_for(a, wild) if a is not type(None) else st.none()
                          for a in typing.get_args(annotation)])
    return st.one_of(good, good, good, garbage) if wild else good


@st.composite
def message_bodies(draw: st.DrawFn, only: str = "") -> bytes:
    # Half the bodies are well-formed messages (so the fuzz reaches every type's field checks and the
    # round trip), half are damaged in one or more ways.
    wild = draw(st.booleans()) if not only else False
    tag = only or (draw(st.sampled_from(TAGS) | st.text(max_size=12)) if wild else draw(st.sampled_from(TAGS)))
    fields: dict[Any, Any] = {}
    cls = _REGISTRY.get(tag)
    if cls is not None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not wild or draw(st.integers(0, 9)) > 0:  # now and then a field is missing
                fields[f.name] = draw(_value_for(hints[f.name], wild))
    if wild:
        fields.update(draw(st.dictionaries(st.text(max_size=8), garbage, max_size=2)))  # unknown fields
    shape = draw(st.integers(0, 5)) if wild else 0
    top: Any = [tag, fields]
    if shape == 1:
        top = [tag, fields, draw(garbage)]  # too many items
    elif shape == 2:
        top = draw(garbage)
    elif shape == 3:
        top = {"tag": tag, **{str(k): v for k, v in fields.items()}}
    body = msgpack.packb(top, use_bin_type=True)
    mangle = draw(st.integers(0, 4)) if wild else 0
    if mangle == 1 and body:
        body = body[: draw(st.integers(0, len(body) - 1))]  # truncated
    elif mangle == 2:
        body += draw(st.binary(min_size=1, max_size=16))  # trailing bytes
    elif mangle == 3 and body:
        i = draw(st.integers(0, len(body) - 1))
        body = body[:i] + bytes([draw(st.integers(0, 255))]) + body[i + 1:]  # one byte flipped
    return body


def _check(body: bytes | memoryview) -> Message | None:
    try:
        msg = decode(body)
    except ProtocolError:
        return None
    assert type(msg) in _REGISTRY.values()
    hints = typing.get_type_hints(type(msg))
    for f in dataclasses.fields(msg):
        assert _type_problem(getattr(msg, f.name), hints[f.name]) == "", (f.name, getattr(msg, f.name))
    # What decodes re-encodes to a body that decodes to the same message (compared as bytes: NaN != NaN).
    assert encode(decode(encode(msg))) == encode(msg)
    return msg


@FUZZ
@given(message_bodies())
def test_decode_returns_a_valid_message_or_protocol_error(body: bytes) -> None:
    _check(body)
    _check(memoryview(body))  # the transport hands decode a view of ZeroMQ's buffer


@FUZZ
@given(st.binary(max_size=512))
def test_decode_of_random_bytes(body: bytes) -> None:
    _check(body)


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=5), st.sampled_from(TAGS))
def test_unpack_of_random_frames(frames: list[bytes], tag: str) -> None:
    for candidate in (frames, [wire.HEADER, *frames[:2]], [wire.HEADER, b"", *frames[:1]]):
        try:
            address, msg = wire.unpack(candidate)
        except ProtocolError:
            continue
        assert isinstance(address, str) and isinstance(msg, Message)


def test_oversized_and_deeply_nested_bodies_are_protocol_errors() -> None:
    for body in (b"\x00" * (MAX_BODY_BYTES + 1), b"\x91" * 100_000 + b"\xc0", b"\xdd\xff\xff\xff\xff",
                 msgpack.packb(["tokens", {"request_id": "r", "index": 0, "token_ids": [[[[1]]]], "text": ""}])):
        assert _check(body) is None


def test_every_message_type_decodes_from_the_strategys_well_formed_bodies() -> None:
    """The strategy reaches every type's field checks (a guard against a fuzz that never gets past the tag)."""
    for tag in TAGS:
        _well_formed_decode(tag)


def _well_formed_decode(tag: str) -> None:
    decoded: list[str] = []

    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body=message_bodies(only=tag))
    def run(body: bytes) -> None:
        msg = _check(body)
        assert msg is not None and msg.tag == tag, decode_problem(body)
        decoded.append(msg.tag)

    run()
    assert decoded, tag


def decode_problem(body: bytes) -> str:
    try:
        decode(body)
    except ProtocolError as exc:
        return str(exc)
    return ""
