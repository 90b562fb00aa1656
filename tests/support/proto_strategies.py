"""Hypothesis strategies for any protobuf message, built by walking its descriptor.

Every field may be set or not, to any value its type can carry on the wire: integers over
their whole range (with the edges and small values more often), strings that are long,
unicode, with NUL and control characters, random bytes, enum numbers that exist and that
don't, timestamps and durations out of their valid ranges (they are plain messages of
int64 seconds and int32 nanos), several members of one oneof set in random order, maps,
repeated fields, and nested messages down to a depth. Fields can be steered with hints:
a strategy per field name (real account ids, say), mixed in with the arbitrary values so
that requests also get past the input checks and reach the database."""

from __future__ import annotations

import base64
import string
from collections.abc import Mapping
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

Hints = Mapping[str, st.SearchStrategy[Any]]

MAX_DEPTH = 3


def _integers(bits: int, signed: bool) -> st.SearchStrategy[int]:
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    edges = sorted({low, high, 0, 1, max(low, -1), 10**15, 10**15 + 1, 2**31, 2**31 - 1})
    return st.one_of(
        st.integers(max(low, -1000), min(high, 10**7)),
        st.sampled_from([e for e in edges if low <= e <= high]),
        st.integers(low, high),
    )


_INT_STRATEGIES = {
    FieldDescriptor.CPPTYPE_INT32: _integers(32, True),
    FieldDescriptor.CPPTYPE_INT64: _integers(64, True),
    FieldDescriptor.CPPTYPE_UINT32: _integers(32, False),
    FieldDescriptor.CPPTYPE_UINT64: _integers(64, False),
}

# Text as hostile as UTF-8 allows: NUL and control characters, right-to-left marks,
# astral-plane characters, SQL and format-string metacharacters, very long strings.
_WEIRD = [
    "",
    "\x00",
    "a\x00b",
    "\n\r\t",
    "'; DROP TABLE lots; --",
    "%s%s%n",
    "{}",
    "null",
    "\u202e\u200b",
    "\U0001f4a5" * 10,
    "../../etc/passwd",
    " ",
    "A" * 129,
    "0" * 65,
]
text_values = st.one_of(
    st.text(max_size=40),
    st.sampled_from(_WEIRD),
    st.text(alphabet=string.printable, max_size=200),
    st.text(min_size=1000, max_size=5000),
    st.integers(0, 10**30).map(str),
)
printable_keys = st.text(alphabet=[chr(c) for c in range(0x21, 0x7F)], min_size=1, max_size=128)
page_tokens = st.one_of(
    text_values,
    st.binary(max_size=200).map(lambda b: base64.urlsafe_b64encode(b).decode()),
    st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()),
)

DEFAULT_HINTS: dict[str, st.SearchStrategy[Any]] = {
    "idempotency_key": printable_keys,
    "page_token": page_tokens,
}


# Plain values, for requests that should get past the input checks.
_FRIENDLY_TEXT = st.text(alphabet=string.ascii_lowercase + string.digits, min_size=1, max_size=12)


def _friendly(field: FieldDescriptor, hints: Hints) -> st.SearchStrategy[Any]:
    hint = hints.get(field.name)
    if hint is not None:
        return hint
    cpp = field.cpp_type
    if cpp in _INT_STRATEGIES:
        return st.integers(1, 10**7)
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        return st.booleans()
    if cpp in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        return st.floats(0, 1000)
    if cpp == FieldDescriptor.CPPTYPE_ENUM:
        known = [v.number for v in field.enum_type.values if v.number != 0]
        return st.sampled_from(known or [0])
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=16)
    return _FRIENDLY_TEXT


def _scalar(field: FieldDescriptor, hints: Hints, friendly: bool) -> st.SearchStrategy[Any]:
    if friendly:
        return _friendly(field, hints)
    cpp = field.cpp_type
    if cpp in _INT_STRATEGIES:
        values = _INT_STRATEGIES[cpp]
    elif cpp == FieldDescriptor.CPPTYPE_BOOL:
        values = st.booleans()
    elif cpp == FieldDescriptor.CPPTYPE_DOUBLE:
        values = st.floats(allow_nan=True, allow_infinity=True)
    elif cpp == FieldDescriptor.CPPTYPE_FLOAT:
        values = st.floats(width=32, allow_nan=True, allow_infinity=True)
    elif cpp == FieldDescriptor.CPPTYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        values = st.one_of(st.sampled_from(known), _INT_STRATEGIES[FieldDescriptor.CPPTYPE_INT32])
    elif field.type == FieldDescriptor.TYPE_BYTES:
        values = st.binary(max_size=300)
    else:
        values = text_values
    hint = hints.get(field.name)
    if hint is None:
        return values
    # Mostly the hint (to get past the input checks), sometimes anything.
    return st.one_of(hint, hint, hint, values)


def _is_map(field: FieldDescriptor) -> bool:
    return bool(field.message_type is not None and field.message_type.GetOptions().map_entry)


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


# Well-known types in their valid ranges, for friendly requests (hostile ones get any
# int64 seconds and int32 nanos through the generic walk).
_NOW = 1_800_000_000


def _friendly_message(descriptor: Descriptor) -> st.SearchStrategy[Message] | None:
    cls = GetMessageClass(descriptor)
    if descriptor.full_name == "google.protobuf.Timestamp":
        return st.integers(_NOW - 10**8, _NOW + 10**8).map(lambda s: cls(seconds=s))
    if descriptor.full_name == "google.protobuf.Duration":
        return st.integers(1, 10**7).map(lambda s: cls(seconds=s))
    return None


def messages(
    descriptor: Descriptor,
    hints: Hints | None = None,
    depth: int = 0,
    friendly: bool | None = None,
) -> st.SearchStrategy[Message]:
    """Any message of this type (see the module docstring). About half of the top-level
    messages are "friendly": most fields set, to plain or hinted values, so that they get
    past the input checks; the others are hostile through and through."""
    merged: dict[str, st.SearchStrategy[Any]] = {**DEFAULT_HINTS, **(hints or {})}
    cls = GetMessageClass(descriptor)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        mode = draw(st.booleans()) if friendly is None else friendly
        if mode:
            special = _friendly_message(descriptor)
            if special is not None:
                return draw(special)
        message = cls()
        fields = list(descriptor.fields)
        # Random order: two members of a oneof are set in either order (the last one wins).
        order = draw(st.permutations(range(len(fields)))) if fields else []
        for index in order:
            field = fields[index]
            wanted = draw(st.integers(0, 9)) < 8 if mode else draw(st.booleans())
            if wanted:
                _set(draw, message, field, merged, depth, mode)
        return message

    return build()


def _set(
    draw: st.DrawFn, message: Any, field: FieldDescriptor, hints: Hints, depth: int, friendly: bool
) -> None:
    name = field.name
    if _is_map(field):
        key_field = field.message_type.fields_by_name["key"]
        value_field = field.message_type.fields_by_name["value"]
        for _ in range(draw(st.integers(0, 3))):
            key = draw(_scalar(key_field, {}, friendly))
            if value_field.message_type is not None:
                if depth >= MAX_DEPTH:
                    return
                value = draw(messages(value_field.message_type, hints, depth + 1, friendly))
                getattr(message, name)[key].CopyFrom(value)
            else:
                getattr(message, name)[key] = draw(_scalar(value_field, {}, friendly))
        return
    if field.message_type is not None:
        if depth >= MAX_DEPTH:
            return
        nested = messages(field.message_type, hints, depth + 1, friendly)
        if _is_repeated(field):
            for item in draw(st.lists(nested, max_size=3)):
                getattr(message, name).add().CopyFrom(item)
        else:
            getattr(message, name).CopyFrom(draw(nested))
        return
    if _is_repeated(field):
        values = st.lists(_scalar(field, hints, friendly), max_size=4)
        getattr(message, name).extend(draw(values))
        return
    setattr(message, name, draw(_scalar(field, hints, friendly)))
