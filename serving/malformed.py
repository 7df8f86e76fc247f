"""Requests that do not parse: answered INVALID_ARGUMENT naming what is wrong, instead of
gRPC's INTERNAL "Exception deserializing request".

protobuf's parser (upb) says only that a message did not parse; the commonest cause a user
can fix, a string field that is not UTF-8, is found by walking the wire format against the
message's descriptor (`bad_string`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from serving.errors import InvalidArgument


@dataclass(frozen=True)
class Malformed:
    """A request that did not parse; the handler answers INVALID_ARGUMENT with `error`."""

    type_name: str
    error: str


def lenient(message_class: Any) -> Callable[[bytes], Any]:
    """A request deserializer that returns `Malformed` where protobuf raises."""

    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as error:
            descriptor = message_class.DESCRIPTOR
            why = bad_string(descriptor, data) or str(error)
            return Malformed(descriptor.full_name, why)

    return parse


def check_parsed(request: object) -> None:
    if isinstance(request, Malformed):
        raise InvalidArgument(f"request is not a valid {request.type_name}: {request.error}")


def bad_string(descriptor: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """'field X is not valid UTF-8' for the first string field (nested messages included)
    of `data` whose bytes are not UTF-8; None if there is none, or if `data` is not even
    well-formed wire format (protobuf's own message says so)."""
    position = 0
    try:
        while position < len(data):
            key, position = varint(data, position)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, position = varint(data, position)
            elif wire_type in (1, 5):
                position += 8 if wire_type == 1 else 4
            elif wire_type == 2:
                size, position = varint(data, position)
                value, position = data[position : position + size], position + size
                field = descriptor.fields_by_number.get(number)
                if field is None:
                    continue
                name = prefix + field.name
                if field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        value.decode("utf-8")
                    except UnicodeDecodeError:
                        return f"field {name!r} is not valid UTF-8"
                elif field.type == FieldDescriptor.TYPE_MESSAGE:
                    found = bad_string(field.message_type, value, name + ".")
                    if found:
                        return found
            else:
                return None  # groups, or not wire format at all
    except IndexError:
        return None
    return None


def varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
