"""The progress bar: ``tqdm.auto``, so a notebook gets a widget and a terminal text."""

from __future__ import annotations

from typing import Any


class Progress:
    """A bar over ``total`` inputs (None when the input is a generator), or nothing."""

    def __init__(self, enabled: bool, total: int | None, desc: str) -> None:
        self._bar: Any = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="it", dynamic_ncols=True, leave=True)

    def update(self, n: int) -> None:
        if self._bar is not None and n:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
