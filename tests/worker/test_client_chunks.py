"""Properties of the chunk reordering behind ``Client.request_stream`` (pure logic, no Redis)."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st
from streamqueue.client import Chunk, ChunkOrder
from streamqueue.client.replies import TextOrder


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


@st.composite
def cut_twice(draw: st.DrawFn) -> tuple[str, list[tuple[int, str]]]:
    """A reply's text and the entries two deliveries wrote, each cut at its own places (a worker
    joins the chunks that wait together), the first delivery stopping anywhere; arrival order:
    the first delivery's entries, then the second's."""
    text = draw(st.text(min_size=1, max_size=40))

    def entries(until: int) -> list[tuple[int, str]]:
        cuts = sorted(set(draw(st.lists(st.integers(1, max(until - 1, 1)), max_size=8))) - {until})
        bounds = [0, *[c for c in cuts if c < until], until]
        return [(a, text[a:b]) for a, b in pairwise(bounds) if b > a]

    first = entries(draw(st.integers(0, len(text))))
    return text, first + entries(len(text))


@given(cut_twice())
def test_text_order_gives_each_character_once_across_differently_cut_deliveries(
    case: tuple[str, list[tuple[int, str]]],
) -> None:
    text, arrivals = case
    order = TextOrder()
    out = [c for offset, part in arrivals for c in order.add(offset, Chunk(part, f"{offset}-0"))]
    assert "".join(out) == text
    assert order.next_offset == len(text)


def test_text_order_holds_text_back_until_the_gap_is_filled() -> None:
    order = TextOrder()
    assert order.add(3, Chunk("def", "2-0")) == []
    assert order.add(0, Chunk("abcd", "1-0")) == ["abcd", "ef"]  # the overlap is given once
    assert order.add(0, Chunk("ab", "1-1")) == []
    assert order.add(4, Chunk("efg", "3-0")) == ["g"]
