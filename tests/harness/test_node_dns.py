"""The node's DNS readiness probe: the query it sends and how it reads replies (RFC 1035 wire format)."""

from __future__ import annotations

import struct

import pytest
from streamqueue_harness.node.dns import a_query, a_records

NAME = "kubernetes.default.svc.cluster.local"


def _reply(query_id: int, rcode: int, answers: list[tuple[int, bytes]]) -> bytes:
    """A reply to ``a_query(NAME, query_id)``: each answer's owner is a pointer to the question's name."""
    question = a_query(NAME, query_id)[12:]
    header = struct.pack("!HHHHHH", query_id, 0x8180 | rcode, 1, len(answers), 0, 0)
    records = b"".join(
        struct.pack("!HHHIH", 0xC00C, rtype, 1, 30, len(data)) + data for rtype, data in answers
    )
    return header + question + records


def test_the_query_asks_for_the_a_records_of_the_name() -> None:
    query = a_query(NAME + ".", 0x1234)
    assert query[:12] == struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    assert query[12:] == b"\x0akubernetes\x07default\x03svc\x07cluster\x05local\x00\x00\x01\x00\x01"


def test_a_records_are_read_past_compressed_names_and_other_types() -> None:
    cname = b"\x03foo\xc0\x0c"
    reply = _reply(7, 0, [(5, cname), (1, bytes([10, 96, 0, 1])), (1, bytes([10, 96, 0, 2]))])
    assert a_records(reply, 7) == ["10.96.0.1", "10.96.0.2"]


@pytest.mark.parametrize(("query_id", "rcode"), [(8, 0), (7, 3), (7, 2)])
def test_no_addresses_from_another_query_nxdomain_or_servfail(query_id: int, rcode: int) -> None:
    assert a_records(_reply(7, rcode, [(1, bytes([10, 96, 0, 1]))]), query_id) == []
