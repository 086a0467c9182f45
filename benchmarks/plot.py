"""The plot of ``docs/benchmarks.md``: throughput by chunk size (j), and overhead by slot count (h).

    python benchmarks/plot.py docs/benchmarks.json docs/benchmarks.png

``benchmarks/run.py`` calls :func:`plot` with the medians of its run; run
alone, this redraws the plot from the rounds a run saved.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from cases import CHUNKS, SLOT_SHAPES

STYLE = {  # implementation -> (label, colour)
    "runmap": ("runmap", "tab:blue"),
    "pool": ("multiprocessing.Pool", "tab:orange"),
    "ppe": ("ProcessPoolExecutor", "tab:green"),
    "joblib": ("joblib (loky)", "tab:red"),
    "dask": ("Dask LocalCluster", "tab:purple"),
    "ray_pool": ("Ray util.multiprocessing.Pool", "tab:brown"),
}


def plot(res: dict[str, dict[str, Any]], path: Path) -> bool:
    """Draws ``path`` from a run's medians; False when matplotlib or the cases are missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    chunks, scale = res.get("j", {}), res.get("h", {})
    if not chunks and not scale:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))

    for impl, r in chunks.items():
        if "error" in r:
            continue
        label, colour = STYLE[impl]
        left.plot(CHUNKS, [r[f"c{c}"] for c in CHUNKS], marker="o", label=label, color=colour)
    for impl in ("dask", "ray_pool"):  # no chunk size: one task per item, or their own default chunks
        r = res.get("a", {}).get(impl)
        if r and "error" not in r:
            label, colour = STYLE[impl]
            left.axhline(r["value"], linestyle=":", color=colour, label=f"{label} (a)")
    left.set(xscale="log", yscale="log", xlabel="chunk size (inputs per request)", ylabel="trivial items/s",
             title="(j) throughput on 2 workers, by chunk size")
    left.grid(True, which="major", alpha=0.3)
    left.legend(fontsize=8)

    for kind in ("runmap", "pool"):
        points = [(n, scale[f"{kind}_{n}"]["value"]) for n in SLOT_SHAPES
                  if f"{kind}_{n}" in scale and "error" not in scale[f"{kind}_{n}"]]
        if points:
            label, colour = STYLE[kind]
            right.plot(*zip(*points, strict=True), marker="o", label=label, color=colour)
    right.set(xscale="log", xlabel="slots (calls in flight at once)", ylabel="µs of wall time per input",
              title="(h) chunksize-1 dispatch, by slot count", ylim=(0, None))
    right.set_xticks(list(SLOT_SHAPES), [str(n) for n in SLOT_SHAPES])
    right.grid(True, alpha=0.3)
    right.legend(fontsize=8)

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def medians(raw: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, Any]]:
    """A saved run's rounds, reduced to medians as ``run.py`` reduces them."""
    out: dict[str, dict[str, Any]] = {}
    for case, impls in raw.items():
        for impl, rounds in impls.items():
            ok = [r for r in rounds if "error" not in r]
            if ok:
                keys = [k for k, v in ok[0].items() if isinstance(v, (int, float))]
                out.setdefault(case, {})[impl] = {k: statistics.median(r[k] for r in ok) for k in keys}
    return out


if __name__ == "__main__":
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    sys.exit(0 if plot(medians(json.loads(source.read_text())), target) else 1)
