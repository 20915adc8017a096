"""Malformed and hostile request bytes for any protobuf request type, drawn from its descriptor.

Each kind is what an attacker or a broken client sends: random bytes, a field with the wrong wire type, invalid
UTF-8 in a string, empty and oversized repeated fields, NaN/±inf doubles, negative and huge integers, unknown enum
values, deep nesting, truncated messages and lying length prefixes — and well-formed messages with hostile values
in every field (built with the message class, so they parse: they test validation, not the decoder).

>>> from knowserve.retrieval.v1 import retrieval_service_pb2 as pb
>>> payloads = list(malformed(pb.SearchRequest.DESCRIPTOR, 26, seed=0))
>>> len(payloads), sorted({kind for kind, _ in payloads}) == sorted(KINDS)
(26, True)
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Iterator

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message_factory import GetMessageClass

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5
_F = FieldDescriptor
_WIRE = {_F.TYPE_DOUBLE: I64, _F.TYPE_FIXED64: I64, _F.TYPE_SFIXED64: I64, _F.TYPE_FLOAT: I32, _F.TYPE_FIXED32: I32,
         _F.TYPE_SFIXED32: I32, _F.TYPE_STRING: LEN, _F.TYPE_BYTES: LEN, _F.TYPE_MESSAGE: LEN}
_INTS = (_F.TYPE_INT32, _F.TYPE_INT64, _F.TYPE_UINT32, _F.TYPE_UINT64, _F.TYPE_SINT32, _F.TYPE_SINT64)
EXTREME_INTS = (-1, -2**31, 2**31 - 1, 2**31, -2**63, 2**63 - 1, 2**64 - 1, 10**12)
EXTREME_FLOATS = (math.nan, math.inf, -math.inf, -0.0, 1e308, -1e308, 5e-324)
HOSTILE_TEXT = ("", " ", "\x00", "\u202e\u0000\ufeff", "a" * 100_000, "🙂" * 5_000, "' OR 1=1 --", "../../etc/passwd",
                "%s%n%x", "<script>alert(1)</script>", "\ud7ff\ue000", "NaN", "-1", "9" * 400, "\n" * 1000)


def varint(n: int) -> bytes:
    """Base-128 varint of ``n`` (negative numbers as their 64-bit two's complement, as protobuf does).

    >>> varint(1), varint(300), len(varint(-1))
    (b'\\x01', b'\\xac\\x02', 10)
    """
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def tag(number: int, wire: int) -> bytes:
    return varint((number << 3) | wire)


def wire_type(field: FieldDescriptor) -> int:
    return _WIRE.get(field.type, VARINT)


def _value(field: FieldDescriptor, rng: random.Random) -> bytes:
    """A well-formed encoded value (without tag) of ``field``'s wire type."""
    w = wire_type(field)
    if w == VARINT:
        return varint(rng.choice(EXTREME_INTS + (0, 1, 2)))
    if w == I64:
        return struct.pack("<d", rng.choice(EXTREME_FLOATS))
    if w == I32:
        return struct.pack("<f", rng.choice(EXTREME_FLOATS[:3]))
    body = rng.choice([b"", b"x", "é".encode(), b"\x00" * 8])
    return varint(len(body)) + body


def _fields(desc: Descriptor, rng: random.Random, want=None) -> list[FieldDescriptor]:
    fields = [f for f in desc.fields if want is None or want(f)]
    rng.shuffle(fields)
    return fields


def _string_paths(desc: Descriptor, depth: int = 0) -> list[list[FieldDescriptor]]:
    """Field paths from ``desc`` to each string field (through message fields, 3 deep)."""
    paths = []
    for f in desc.fields:
        if f.type == _F.TYPE_STRING:
            paths.append([f])
        elif f.type == _F.TYPE_MESSAGE and depth < 3:
            paths += [[f, *p] for p in _string_paths(f.message_type, depth + 1)]
    return paths


def _wrap(path: list[FieldDescriptor], leaf: bytes) -> bytes:
    """``leaf`` (already tagged for path[-1]) nested inside the message fields of ``path[:-1]``."""
    for f in reversed(path[:-1]):
        leaf = tag(f.number, LEN) + varint(len(leaf)) + leaf
    return leaf


def random_bytes(desc: Descriptor, rng: random.Random) -> bytes:
    return rng.randbytes(rng.choice([1, 2, 7, 64, 512, 4096]))


def wrong_wire_type(desc: Descriptor, rng: random.Random) -> bytes:
    if not desc.fields:
        return tag(rng.randint(1, 50), SGROUP)  # an unterminated group
    f = rng.choice(desc.fields)
    w = rng.choice([x for x in (VARINT, I64, LEN, I32) if x != wire_type(f)])
    body = {VARINT: varint(rng.getrandbits(64)), I64: rng.randbytes(8), I32: rng.randbytes(4)}.get(w)
    if body is None:
        raw = rng.randbytes(rng.randint(0, 32))
        body = varint(len(raw)) + raw
    return tag(f.number, w) + body


def invalid_utf8(desc: Descriptor, rng: random.Random) -> bytes:
    paths = _string_paths(desc)
    bad = rng.choice([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"ok\x80", b"\xf8\x88\x80\x80\x80"])
    if not paths:
        return tag(1, LEN) + varint(len(bad)) + bad  # field 1 if there is no string field: unknown or wrong type
    path = rng.choice(paths)
    return _wrap(path, tag(path[-1].number, LEN) + varint(len(bad)) + bad)


def repeated_sizes(desc: Descriptor, rng: random.Random) -> bytes:
    """A repeated field with none, empty or very many entries."""
    reps = [f for f in desc.fields if f.is_repeated]
    if not reps:
        return b"".join(tag(f.number, wire_type(f)) + _value(f, rng) for f in desc.fields) * rng.randint(1, 200)
    f = rng.choice(reps)
    n = rng.choice([0, 1, 1_000, 20_000])
    entry = b"\x00" if f.type == _F.TYPE_MESSAGE and rng.random() < 0.5 else b""
    if wire_type(f) == LEN:
        return (tag(f.number, LEN) + varint(len(entry)) + entry) * n
    packed = _value(f, rng)[:10] * n  # packed scalars
    return tag(f.number, LEN) + varint(len(packed)) + packed


def extreme_numbers(desc: Descriptor, rng: random.Random) -> bytes:
    """NaN/±inf doubles and floats, negative and huge integers, in every numeric field at once."""
    out = b""
    for f in desc.fields:
        if f.type in (_F.TYPE_DOUBLE, _F.TYPE_FLOAT):
            fmt = "<d" if f.type == _F.TYPE_DOUBLE else "<f"
            out += tag(f.number, wire_type(f)) + struct.pack(fmt, rng.choice(EXTREME_FLOATS[:3] + (1e300,)))
        elif f.type in _INTS or f.type == _F.TYPE_BOOL:
            out += tag(f.number, VARINT) + varint(rng.choice(EXTREME_INTS))
    return out or random_bytes(desc, rng)


def unknown_enums(desc: Descriptor, rng: random.Random) -> bytes:
    out = b""
    for f in desc.fields:
        if f.type == _F.TYPE_ENUM:
            out += tag(f.number, VARINT) + varint(rng.choice([999, -1, 2**31 - 1, 7, 64]))
    return out or tag(rng.randint(100, 10_000), VARINT) + varint(rng.getrandbits(63))  # an unknown field


def deep_nesting(desc: Descriptor, rng: random.Random) -> bytes:
    """Groups or message fields nested past protobuf's recursion limit (100)."""
    depth = rng.choice([101, 200, 2_000])
    msgs = [f for f in desc.fields if f.type == _F.TYPE_MESSAGE]
    if msgs and rng.random() < 0.5:  # the same field number over and over: each level parses as the message type
        f = rng.choice(msgs)
        inner = b""
        for _ in range(depth):
            inner = tag(f.number, LEN) + varint(len(inner)) + inner
        return inner
    n = rng.randint(1000, 5000)  # an unknown field: nested start-group markers
    return tag(n, SGROUP) * depth + tag(n, EGROUP) * depth


def truncated(desc: Descriptor, rng: random.Random) -> bytes:
    whole = hostile_message(desc, rng).SerializeToString() or tag(1, LEN) + varint(5) + b"abcde"
    return whole[: rng.randint(0, max(0, len(whole) - 1))] if len(whole) > 1 else tag(1, LEN)


def lying_length(desc: Descriptor, rng: random.Random) -> bytes:
    f = rng.choice(desc.fields) if desc.fields else None
    number = f.number if f is not None else 1
    return tag(number, LEN) + varint(rng.choice([2**31, 2**32 + 5, 2**62, 1000])) + b"short"


def huge_string(desc: Descriptor, rng: random.Random) -> bytes:
    paths = _string_paths(desc)
    body = b"A" * rng.choice([70_000, 1_000_000, 3_000_000])
    if not paths:
        return tag(rng.randint(100, 200), LEN) + varint(len(body)) + body
    path = rng.choice(paths)
    return _wrap(path, tag(path[-1].number, LEN) + varint(len(body)) + body)


def fillable(msg, field: FieldDescriptor) -> bool:
    """Can ``field`` be set on ``msg`` now: not a map (left empty), not a second member of a set oneof."""
    if field.containing_oneof is not None and msg.WhichOneof(field.containing_oneof.name):
        return False
    return not (field.message_type is not None and field.message_type.GetOptions().map_entry)


def hostile_message(desc: Descriptor, rng: random.Random, depth: int = 0):
    """A well-formed message with a hostile value in every field (3 message levels deep; 300 entries at most in
    a repeated field, and nested lists of messages short)."""
    msg = GetMessageClass(desc)()
    for f in desc.fields:
        if not fillable(msg, f):
            continue
        repeated = f.is_repeated
        many = 300 if f.type != _F.TYPE_MESSAGE else (20 if depth == 0 else 3)  # not 300^depth messages
        n = rng.choice([0, 1, 3, many]) if repeated else 1
        for _ in range(n):
            if f.type == _F.TYPE_MESSAGE:
                if depth >= 3:
                    break
                sub = hostile_message(f.message_type, rng, depth + 1)
                (getattr(msg, f.name).add().CopyFrom(sub) if repeated else getattr(msg, f.name).CopyFrom(sub))
                continue
            value = _hostile_scalar(f, rng)
            if value is None:
                continue
            if repeated:
                getattr(msg, f.name).append(value)
            else:
                setattr(msg, f.name, value)
    return msg


def _hostile_scalar(f: FieldDescriptor, rng: random.Random):
    t = f.type
    if t == _F.TYPE_STRING:  # long texts rarely: a message of 300 x 100 kB strings tests transfer, not validation
        return rng.choice(HOSTILE_TEXT) if rng.random() < 0.1 else rng.choice(HOSTILE_TEXT[:4] + HOSTILE_TEXT[6:12])
    if t == _F.TYPE_BYTES:
        return rng.randbytes(rng.randint(0, 64))
    if t == _F.TYPE_BOOL:
        return rng.random() < 0.5
    if t in (_F.TYPE_DOUBLE, _F.TYPE_FLOAT):
        return rng.choice(EXTREME_FLOATS)
    if t == _F.TYPE_ENUM:
        return rng.choice([999, -1, 0, *[v.number for v in f.enum_type.values]])
    bits = 32 if t in (_F.TYPE_INT32, _F.TYPE_SINT32, _F.TYPE_SFIXED32, _F.TYPE_UINT32, _F.TYPE_FIXED32) else 64
    unsigned = t in (_F.TYPE_UINT32, _F.TYPE_UINT64, _F.TYPE_FIXED32, _F.TYPE_FIXED64)
    lo, hi = (0, 2**bits - 1) if unsigned else (-(2**(bits - 1)), 2**(bits - 1) - 1)
    return rng.choice([lo, hi, 0, -1 if not unsigned else 1, 7])


def hostile_values(desc: Descriptor, rng: random.Random) -> bytes:
    return hostile_message(desc, rng).SerializeToString()


KINDS = {f.__name__: f for f in (random_bytes, wrong_wire_type, invalid_utf8, repeated_sizes, extreme_numbers,
                                 unknown_enums, deep_nesting, truncated, lying_length, huge_string, hostile_values)}


def malformed(desc: Descriptor, n: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """``n`` (kind, request bytes) for ``desc``, cycling through every kind (huge strings and very long repeated
    fields are rarer: they cost transfer, not insight)."""
    rng = random.Random(f"{desc.full_name}:{seed}")
    names = sorted(KINDS)
    for i in range(n):
        kind = names[i % len(names)] if i < len(names) else rng.choice(names)
        if kind == "huge_string" and i >= len(names) and rng.random() < 0.97:
            kind = "hostile_values"
        yield kind, KINDS[kind](desc, rng)
