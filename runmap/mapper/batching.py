"""How many inputs go in one request.

A request costs a few hundred microseconds however small it is, so trivial
inputs must travel by the thousand; long inputs must travel one at a time, or
one slow chunk holds many inputs hostage while other replicas idle.
:class:`AdaptiveChunks` sizes chunks the way joblib sizes its batches: it
measures how long a chunk took per input and aims the next one at a target
duration, growing while calls are short and shrinking when they get long. When
the number of inputs is known, the tail is cut finer so every replica gets a
share of the end of the map.
"""

from __future__ import annotations

import math
from typing import TypeAlias

from runmap.exceptions import ConfigError

TARGET_SECONDS = 0.05  # one request's duration that makes its overhead negligible
MAX_CHUNK = 16384
MAX_PAYLOAD_BYTES = 8 << 20  # above this, a bigger chunk buys nothing but memory
# The end of a map is cut finer so every slot gets a share, but never below a
# chunk this long: splitting work that short balances nothing and costs a
# round trip (a few hundred µs) per piece.
TAIL_MIN_SECONDS = 0.005
# A chunk shorter than this says little about how long inputs take (its time
# is mostly the round trip), so alone it does not make later chunks smaller.
NOISE_SECONDS = TARGET_SECONDS / 10
# A chunk is at most this many times the largest one finished so far: sizes
# reach thousands within a few round trips, but a map that stops early (an
# ``imap`` over an endless generator, read five results deep) has read little.
GROWTH = 8
# The same bound when the number of inputs is known (they are all in hand): the
# time target alone would allow more while chunks are round-trip sized, and each
# step of eight costs a round trip (1, 64, 4096 instead of 1, 8, 64, 512, 4096
# saves ~1 ms of a 20k-input map).
KNOWN_GROWTH = 64
# A Mapper's next map starts at the pace its last one ended with, in chunks that
# would take at most this long at that pace (not one input each), and at least
# two chunks a slot: maps of trivial inputs skip the ramp, and a map whose inputs
# are far slower than the last map's holds inputs hostage in its first chunks
# only, as a ``Pool.map`` of them would (its chunks are a fourth of a worker's share).
# At 0.5 ms, a map of 20k trivial inputs on 2 replicas went out as four chunks of
# ~2.7k and a tail of ~9k that one replica ran while the other idled; at 1 ms its
# first four chunks are its even split (measured: 2.3-2.45 ms a map against 2.6-2.8).
REMEMBERED_SECONDS = 0.001


Pace: TypeAlias = "tuple[float, float | None]"  # seconds and bytes (None: not known) per input


class FixedChunks:
    """The user's ``chunksize``: every chunk the same size."""

    def __init__(self, size: int) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ConfigError(f"chunksize must be a positive int or 'auto', not {size!r}")
        self.size = size

    def next_size(self, remaining: int | None) -> int:
        return self.size

    def record(self, count: int, seconds: float, payload_bytes: int) -> None:
        pass


class AdaptiveChunks:
    """Chunk sizes that track how long inputs take (``chunksize="auto"``).

    The first chunks hold one input each: nothing is known yet, and one slow
    input must not take others hostage. Each finished chunk gives a time per
    input, and the next chunk is sized to take ``target`` seconds, growing at
    most ``GROWTH`` times over the largest chunk finished so far
    (``KNOWN_GROWTH`` times when the number of inputs is known). A faster
    measurement is believed at once (from one input's round trip to thousands
    per chunk takes two steps); a slower one at once too when its chunk was long
    enough to mean it, so a map whose inputs turn slow stops sending big chunks.
    """

    def __init__(self, slots: int, target: float = TARGET_SECONDS, pace: Pace | None = None) -> None:
        self.slots = max(1, slots)
        self.target = target
        self.per_input: float | None = None  # seconds per input
        self.bytes_per_input: float | None = None
        if pace is not None:  # the last map's: believed for the first chunks (REMEMBERED_SECONDS)
            self.per_input, self.bytes_per_input = pace
        self.largest_done = 0  # the most inputs a finished chunk held
        self.tail: int | None = None  # the size the end of the map is cut into, once it began

    @property
    def pace(self) -> Pace | None:
        """Seconds and bytes per input, as measured so far (None: nothing finished yet)."""
        return None if self.per_input is None else (self.per_input, self.bytes_per_input)

    def next_size(self, remaining: int | None) -> int:
        if self.per_input is None:
            return 1
        per = max(self.per_input, 1e-9)
        growth = GROWTH if remaining is None else KNOWN_GROWTH
        bound = growth * self.largest_done if self.largest_done else int(REMEMBERED_SECONDS / per)
        size = min(int(self.target / per), bound)
        if self.bytes_per_input:
            size = min(size, int(MAX_PAYLOAD_BYTES / self.bytes_per_input))
        if remaining is not None:
            # Leave at least two chunks per slot for the end of the map, unless
            # they would be too short to be worth a request each (going by this
            # map's own chunks: at a remembered pace, two a slot at least).
            # The share is taken once, when the end begins, and kept: taken
            # again at each read it would shrink with what is left (20k inputs
            # on 2 slots went out as 5000, 3750, 2813, 2110 and a last 6327
            # one replica ran alone).
            share = math.ceil(remaining / (2 * self.slots))
            cut = max(share, int(TAIL_MIN_SECONDS / per)) if self.largest_done else share
            if self.tail is None and cut < size:
                self.tail = cut
            if self.tail is not None:
                size = min(size, self.tail)
        return max(1, min(size, MAX_CHUNK))

    def record(self, count: int, seconds: float, payload_bytes: int) -> None:
        per = seconds / max(count, 1)
        self.largest_done = max(self.largest_done, count)
        if self.per_input is None or per <= self.per_input or seconds >= NOISE_SECONDS:
            self.per_input = per
        else:
            # A short chunk that looks slow: most likely a round trip that waited; half-believe it.
            self.per_input = 0.5 * (self.per_input + per)
        bpi = payload_bytes / max(count, 1)
        self.bytes_per_input = bpi if self.bytes_per_input is None else 0.5 * (self.bytes_per_input + bpi)


def chunker(chunksize: int | str | None, slots: int, pace: Pace | None = None) -> FixedChunks | AdaptiveChunks:
    """Chunk sizes for a map; ``pace``: the Mapper's last map's, which adaptive chunks start from."""
    if chunksize is None or chunksize == "auto":
        return AdaptiveChunks(slots, pace=pace)
    if isinstance(chunksize, str):
        raise ConfigError(f"chunksize must be a positive int or 'auto', not {chunksize!r}")
    return FixedChunks(chunksize)
