"""ResponseReader: responses cut out of a stream however the network splits it.

A servlet's answers arrive in reads of any size: several answers in one read,
one answer over many, a large body beside small ones. Every way of cutting the
same bytes must give the same answers, in order, with their call ids.
"""

from __future__ import annotations

import random

import pytest

from runmap.transport import framing


def _response(call_id: int, status: int, body: bytes) -> bytes:
    return framing.RESPONSE.pack(call_id, status, len(body)) + body


ANSWERS = [
    (1, 200, b"small"),
    (7, 200, b""),
    (3, 422, b'{"detail": "bad"}'),
    (2, 200, bytes(range(256)) * (framing.SCRATCH // 256 * 3 + 1)),  # larger than the scratch buffer
    (9, 200, b"after the large one"),
    (4_000_000_000, 200, b"x" * (framing.SCRATCH - framing.RESPONSE.size)),  # exactly fills one scratch read
]
STREAM = b"".join(_response(*a) for a in ANSWERS)


def _read(stream: bytes, cuts: list[int]) -> list[tuple[int, int, bytes]]:
    """Feeds ``stream`` to a reader in pieces no larger than each cut (and than what it offers)."""
    reader, got, at = framing.ResponseReader(), [], 0
    sizes = iter(cuts)
    while at < len(stream):
        buffer = reader.buffer()
        n = min(len(buffer), next(sizes, len(stream)), len(stream) - at)
        buffer[:n] = stream[at : at + n]
        at += n
        got += [(i, s, bytes(b)) for i, s, b in reader.received(n)]
    return got


@pytest.mark.parametrize("piece", [1, 2, 13, 4096, 1 << 20])
def test_answers_come_out_whole_and_in_order_however_the_stream_is_cut(piece: int) -> None:
    assert _read(STREAM, [piece] * len(STREAM)) == ANSWERS


def test_random_cuts() -> None:
    rng = random.Random(15)
    for _ in range(20):
        cuts = [rng.choice([1, 7, 19, 500, 70_000, 300_000]) for _ in range(2000)]
        assert _read(STREAM, cuts) == ANSWERS


def test_a_large_body_is_received_in_place() -> None:
    reader = framing.ResponseReader()
    head = framing.RESPONSE.pack(5, 200, 10 * framing.SCRATCH)
    buffer = reader.buffer()
    buffer[: len(head) + 3] = head + b"abc"
    assert reader.received(len(head) + 3) == []
    in_place = reader.buffer()
    assert len(in_place) == 10 * framing.SCRATCH - 3  # straight into the body: what is left of it
