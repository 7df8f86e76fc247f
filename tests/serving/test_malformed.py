"""A request that does not parse is named: `serving.malformed` finds the string field that is
not UTF-8 (protobuf's upb parser only says the message did not parse)."""

from __future__ import annotations

import pytest

from protos import memserve_pb2
from protos.inference import grpc_service_pb2 as v2
from serving.errors import InvalidArgument
from serving.malformed import Malformed, bad_string, check_parsed, lenient

NOT_UTF8 = b"\xff\xfe"


def with_bad_text(good: bytes, number: int) -> bytes:
    """`good` plus length-delimited field `number` holding bytes that are not UTF-8."""
    return good + bytes([number << 3 | 2, len(NOT_UTF8)]) + NOT_UTF8


def test_a_top_level_string_that_is_not_utf8_is_named() -> None:
    good = memserve_pb2.GenerateRequest(session_id="s", max_tokens=4).SerializeToString()
    data = with_bad_text(
        good, memserve_pb2.GenerateRequest.DESCRIPTOR.fields_by_name["text"].number
    )
    parsed = lenient(memserve_pb2.GenerateRequest)(data)
    assert parsed == Malformed("memserve.v1.GenerateRequest", "field 'text' is not valid UTF-8")
    with pytest.raises(InvalidArgument, match="GenerateRequest: field 'text' is not valid UTF-8"):
        check_parsed(parsed)


def test_a_nested_string_is_named_with_its_path() -> None:
    tensor = v2.ModelInferRequest.InferInputTensor(datatype="FP32", shape=[1])
    inner = with_bad_text(tensor.SerializeToString(), 1)  # field 1: name
    request = v2.ModelInferRequest(model_name="ntm-copy").SerializeToString()
    data = request + bytes([5 << 3 | 2, len(inner)]) + inner  # field 5: inputs
    assert bad_string(v2.ModelInferRequest.DESCRIPTOR, data) == (
        "field 'inputs.name' is not valid UTF-8"
    )
    assert isinstance(lenient(v2.ModelInferRequest)(data), Malformed)


def test_well_formed_requests_parse_and_garbage_keeps_protobufs_message() -> None:
    good = memserve_pb2.GenerateRequest(session_id="é", text="ünï").SerializeToString()
    assert bad_string(memserve_pb2.GenerateRequest.DESCRIPTOR, good) is None
    assert lenient(memserve_pb2.GenerateRequest)(good).text == "ünï"
    garbage = b"\x0a\xff\xff\xff\xff\x0f"  # a length far past the end
    parsed = lenient(memserve_pb2.GenerateRequest)(garbage)
    assert isinstance(parsed, Malformed) and "not valid UTF-8" not in parsed.error
    check_parsed(memserve_pb2.GenerateRequest())  # a parsed message passes
