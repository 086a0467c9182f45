"""The progress bar tells the story of a map: items/s, ETA, and counts of trouble as it happens."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest

import runmap as rm


class Refused(Exception):
    pass


def crash_once_then_check(x: int, marker: str) -> int:
    """Input 5 kills its replica the first time; multiples of 4 raise."""
    if x == 5 and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)
    if x % 4 == 0:
        raise Refused(f"refused {x}")
    return x


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every tqdm bar a map makes, writing to a StringIO instead of the terminal."""
    import tqdm
    import tqdm.auto

    made: list[Any] = []

    class RecordedBar(tqdm.tqdm):  # type: ignore[type-arg]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["file"] = io.StringIO()
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordedBar)
    return made


def test_the_bar_counts_retried_inputs_replaced_replicas_and_errors(bars: list[Any], tmp_path: Path) -> None:
    marker = str(tmp_path / "crashed")
    with rm.mapper(crash_once_then_check, num_replicas=2) as m:
        results = m.map(range(12), progress=True, chunksize=1, return_exceptions=True, kwargs={"marker": marker})
    assert [r for r in results if not isinstance(r, Exception)] == [1, 2, 3, 5, 6, 7, 9, 10, 11]
    assert [str(r) for r in results if isinstance(r, Exception)] == ["refused 0", "refused 4", "refused 8"]
    (bar,) = bars
    fmt = bar.format_dict
    assert fmt["n"] == 12 and fmt["total"] == 12 and fmt["unit"] == "it"
    assert fmt["rate"] is None or fmt["rate"] > 0  # tqdm's own items/s and ETA
    assert fmt["postfix"] == "retried=1 replaced=1 errors=3"
    assert "retried=1 replaced=1 errors=3" in bar.fp.getvalue()
    assert "it/s" in bar.fp.getvalue() or "s/it" in bar.fp.getvalue()


def test_a_quiet_map_has_no_postfix(bars: list[Any]) -> None:
    with rm.mapper(abs, num_replicas=1) as m:
        assert m.map([-1, -2, -3], progress=True) == [1, 2, 3]
    (bar,) = bars
    assert not bar.format_dict["postfix"]


def test_retry_exceptions_count_as_retried(bars: list[Any], tmp_path: Path) -> None:
    with rm.mapper(crash_once_then_check, num_replicas=1, retry_exceptions=Refused, retries=2) as m:
        results = m.map([1, 4], progress=True, return_exceptions=True, kwargs={"marker": str(tmp_path / "m")})
    assert results[0] == 1 and isinstance(results[1], Refused)
    assert bars[0].format_dict["postfix"] == "retried=2 replaced=0 errors=1"
