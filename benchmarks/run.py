"""runmap side by side with its peers, in one run, on the same inputs.

    python benchmarks/run.py [--quick] [--rounds N] [--cases abc..] [--out docs/benchmarks.md]

Every (case, implementation) pair runs in a fresh subprocess
(``benchmarks/cases.py``), rounds are interleaved (round 1 of every pair, then
round 2, ...) so that a burst of load on the machine hits every column alike,
and the median of the rounds is reported. Ray, Dask and joblib columns appear
when they are importable (``pip install -e '.[bench]'``). The report, with the
ratios against the targets of issues 15 and 4, is written to
``docs/benchmarks.md`` (or ``--out``), beside it every round's figures
(``.json``) and the plot (``.png``, ``benchmarks/plot.py``).
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CASES_PY = HERE / "cases.py"
CASE_TIMEOUT = 600.0

HAVE = {
    "ray": importlib.util.find_spec("ray") is not None,
    "dask": importlib.util.find_spec("distributed") is not None,
    "joblib": importlib.util.find_spec("joblib") is not None,
}
HAVE_RAY = HAVE["ray"]

IMPLS: dict[str, list[str]] = {
    "a": ["runmap", "pool", "ppe", "joblib", "dask", "ray_pool"],
    "b": ["sequential", "runmap", "pool", "ppe", "joblib", "dask", "ray_actorpool", "ray_pool"],
    "c": ["runmap", "runmap_mapper_call", "pool", "ppe", "dask", "ray_actor"],
    "d": ["runmap", "pool", "ppe", "joblib", "dask", "ray_actorpool", "ray_pool"],
    "e": ["runmap", "pool", "ppe", "joblib", "dask", "ray_actorpool"],
    "f": ["runmap", "pool", "ppe"],
    "g": ["raw_socket", "runmap", "pool", "ppe", "ray_actorpool"],
    "h": ["runmap_8", "runmap_64", "runmap_256", "runmap_1024", "pool_8", "pool_64", "pool_256"],
    "i": ["runmap", "pool", "joblib", "dask", "ray_actor"],
    "j": ["runmap", "pool", "ppe", "joblib"],
}
SLOTS = (8, 64, 256, 1024)
# (e) times one fresh process, whose wall moved ±8 ms between back-to-back runs (a tenth of runmap's): each
# round takes the median of this many processes per peer, interleaved, but one of the peers that take a second.
E_PROCESSES = 7
E_ONCE = ("dask", "ray_actorpool")

LABELS = {
    "runmap": "runmap",
    "runmap_mapper_call": "runmap `Mapper.call`",
    "sequential": "sequential",
    "pool": "`multiprocessing.Pool`",
    "ppe": "`ProcessPoolExecutor`",
    "ray_pool": "Ray `util.multiprocessing.Pool`",
    "ray_actorpool": "Ray `ActorPool`",
    "ray_actor": "Ray actor, `ray.get` each call",
    "raw_socket": "raw TCP socket copy",
    "joblib": "joblib `Parallel(n_jobs=2)` (loky)",
    "dask": "Dask `LocalCluster` (2 workers)",
    **{f"runmap_{n}": f"runmap, {n} slots" for n in SLOTS},
    **{f"pool_{n}": f"`multiprocessing.Pool({n})`" for n in SLOTS},
}

TITLES = {
    "a": "(a) trivial items, 2 replicas: items/s",
    "b": "(b) ~20 ms pure-Python inputs, 2 replicas: speedup over sequential",
    "c": "(c) sequential calls of a method returning its argument: p50 µs (p99)",
    "d": "(d) 2 replicas × concurrency 4, chunksize 1: calls/s",
    "e": "(e) a whole short script: fresh interpreter, map 2 inputs on 2 workers, close, exit: s to the results",
    "f": "(f) items from a generator: client peak RSS growth over an empty map, MB",
    "g": "(g) 10 MB bytes inputs echoed back, 2 replicas: MB/s of input",
    "h": "(h) dispatch at scale, chunksize 1, trivial inputs: µs of wall time per input",
    "i": "(i) idle worker memory after a small map: RSS of the larger of 2 workers, MB",
    "j": "(j) trivial items on 2 workers, by fixed chunk size: items/s at the largest chunk (the plot has them all)",
}

NOTES = {
    "a": "`Pool.map` and Ray's Pool with their default chunks; `ProcessPoolExecutor` with chunksize 256 "
    "(its default of 1 runs at ~9k/s); joblib with its automatic batching; Dask `client.map` + `client.gather`, "
    "one task per item (2k items: its rate does not depend on the count). Start-up excluded; every peer warmed "
    "with one small map. Each round takes the median of 3 maps (Dask: one), in one process: one map of ~25 ms "
    "moved 15% between rounds; at a tenth of the items (runmap and Pool), the median of 15 maps: one map of a "
    "few ms is mostly the scheduler's noise.",
    "b": "Speedup = sequential seconds / parallel seconds, sequential measured in its own process, "
    "each round's parallel run paired with the same round's sequential one (median of the pairs shown).",
    "c": "runmap: a remote instance's method (`echo.echo(i)`); `Mapper.call` goes through the Mapper's "
    "dispatch thread. Peers: `Pool(1).apply`, `ProcessPoolExecutor(1).submit().result()`, "
    "Dask `client.submit().result()` (1 worker), `ray.get(actor.m.remote())`.",
    "d": "runmap: `imap(xs, chunksize=1)` on a Mapper with concurrency 4. Pool: `imap(chunksize=1)`. "
    "joblib `batch_size=1`. Dask `client.map` + `client.gather`, every call in flight at once. "
    "Ray `ActorPool.map` keeps one call in flight per actor; Ray and Dask run fewer calls (they are slower). "
    "Each round is the median of 5 runs in one process (Ray and Dask: one): one run moved from 60k to 110k calls/s.",
    "e": "To the results: from the parent's `Popen` (interpreter start-up and every import included) to the "
    "map's results; Ray includes `ray.init` and two actors, Dask a `LocalCluster` of 2 workers, joblib the start "
    "of its loky workers. Then `close` (runmap's `Mapper.close`, `Pool.terminate` as `with Pool` does, "
    "`ProcessPoolExecutor.shutdown`, `ray.shutdown`, Dask's client and cluster `close`, loky's executor "
    "`shutdown`) and `wall`, until the process has exited (exit hooks included). Each round is the median of "
    f"{E_PROCESSES} fresh processes per peer, interleaved (Dask and Ray: one).",
    "f": "Results consumed as they stream (`imap`), not kept. `Pool.imap` and `ProcessPoolExecutor.map` "
    "(chunksize 1000) read the whole generator ahead.",
    "g": "Each input is echoed back, so every MB crosses twice. Raw socket: two echo processes, two connections, "
    "one thread each, length-prefixed `sendall`/`recv_into`.",
    "h": "10k inputs, `imap(chunksize=1)`, replicas warmed by one map first. runmap slots = replicas × concurrency: "
    "8 = 2×4, 64 = 8×8, 256 = 16×16, 1024 = 64×16 (64 servlet processes on 2 vCPUs). Pool: that many worker "
    "processes. Also shown: the client's threads during the map and its peak RSS.",
    "i": "RSS (resident set, shared libraries included) 0.5 s after a 100-input map. runmap: a servlet "
    "(asyncio, uvloop, httptools); Pool's workers are forks of the client and share its pages.",
    "j": "The same map at chunk sizes 1 to 4096 (runmap `chunksize=`, `Pool.map`/`ProcessPoolExecutor.map` "
    "`chunksize=`, joblib `batch_size=`); Dask has no chunk size (one task per item: see (a)).",
}


def impls_for(case: str) -> list[str]:
    return [i for i in IMPLS[case] if HAVE.get(i.split("_")[0], True)]


def run_one(case: str, impl: str, quick: bool) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(CASES_PY), case, impl] + (["--quick"] if quick else [])
    env["BENCH_T0"] = repr(time.time())
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=CASE_TIMEOUT)
        wall = time.time() - float(env["BENCH_T0"])  # until it exited: its output closes then
    except subprocess.TimeoutExpired:
        out, err = b"", b"timed out"
        wall = CASE_TIMEOUT
    finally:
        # The case's own children (replicas, pool workers, Ray) share its session: end them all.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    for line in out.decode().splitlines():
        if line.startswith("BENCH "):
            return {**json.loads(line[6:]), "wall": wall}
    tail = err.decode(errors="replace").strip().splitlines()[-3:]
    return {"error": " | ".join(tail) or f"exit code {proc.returncode}"}


def median_record(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One round's record from several runs of a case: the median of each figure, over the runs that worked."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    keys = [k for k, v in ok[0].items() if isinstance(v, (int, float))]
    return {k: statistics.median(r[k] for r in ok) for k in keys}


def median_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return {"error": rounds[0]["error"], "n": 0}
    keys = [k for k, v in ok[0].items() if isinstance(v, (int, float))]
    merged = {k: statistics.median(r[k] for r in ok) for k in keys}
    merged["n"] = len(ok)
    merged["all"] = [r["value"] for r in ok]
    merged["rounds"] = [r.get("value") for r in rounds]  # None where a round failed
    merged["by_round"] = {k: [r.get(k) for r in rounds] for k in keys}
    return merged


def speedups(res: dict[str, dict[str, Any]], impl: str) -> list[float]:
    """(b): each round's sequential time over the same round's parallel time.

    Rounds are interleaved, so the two ran a few seconds apart; pairing them
    cancels most of the machine's changing load, which a ratio of medians would not.
    """
    seq = res.get("b", {}).get("sequential", {}).get("rounds", [])
    par = res.get("b", {}).get(impl, {}).get("rounds", [])
    return [s / p for s, p in zip(seq, par, strict=False) if s and p]


def speedup(res: dict[str, dict[str, Any]], impl: str) -> float | None:
    values = speedups(res, impl)
    return statistics.median(values) if values else None


# ------------------------------------------------------------------ report


def fmt(x: float) -> str:
    if x >= 100_000:
        return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.0f}k"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def get(res: dict[str, dict[str, Any]], case: str, impl: str, key: str = "value") -> float | None:
    r = res.get(case, {}).get(impl)
    if not r or "error" in r:
        return None
    return r.get(key)  # type: ignore[no-any-return]


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def rounds_of(res: dict[str, dict[str, Any]], case: str, impl: str, key: str = "value") -> list[float | None]:
    return res.get(case, {}).get(impl, {}).get("by_round", {}).get(key, [])  # type: ignore[no-any-return]


def worst_round_ratio(res: dict[str, dict[str, Any]], case: str, a: str, b: str, key: str = "value") -> float | None:
    """The smallest of the rounds' ratios of ``a`` over ``b`` (rounds are interleaved: paired by number)."""
    pairs = zip(rounds_of(res, case, a, key), rounds_of(res, case, b, key), strict=False)
    ratios = [x / y for x, y in pairs if x and y]
    return min(ratios) if ratios else None


Row = tuple[str, str, str, "bool | None"]


def table_row(rows: list[Row]) -> Callable[[str, float | None, str, float | None, bool | None, str], None]:
    """A function that appends a target's row to ``rows``: name, figure and unit, ratio and its wording, met."""

    def row(name: str, figure: float | None, unit: str, r: float | None, ok: bool | None, rtxt: str) -> None:
        fig = "n/a" if figure is None else f"{fmt(figure)} {unit}"
        rt = "n/a" if r is None else rtxt.format(r)
        rows.append((name, fig, rt, ok))

    return row


def targets(res: dict[str, dict[str, Any]]) -> list[Row]:
    """(target, figure, ratio, met) for each target of issue 15."""
    rows: list[Row] = []

    row = table_row(rows)

    def at_least(r: float | None, bound: float) -> bool | None:
        return None if r is None else r >= bound

    a = get(res, "a", "runmap")
    worst = worst_round_ratio(res, "a", "runmap", "pool")
    row("(a) ≥1.0× `Pool.map`, 200k items, every round", a, "items/s", worst, at_least(worst, 1.0),
        "{:.2f}× in the worst round")
    a20 = get(res, "a", "runmap", "small")
    worst20 = worst_round_ratio(res, "a", "runmap", "pool", "small")
    row("(a) ≥1.0× `Pool.map`, 20k items, every round", a20, "items/s", worst20, at_least(worst20, 1.0),
        "{:.2f}× in the worst round")

    d = get(res, "d", "runmap")
    r = ratio(d, get(res, "d", "pool"))
    row("(d) ≥1.0× `Pool.imap(chunksize=1)`", d, "calls/s", r, at_least(r, 1.0), "{:.2f}×")

    wall, pool_wall = get(res, "e", "runmap", "wall"), get(res, "e", "pool", "wall")
    r = ratio(wall, pool_wall)
    row("(e) whole script ≤2× `Pool`'s wall", wall, "s", r, None if r is None else r <= 2.0, "{:.2f}× Pool's")
    close = get(res, "e", "runmap", "close")
    r = ratio(close, get(res, "e", "pool", "close"))
    row("(e) `close()` in tens of ms (≤0.1 s)", close, "s", r, None if close is None else close <= 0.1,
        "{:.1f}× Pool's terminate")
    first = get(res, "e", "runmap")
    r = ratio(first, get(res, "e", "pool"))
    row("(e) to the results (no target: counts too)", first, "s", r, None, "{:.1f}× Pool's")

    h8, h1024 = get(res, "h", "runmap_8"), get(res, "h", "runmap_1024")
    r = ratio(h1024, h8)
    row("(h) per-input overhead at 1,024 slots ≤2× 8 slots'", h1024, "µs", r, None if r is None else r <= 2.0,
        "{:.2f}× 8 slots'")
    t8, t1024 = get(res, "h", "runmap_8", "threads"), get(res, "h", "runmap_1024", "threads")
    r = ratio(t1024, t8)
    row("(h) client threads do not grow with slots", t1024, "threads", r, None if r is None else r <= 1.5,
        f"{fmt(t8 or 0)} at 8 slots" + ": {:.0f}×")
    rss = get(res, "h", "runmap_1024", "rss_mb")
    r = ratio(rss, get(res, "h", "runmap_8", "rss_mb"))
    row("(h) client memory at 1,024 slots (no bound set)", rss, "MB", r, None, "{:.2f}× 8 slots'")

    i = get(res, "i", "runmap")
    r = ratio(get(res, "i", "ray_actor"), i)
    row("(i) idle replica ≤25 MB RSS", i, "MB", r, None if i is None else i <= 25, "a Ray actor: {:.1f}×")
    return rows


def targets_issue4(res: dict[str, dict[str, Any]]) -> list[Row]:
    """(target, figure, ratio, met) for each target of issue 4, still watched."""
    rows: list[Row] = []

    row = table_row(rows)

    a, ray_a = get(res, "a", "runmap"), get(res, "a", "ray_pool")
    r2 = ratio(a, ray_a)
    row("(a) ≥2× Ray `util.multiprocessing.Pool`", a, "items/s", r2, None if r2 is None else r2 >= 2, "{:.2f}×")

    sp, sp_pool = speedup(res, "runmap"), speedup(res, "pool")
    r = ratio(sp, sp_pool)
    row("(b) ≥0.98× `Pool`'s speedup", sp, "speedup", r, None if r is None else r >= 0.98, "{:.2f}× Pool's")

    c = get(res, "c", "runmap")
    p99 = "p99 " + fmt(get(res, "c", "runmap", "p99") or 0) + " µs"
    row("(c) p50 ≤ 250 µs", c, "µs", c, None if c is None else c <= 250, p99)

    d, ray_d = get(res, "d", "runmap"), get(res, "d", "ray_actorpool")
    r = ratio(d, ray_d)
    row("(d) ≥6,000 calls/s", d, "calls/s", d, None if d is None else d >= 6000, "—")
    row("(d) ≥4× Ray `ActorPool`", d, "calls/s", r, None if r is None else r >= 4, "{:.2f}×")

    e = get(res, "e", "runmap")
    ray_e = ratio(get(res, "e", "ray_actorpool"), e)
    row("(e) ≤ 1.0 s to the results", e, "s", ray_e, None if e is None else e <= 1.0, "Ray takes {:.1f}× as long")

    f = get(res, "f", "runmap")
    row("(f) within 100 MB of an empty map", f, "MB", f, None if f is None else f <= 100, "—")

    g, raw = get(res, "g", "runmap"), get(res, "g", "raw_socket")
    r = ratio(g, raw)
    row("(g) ≥0.5× raw-socket copy", g, "MB/s", r, None if r is None else r >= 0.5, "{:.2f}× raw")
    return rows


def case_rows(case: str, res: dict[str, dict[str, Any]]) -> list[str]:
    lines = [f"### {TITLES[case]}", "", NOTES[case], ""]
    lines += ["| implementation | figure | rounds | runmap's edge (>1: runmap better) |", "|---|---|---|---|"]
    base = get(res, case, "runmap")
    if case == "b":
        base = speedup(res, "runmap")
    for impl in impls_for(case):
        r = res.get(case, {}).get(impl)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {LABELS[impl]} | failed: {r['error'][:120]} | 0 | |")
            continue
        value = r["value"]
        shown, each = value, r["all"]
        if case == "b" and impl != "sequential":
            each = speedups(res, impl)
            shown = value = statistics.median(each) if each else 0.0
        fig = fmt(shown)
        if case == "b":
            fig += f" ({r['per_input_ms']:.1f} ms an input)" if impl == "sequential" else ""
        if case == "c":
            fig += f" (p99 {fmt(r['p99'])})"
        if case == "e":
            fig += f" (close {fmt(r['close'])}, wall {fmt(r['wall'])})"
        if case == "h":
            fig += f" ({fmt(r['threads'])} threads, {fmt(r['rss_mb'])} MB)"
        vs = ""
        if base and impl not in ("runmap", "sequential") and value:
            rel = base / value
            if case in ("c", "e", "f", "h", "i"):
                rel = value / base  # smaller is better: how many times runmap's figure
            vs = f"{rel:.2f}×"
        spread = ", ".join(fmt(v) for v in each)
        lines.append(f"| {LABELS[impl]} | {fig} | {spread} | {vs} |")
    lines.append("")
    if case == "j":
        lines += chunk_table(res)
    return lines


def chunk_table(res: dict[str, dict[str, Any]]) -> list[str]:
    """(j) in full: items/s at every chunk size, one row per implementation."""
    from cases import CHUNKS

    head = "| implementation | " + " | ".join(f"chunk {c:,}" for c in CHUNKS) + " |"
    lines = [head, "|---" * (1 + len(CHUNKS)) + "|"]
    for impl in impls_for("j"):
        r = res.get("j", {}).get(impl)
        if r and "error" not in r:
            lines.append(f"| {LABELS[impl]} | " + " | ".join(fmt(r[f"c{c}"]) for c in CHUNKS) + " |")
    return lines + [""]


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"Python {platform.python_version()}"]
    for pkg in ("runmap", "cloudpickle", "uvloop", "httptools", "ray", "dask", "distributed",
                "joblib"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    return ", ".join(parts)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} vCPUs ({cpu}), {platform.system()} {platform.release()}"


def report(
    res: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    load: tuple[float, float],
    wall: float,
    plot_name: str | None = None,
) -> str:
    lines = [
        "# Benchmarks: runmap side by side with its peers",
        "",
        "Generated by `make bench` (`benchmarks/run.py`); do not edit by hand.",
        "",
        f"- Machine: {machine()}.",
        f"- Versions: {versions()}.",
        f"- Run: {'quick smoke run, ' if args.quick else ''}{args.rounds} interleaved round(s), median shown, "
        f"each case in a fresh process, results checked; took {wall / 60:.1f} min.",
        f"- Load: 1-minute load average {load[0]:.2f} before and {load[1]:.2f} after the run, on "
        f"{os.cpu_count()} vCPUs. {args.load_note}".rstrip(),
        "" if HAVE_RAY else "- Ray is not installed: its columns are missing (`pip install 'ray[default]'`, re-run).",
        "",
    ]
    tables = (("Targets (issue 15)", targets(res)), ("Targets of issue 4, still watched", targets_issue4(res)))
    for title, rows in tables:
        lines += [f"## {title}", "", "| target | runmap | ratio | met |", "|---|---|---|---|"]
        for name, fig, rt, ok in rows:
            lines.append(f"| {name} | {fig} | {rt} | {'—' if ok is None else ('yes' if ok else '**no**')} |")
        lines.append("")
    if plot_name:
        lines += [
            "## Throughput by chunk size, and overhead by slot count",
            "",
            f"![items/s by chunk size (j), and µs per input by slot count (h)]({plot_name})",
            "",
        ]
    lines += ["## Figures", ""]
    for case in args.cases:
        if case in res:
            lines += case_rows(case, res)
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


def kept_sections(out: Path) -> str:
    """Sections of the old report that other scripts generate (benchmarks/remote_mapper.py): kept as they were."""
    import re

    old = out.read_text() if out.exists() else ""
    blocks = re.findall(r"<!-- [a-z-]+: generated by .*?<!-- /[a-z-]+ -->", old, flags=re.S)
    return "".join("\n" + block + "\n" for block in blocks)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small inputs, one round: a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, 1 with --quick)")
    parser.add_argument("--cases", default="".join(IMPLS), help="which cases, e.g. 'ac'")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--load-note", default="", help="a sentence on what else ran on the machine")
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.cases = [c for c in args.cases if c in IMPLS]

    # As an installed package is (pip compiles what it installs): an editable install has only
    # sources, and where PYTHONDONTWRITEBYTECODE is set every replica would compile runmap afresh.
    compileall.compile_dir(ROOT / "runmap", quiet=1)
    load0 = os.getloadavg()[0]
    started = time.monotonic()
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {c: {i: [] for i in impls_for(c)} for c in args.cases}
    for rnd in range(args.rounds):
        for case in args.cases:
            runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls_for(case)}
            times = {impl: 0.0 for impl in runs}
            for k in range(E_PROCESSES if case == "e" else 1):
                for impl in runs:
                    if k == 0 or impl not in E_ONCE:
                        t = time.monotonic()
                        runs[impl].append(run_one(case, impl, args.quick))
                        times[impl] += time.monotonic() - t
            for impl, each in runs.items():
                r = each[0] if len(each) == 1 else median_record(each)
                raw[case][impl].append(r)
                shown = r.get("error") or f"{fmt(r['value'])}" + (f" p99 {fmt(r['p99'])}" if "p99" in r else "")
                print(f"round {rnd + 1} ({case}) {impl:20s} {shown}  [{times[impl]:.1f} s]", flush=True)
    res = {c: {i: median_of(rs) for i, rs in impls.items()} for c, impls in raw.items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")  # every round, for a plot made later
    plot_name = None
    if "h" in res or "j" in res:
        from plot import plot

        image = out.with_suffix(".png")
        if plot(res, image):
            plot_name = image.name
    text = report(res, args, (load0, os.getloadavg()[0]), time.monotonic() - started, plot_name)
    out.write_text(text + kept_sections(out))
    print(f"\nwrote {args.out}\n")
    for name, fig, rt, ok in targets(res) + targets_issue4(res):
        print(f"{name:45s} {fig:>16s}  {rt:>24s}  {'—' if ok is None else ('met' if ok else 'MISSED')}")


if __name__ == "__main__":
    main()
