"""Chunk sizing: trivial inputs reach big chunks fast, long inputs travel alone."""

from __future__ import annotations

import heapq

import pytest

from runmap.exceptions import ConfigError
from runmap.mapper.batching import (
    GROWTH,
    KNOWN_GROWTH,
    MAX_CHUNK,
    MAX_PAYLOAD_BYTES,
    REMEMBERED_SECONDS,
    TAIL_MIN_SECONDS,
    AdaptiveChunks,
    FixedChunks,
    chunker,
)

ROUND_TRIP = 250e-6  # what one request costs on top of its inputs


def simulate(
    durations: list[float], slots: int, overhead: float = ROUND_TRIP, pace: tuple[float, float] | None = None
) -> tuple[float, list[int]]:
    """Runs a map through ``AdaptiveChunks`` on ``slots`` simulated replica slots.

    Like the Mapper: a window of ``2 × slots`` chunks in flight, each free slot
    takes the next queued chunk, and a chunk's time is the round trip plus its
    inputs. Returns the makespan and the chunk sizes in the order sent.
    """
    chunks = AdaptiveChunks(slots, pace=pace)
    sizes: list[int] = []
    queue: list[tuple[int, int]] = []  # (start, count) waiting for a slot
    running: list[tuple[float, int, int, float]] = []  # (end, start, count, began)
    free_at = [0.0] * slots
    now, read, n = 0.0, 0, len(durations)

    def fill() -> None:
        nonlocal read
        while read < n and len(queue) + len(running) < 2 * slots:
            size = min(chunks.next_size(n - read), n - read)
            sizes.append(size)
            queue.append((read, size))
            read += size

    def dispatch() -> None:
        for s in range(slots):
            if queue and free_at[s] <= now:
                start, count = queue.pop(0)
                end = now + overhead + sum(durations[start : start + count])
                free_at[s] = end
                heapq.heappush(running, (end, start, count, now))

    fill()
    dispatch()
    while running:
        end, start, count, began = heapq.heappop(running)
        now = end
        chunks.record(count, end - began, 8 * count)
        fill()
        dispatch()
    return now, sizes


def test_the_first_chunks_hold_one_input() -> None:
    chunks = AdaptiveChunks(slots=2)
    assert chunks.next_size(None) == 1
    assert chunks.next_size(1000) == 1


def test_trivial_inputs_reach_the_largest_chunks_within_a_few_round_trips() -> None:
    _, sizes = simulate([1e-6] * 200_000, slots=2)
    assert MAX_CHUNK in sizes[:24]
    assert len(sizes) < 60  # the end of the map is not cut into hundreds of tiny requests


def test_growth_is_bounded_by_the_largest_finished_chunk() -> None:
    chunks = AdaptiveChunks(slots=2)
    chunks.record(1, ROUND_TRIP, 8)
    assert chunks.next_size(None) == GROWTH
    chunks.record(GROWTH, ROUND_TRIP, 8 * GROWTH)
    assert chunks.next_size(None) == GROWTH * GROWTH


def test_a_known_number_of_inputs_grows_faster_while_chunks_are_round_trip_sized() -> None:
    chunks = AdaptiveChunks(slots=2)
    chunks.record(1, 1e-4, 8)  # one trivial input, a fast round trip
    assert chunks.next_size(1_000_000) == KNOWN_GROWTH
    chunks.record(KNOWN_GROWTH, 1e-4, 8 * KNOWN_GROWTH)
    assert chunks.next_size(1_000_000) == KNOWN_GROWTH**2
    slow = AdaptiveChunks(slots=2)
    slow.record(1, 0.01, 8)  # a 10 ms input: the time target, not the growth, bounds the next chunk
    assert slow.next_size(1_000_000) == 5


def test_one_slow_input_does_not_hold_others_hostage() -> None:
    # Issue 4: one 1 s input and ten 0.1 s inputs on 2 replicas finish in about 1 s.
    makespan, sizes = simulate([1.0] + [0.1] * 10, slots=2)
    assert makespan < 1.1
    assert set(sizes) == {1}


def test_long_inputs_balance_across_replicas() -> None:
    makespan, _ = simulate([0.02] * 60, slots=2)
    assert makespan < 0.02 * 60 / 2 * 1.05


def test_inputs_that_turn_slow_shrink_the_next_chunk_at_once() -> None:
    chunks = AdaptiveChunks(slots=2)
    chunks.record(1000, 0.001, 8000)
    assert chunks.next_size(None) > 1000
    chunks.record(1000, 2.0, 8000)  # a long chunk: believed at once
    assert chunks.next_size(None) == 25


def test_a_short_chunk_that_looks_slow_only_half_counts() -> None:
    chunks = AdaptiveChunks(slots=2)
    chunks.record(1000, 0.001, 8000)
    chunks.record(1, 0.001, 8)  # a round trip that waited: mostly noise
    assert chunks.per_input == pytest.approx(0.5 * (1e-6 + 1e-3))


def test_the_tail_is_cut_finer_but_not_into_pieces_shorter_than_a_few_ms() -> None:
    chunks = AdaptiveChunks(slots=2)
    chunks.largest_done = MAX_CHUNK
    chunks.per_input = 1e-3  # 1 ms inputs
    assert chunks.next_size(100_000) == 50  # target 50 ms
    assert chunks.next_size(40) == 10  # two chunks per slot for the end
    assert chunks.next_size(30) == 10  # ... of the same size: the end is cut once
    trivial = AdaptiveChunks(slots=2)
    trivial.largest_done = MAX_CHUNK
    trivial.per_input = 1e-6  # trivial inputs: a request costs more than splitting gains
    assert trivial.next_size(8_000) == int(TAIL_MIN_SECONDS / 1e-6)


def test_the_end_of_a_map_is_cut_into_equal_chunks() -> None:
    # Cut again at each read, 20k inputs on 2 slots went out as 5000, 3750, 2813, 2110 and a
    # last 6327 that one replica ran while the other idled.
    _, sizes = simulate([1e-7] * 20_000, slots=2, pace=(1e-7, 8.0))
    assert sizes == [5_000] * 4


def test_a_map_starts_at_the_pace_of_the_last_one_in_short_chunks() -> None:
    # The Mapper's last map ran 1 µs inputs: the next one skips the ramp from one input a chunk.
    chunks = AdaptiveChunks(slots=2, pace=(1e-6, 8.0))
    assert chunks.next_size(None) == int(REMEMBERED_SECONDS / 1e-6)
    assert chunks.next_size(20_000) == int(REMEMBERED_SECONDS / 1e-6)
    assert chunks.next_size(400) == 100  # at least two chunks a slot
    makespan, sizes = simulate([1e-6] * 20_000, slots=2, pace=(1e-6, 8.0))
    fresh, ramp = simulate([1e-6] * 20_000, slots=2)
    assert sizes[0] > 1 and len(sizes) < len(ramp) and makespan < fresh


def test_a_map_far_slower_than_the_last_one_is_still_spread_over_the_slots() -> None:
    # 1 µs inputs last time, 0.1 s ones now: no chunk holds more than a fourth of them.
    makespan, sizes = simulate([0.1] * 40, slots=2, pace=(1e-6, 8.0))
    assert max(sizes) == 10  # two chunks a slot
    assert makespan < 0.1 * 40 / 2 * 1.05


def test_large_inputs_are_capped_by_payload_size() -> None:
    chunks = AdaptiveChunks(slots=2)
    chunks.record(10, 1e-4, 10 * (4 << 20))  # 4 MB an input, fast
    chunks.largest_done = MAX_CHUNK
    assert chunks.next_size(None) == MAX_PAYLOAD_BYTES // (4 << 20)


def test_fixed_chunks_and_validation() -> None:
    assert FixedChunks(7).next_size(3) == 7
    assert isinstance(chunker(None, 2), AdaptiveChunks)
    assert isinstance(chunker("auto", 2), AdaptiveChunks)
    assert chunker(5, 2).next_size(None) == 5  # type: ignore[union-attr]
    for bad in (0, -1, True, 1.5, "big"):
        with pytest.raises(ConfigError):
            chunker(bad, 2)  # type: ignore[arg-type]
