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

from runmap.exceptions import ConfigError

TARGET_SECONDS = 0.05  # one request's duration that makes its overhead negligible
MAX_CHUNK = 16384
MAX_PAYLOAD_BYTES = 8 << 20  # above this, a bigger chunk buys nothing but memory


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
    """Chunk sizes that track how long inputs take (``chunksize="auto"``)."""

    def __init__(self, slots: int, target: float = TARGET_SECONDS) -> None:
        self.slots = max(1, slots)
        self.target = target
        self.per_input: float | None = None  # seconds per input, smoothed
        self.bytes_per_input: float | None = None

    def next_size(self, remaining: int | None) -> int:
        if self.per_input is None:
            size = 1
        else:
            size = int(self.target / max(self.per_input, 1e-9))
            if self.bytes_per_input:
                size = min(size, int(MAX_PAYLOAD_BYTES / self.bytes_per_input))
        if remaining is not None:
            # Leave at least two chunks per slot for the end of the map.
            size = min(size, math.ceil(remaining / (2 * self.slots)))
        return max(1, min(size, MAX_CHUNK))

    def record(self, count: int, seconds: float, payload_bytes: int) -> None:
        per = seconds / max(count, 1)
        # Smoothing, but biased to the latest: a map whose inputs turn slow must
        # stop sending big chunks at once.
        self.per_input = per if self.per_input is None or per > self.per_input else 0.5 * (self.per_input + per)
        bpi = payload_bytes / max(count, 1)
        self.bytes_per_input = bpi if self.bytes_per_input is None else 0.5 * (self.bytes_per_input + bpi)


def chunker(chunksize: int | str | None, slots: int) -> FixedChunks | AdaptiveChunks:
    if chunksize is None or chunksize == "auto":
        return AdaptiveChunks(slots)
    if isinstance(chunksize, str):
        raise ConfigError(f"chunksize must be a positive int or 'auto', not {chunksize!r}")
    return FixedChunks(chunksize)
