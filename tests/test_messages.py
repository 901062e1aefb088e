"""The wire contract: every message round-trips, and bad frames become errors that name the problem."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import msgpack
import pytest

from sllm_actors.runtime import wire
from sllm_actors.messages import (
    MAX_BODY_BYTES,
    PROTOCOL_VERSION,
    GenerateRequest,
    Message,
    ProtocolError,
    SamplingFields,
    SamplingParams,
    TokenChunk,
    decode,
    encode,
    message_types,
)


def _sample(annotation: Any, name: str) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is str:
        return f"{name}-value-é"
    if annotation is int:
        return 1234567890123
    if annotation is float:
        return 0.125
    if annotation is bool:
        return True
    if annotation is bytes:
        return b"\x00\xff"
    if origin is list:
        (item,) = typing.get_args(annotation)
        return [_sample(item, name), _sample(item, name)]
    if origin is dict:
        return {"nested": {"list": [1, 2.5, "x"], "flag": False}}
    if origin in (typing.Union, __import__("types").UnionType):
        return _sample(next(a for a in typing.get_args(annotation) if a is not type(None)), name)
    if annotation is Any:
        return {"any": 1}
    raise AssertionError(f"no sample for {annotation}")


@pytest.mark.parametrize("tag", sorted(message_types()))
def test_every_message_round_trips(tag: str) -> None:
    cls = message_types()[tag]
    hints = typing.get_type_hints(cls)
    values = {f.name: _sample(hints[f.name], f.name) for f in dataclasses.fields(cls)}
    msg = cls(**values)
    address, back = wire.unpack(wire.pack(msg, "node-7"))
    assert address == "node-7"
    assert back == msg
    assert type(back) is cls


def _sampling_messages() -> list[type[Message]]:
    return [cls for cls in message_types().values() if issubclass(cls, SamplingFields)]


def test_the_sampling_record_travels_flattened() -> None:
    """SamplingParams is not a field of its own on the wire: each message that carries it has its fields, checked
    like any other, so the protocol is the one it was before the record existed."""
    names = [f.name for f in dataclasses.fields(SamplingParams)]
    carriers = _sampling_messages()
    assert sorted(cls.tag for cls in carriers) == ["generate", "kv_copy_begin", "resume", "start_inference"]
    params = SamplingParams(max_tokens=77, temperature=0.7, top_p=0.9, seed=2**62 + 5, stop=("\n\n", "END"))
    for cls in carriers:
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(names) <= fields, f"{cls.tag} lacks sampling fields {set(names) - fields}"
        hints = typing.get_type_hints(cls)
        values = {f.name: _sample(hints[f.name], f.name) for f in dataclasses.fields(cls) if f.name not in names}
        msg = cls(**values, **params.fields())
        back = decode(encode(msg))
        assert back == msg
        assert back.sampling == params  # type: ignore[attr-defined]
        assert msgpack.unpackb(encode(msg))[1]["stop"] == ["\n\n", "END"]


def test_a_client_request_defaults_to_the_records_defaults() -> None:
    msg = decode(msgpack.packb(["generate", {"request_id": "r1", "model": "m", "prompt": "p"}]))
    assert msg.sampling == SamplingParams()  # type: ignore[attr-defined]


def test_past_the_router_the_seed_must_be_drawn() -> None:
    fields = {"request_id": "r", "instance_id": "i", "prompt": "p", "chat": False, "prompt_ids": [],
              "generated_ids": [], "text_so_far": "", **SamplingParams(seed=None).fields()}
    with pytest.raises(ProtocolError, match="start_inference.seed: expected int, got NoneType"):
        decode(msgpack.packb(["start_inference", fields]))
    fields["seed"] = 3
    assert decode(msgpack.packb(["start_inference", fields])).sampling.seed == 3  # type: ignore[attr-defined]


def test_message_types_are_immutable() -> None:
    msg = TokenChunk("r", 0, [1], "a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.index = 3  # type: ignore[misc]


def test_defaults_fill_fields_an_older_peer_did_not_send() -> None:
    body = msgpack.packb(["generate", {"request_id": "r1", "model": "m", "prompt": "p"}])
    msg = decode(body)
    assert isinstance(msg, GenerateRequest)
    assert msg.max_tokens == 128 and msg.stop == [] and msg.seed is None


def test_fields_from_a_newer_peer_are_ignored() -> None:
    body = msgpack.packb(["tokens", {"request_id": "r", "index": 0, "token_ids": [1], "text": "a", "future": 1}])
    assert decode(body) == TokenChunk("r", 0, [1], "a")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"\xc1\xc1\xc1", "not valid msgpack"),
        (msgpack.packb({"t": "tokens"}), "must be a msgpack array"),
        (msgpack.packb(["no-such-tag", {}]), "unknown message tag 'no-such-tag'"),
        (msgpack.packb(["tokens", {"request_id": "r", "index": "zero", "token_ids": [1], "text": ""}]),
         "tokens.index: expected int, got str"),
        (msgpack.packb(["tokens", {"request_id": "r", "index": 0, "token_ids": [1, "x"], "text": ""}]),
         "tokens.token_ids: item 1: expected int, got str"),
        (msgpack.packb(["tokens", {"request_id": "r", "index": True, "token_ids": [], "text": ""}]),
         "expected int, got bool"),
        (msgpack.packb(["tokens", {"request_id": "r", "index": 0}]), "missing field(s) token_ids, text"),
        (msgpack.packb(["generate", {"request_id": "r", "model": "m", "prompt": "p", "seed": "s"}]),
         "generate.seed: expected int | None"),
    ],
)
def test_bad_bodies_name_the_problem(body: bytes, fragment: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(body)
    assert fragment in str(info.value)


def test_error_keeps_the_request_id_when_it_can() -> None:
    with pytest.raises(ProtocolError) as info:
        decode(msgpack.packb(["generate", {"request_id": "abc", "model": 3, "prompt": "p"}]))
    assert info.value.request_id == "abc"


def test_oversized_frames_are_refused_before_unpacking() -> None:
    big = b"\x00" * (MAX_BODY_BYTES + 1)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        wire.unpack([wire.HEADER, b"", big])


def test_envelope_checks() -> None:
    body = encode(TokenChunk("r", 0, [1], "a"))
    with pytest.raises(ProtocolError, match="expected 3 frames"):
        wire.unpack([wire.HEADER, body])
    with pytest.raises(ProtocolError, match=f"protocol version 99 is not supported; this side speaks version "
                                            f"{PROTOCOL_VERSION}"):
        wire.unpack([b"SLLM/99", b"", body])
    with pytest.raises(ProtocolError, match="not an sllm-actors frame"):
        wire.unpack([b"HTTP/1.1", b"", body])
    with pytest.raises(ProtocolError, match="address frame is not UTF-8"):
        wire.unpack([wire.HEADER, b"\xff\xfe", body])


def test_every_registered_type_is_a_frozen_message() -> None:
    for cls in message_types().values():
        assert issubclass(cls, Message)
        assert cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
