"""Properties of the chunk reordering behind ``Client.request_stream`` (pure logic, no Redis)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from streamqueue.client import ChunkOrder


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[str], list[int]]:
    """Chunk texts and an arrival order: a shuffle, with some chunks delivered again (redelivery)."""
    parts = draw(st.lists(st.text(max_size=5), min_size=1, max_size=30))
    order = draw(st.permutations(range(len(parts))))
    repeats = draw(st.lists(st.sampled_from(range(len(parts))), max_size=10))
    arrival = list(order)
    for seq in repeats:
        arrival.insert(draw(st.integers(0, len(arrival))), seq)
    return parts, arrival


@given(deliveries())
def test_chunks_come_out_once_each_in_sequence_order(case: tuple[list[str], list[int]]) -> None:
    parts, arrival = case
    order = ChunkOrder()
    out = [chunk for seq in arrival for chunk in order.add(seq, parts[seq])]
    assert out == parts
    assert order.next_seq == len(parts)


@given(st.lists(st.text(max_size=5), max_size=20))
def test_chunks_without_sequence_numbers_keep_arrival_order(parts: list[str]) -> None:
    order = ChunkOrder()
    assert [chunk for part in parts for chunk in order.add(None, part)] == parts


def test_nothing_is_released_until_the_gap_is_filled() -> None:
    order = ChunkOrder()
    assert order.add(2, "c") == []
    assert order.add(1, "b") == []
    assert order.add(0, "a") == ["a", "b", "c"]
