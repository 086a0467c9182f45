"""The marked sections of docs/benchmarks.md that the cluster benchmarks write, each its own.

``benchmarks/run.py`` regenerates the rest of the file and keeps these sections as they are.
"""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def write_section(text: str, begin: str, end: str, doc: Path = DOC) -> None:
    """Puts ``text`` (which starts with ``begin`` and ends with ``end``) in place of the section, or at the end."""
    old = doc.read_text()
    if begin in old:
        new = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: text, old, flags=re.S)
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    doc.write_text(new)
