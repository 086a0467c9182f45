"""The progress bar: ``tqdm.auto``, so a notebook gets a widget and a terminal text.

It tells the story of a map as it runs: tqdm's own items/s and ETA, and, once
anything went wrong, a postfix such as ``retried=2 replaced=1 errors=3``:
inputs run again (after their replica died, or their code raised an error
in ``retry_exceptions``), replicas replaced, and errors returned in-band
(``return_exceptions=True``).
"""

from __future__ import annotations

from typing import Any


class Progress:
    """A bar over ``total`` inputs (None when the input is a generator), or nothing."""

    def __init__(self, enabled: bool, total: int | None, desc: str) -> None:
        self._bar: Any = None
        self._counts = (0, 0, 0)
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="it", dynamic_ncols=True, leave=True)

    def update(self, n: int) -> None:
        if self._bar is not None and n:
            self._bar.update(n)

    def story(self, retried: int, replaced: int, errors: int) -> None:
        """Shows the counts of trouble so far, once there is any."""
        counts = (retried, replaced, errors)
        if self._bar is None or counts == self._counts or not any(counts):
            return
        self._counts = counts
        self._bar.set_postfix_str(f"retried={retried} replaced={replaced} errors={errors}", refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
