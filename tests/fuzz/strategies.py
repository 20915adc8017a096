"""Hypothesis strategies for well-formed protobuf requests, drawn from a message descriptor: every field optional,
values over their whole wire range (NaN and infinities in doubles, unknown enum numbers in open enums), short
repeated fields, messages nested 3 deep, oneofs with one member set."""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

from tests.fuzz.hostile import fillable

_F = FieldDescriptor
_RANGES = {
    _F.TYPE_INT32: (-(2**31), 2**31 - 1), _F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    _F.TYPE_SFIXED32: (-(2**31), 2**31 - 1), _F.TYPE_INT64: (-(2**63), 2**63 - 1),
    _F.TYPE_SINT64: (-(2**63), 2**63 - 1), _F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    _F.TYPE_UINT32: (0, 2**32 - 1), _F.TYPE_FIXED32: (0, 2**32 - 1), _F.TYPE_UINT64: (0, 2**64 - 1),
    _F.TYPE_FIXED64: (0, 2**64 - 1),
}


def scalar(field: FieldDescriptor) -> st.SearchStrategy:
    t = field.type
    if t == _F.TYPE_STRING:
        return st.text(max_size=60)
    if t == _F.TYPE_BYTES:
        return st.binary(max_size=60)
    if t == _F.TYPE_BOOL:
        return st.booleans()
    if t == _F.TYPE_DOUBLE:
        return st.floats()
    if t == _F.TYPE_FLOAT:
        return st.floats(width=32)
    if t == _F.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values]) | st.integers(-3, 1000)
    lo, hi = _RANGES[t]
    return st.integers(lo, hi) | st.integers(-2, 64).filter(lambda v: lo <= v <= hi)


@st.composite
def _message(draw, desc: Descriptor, depth: int):
    msg = GetMessageClass(desc)()
    for f in desc.fields:
        if not fillable(msg, f) or (f.type == _F.TYPE_MESSAGE and depth >= 3):
            continue
        if not draw(st.booleans()):
            continue
        value = messages(f.message_type, depth + 1) if f.type == _F.TYPE_MESSAGE else scalar(f)
        if f.is_repeated:
            items = draw(st.lists(value, max_size=4))
            target = getattr(msg, f.name)
            for item in items:
                target.add().CopyFrom(item) if f.type == _F.TYPE_MESSAGE else target.append(item)
        elif f.type == _F.TYPE_MESSAGE:
            getattr(msg, f.name).CopyFrom(draw(value))
        else:
            setattr(msg, f.name, draw(value))
    return msg


def messages(desc: Descriptor, depth: int = 0) -> st.SearchStrategy:
    """Well-formed messages of ``desc`` (3 message levels deep at most)."""
    return _message(desc, depth)
