"""runmap side by side with its peers, in one run, on the same inputs.

    python benchmarks/run.py [--quick] [--rounds N] [--cases abc..] [--out docs/benchmarks.md]

Every (case, implementation) pair runs in a fresh subprocess
(``benchmarks/cases.py``), rounds are interleaved (round 1 of every pair, then
round 2, ...) so that a burst of load on the machine hits every column alike,
and the median of the rounds is reported. Ray columns appear when ``ray`` is
importable. The report, with the ratios against the targets of issue 4, is
written to ``docs/benchmarks.md`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CASES_PY = HERE / "cases.py"
CASE_TIMEOUT = 600.0

HAVE_RAY = importlib.util.find_spec("ray") is not None

IMPLS: dict[str, list[str]] = {
    "a": ["runmap", "pool", "ppe", "ray_pool"],
    "b": ["sequential", "runmap", "pool", "ppe", "ray_actorpool", "ray_pool"],
    "c": ["runmap", "runmap_mapper_call", "pool", "ppe", "ray_actor"],
    "d": ["runmap", "pool", "ppe", "ray_actorpool", "ray_pool"],
    "e": ["runmap", "pool", "ppe", "ray_actorpool"],
    "f": ["runmap", "pool", "ppe"],
    "g": ["raw_socket", "runmap", "pool", "ppe", "ray_actorpool"],
}

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
}

TITLES = {
    "a": "(a) trivial items, 2 replicas: items/s",
    "b": "(b) ~20 ms pure-Python inputs, 2 replicas: speedup over sequential",
    "c": "(c) sequential calls of a method returning its argument: p50 µs (p99)",
    "d": "(d) 2 replicas × concurrency 4, chunksize 1: calls/s",
    "e": "(e) fresh interpreter to the first result of a 2-replica map: s",
    "f": "(f) items from a generator: client peak RSS growth over an empty map, MB",
    "g": "(g) 10 MB bytes inputs echoed back, 2 replicas: MB/s of input",
}

NOTES = {
    "a": "`Pool.map` and Ray's Pool with their default chunks; `ProcessPoolExecutor` with chunksize 256 "
    "(its default of 1 runs at ~9k/s). Start-up excluded; every peer warmed with one small map.",
    "b": "Speedup = sequential seconds / parallel seconds, sequential measured in its own process, "
    "each round's parallel run paired with the same round's sequential one (median of the pairs shown).",
    "c": "runmap: a remote instance's method (`echo.echo(i)`); `Mapper.call` goes through the Mapper's "
    "slot threads. Peers: `Pool(1).apply`, `ProcessPoolExecutor(1).submit().result()`, `ray.get(actor.m.remote())`.",
    "d": "runmap: `imap(xs, chunksize=1)` on a Mapper with concurrency 4. Pool: `imap(chunksize=1)`. "
    "Ray `ActorPool.map` keeps one call in flight per actor; Ray runs fewer calls (it is slower).",
    "e": "Includes interpreter start-up and every import; Ray includes `ray.init` and two actors.",
    "f": "Results consumed as they stream (`imap`), not kept. `Pool.imap` and `ProcessPoolExecutor.map` "
    "(chunksize 1000) read the whole generator ahead.",
    "g": "Each input is echoed back, so every MB crosses twice. Raw socket: two echo processes, two connections, "
    "one thread each, length-prefixed `sendall`/`recv_into`.",
}


def impls_for(case: str) -> list[str]:
    return [i for i in IMPLS[case] if HAVE_RAY or not i.startswith("ray")]


def run_one(case: str, impl: str, quick: bool) -> dict[str, Any]:
    env = {**os.environ, "BENCH_T0": repr(time.time()), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(CASES_PY), case, impl] + (["--quick"] if quick else [])
    env["BENCH_T0"] = repr(time.time())
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=CASE_TIMEOUT)
    except subprocess.TimeoutExpired:
        out, err = b"", b"timed out"
    finally:
        # The case's own children (replicas, pool workers, Ray) share its session: end them all.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    for line in out.decode().splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])  # type: ignore[no-any-return]
    tail = err.decode(errors="replace").strip().splitlines()[-3:]
    return {"error": " | ".join(tail) or f"exit code {proc.returncode}"}


def median_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return {"error": rounds[0]["error"], "n": 0}
    keys = [k for k, v in ok[0].items() if isinstance(v, (int, float))]
    merged = {k: statistics.median(r[k] for r in ok) for k in keys}
    merged["n"] = len(ok)
    merged["all"] = [r["value"] for r in ok]
    merged["rounds"] = [r.get("value") for r in rounds]  # None where a round failed
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


def targets(res: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, bool | None]]:
    """(target, figure, ratio, met) for each target of issue 4."""
    rows: list[tuple[str, str, str, bool | None]] = []

    def row(name: str, figure: float | None, unit: str, r: float | None, ok: bool | None, rtxt: str) -> None:
        fig = "n/a" if figure is None else f"{fmt(figure)} {unit}"
        rt = "n/a" if r is None else rtxt.format(r)
        rows.append((name, fig, rt, ok))

    a, pool_a, ray_a = get(res, "a", "runmap"), get(res, "a", "pool"), get(res, "a", "ray_pool")
    r1, r2 = ratio(a, pool_a), ratio(a, ray_a)
    row("(a) ≥0.7× `Pool.map`", a, "items/s", r1, None if r1 is None else r1 >= 0.7, "{:.2f}×")
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
    row("(e) ≤ 1.0 s", e, "s", ray_e, None if e is None else e <= 1.0, "Ray takes {:.1f}× as long")

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
        vs = ""
        if base and impl not in ("runmap", "sequential") and value:
            rel = base / value
            if case in ("c", "e", "f"):
                rel = value / base  # smaller is better: how many times runmap's figure
            vs = f"{rel:.2f}×"
        spread = ", ".join(fmt(v) for v in each)
        lines.append(f"| {LABELS[impl]} | {fig} | {spread} | {vs} |")
    lines.append("")
    return lines


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"Python {platform.python_version()}"]
    for pkg in ("runmap", "cloudpickle", "uvicorn", "uvloop", "httptools", "starlette", "ray"):
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


def report(res: dict[str, dict[str, Any]], args: argparse.Namespace, load: tuple[float, float], wall: float) -> str:
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
        "## Targets (issue 4)",
        "",
        "| target | runmap | ratio | met |",
        "|---|---|---|---|",
    ]
    for name, fig, rt, ok in targets(res):
        lines.append(f"| {name} | {fig} | {rt} | {'—' if ok is None else ('yes' if ok else '**no**')} |")
    lines += ["", "## Figures", ""]
    for case in args.cases:
        if case in res:
            lines += case_rows(case, res)
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small inputs, one round: a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, 1 with --quick)")
    parser.add_argument("--cases", default="abcdefg", help="which cases, e.g. 'ac'")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--load-note", default="", help="a sentence on what else ran on the machine")
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.cases = [c for c in args.cases if c in IMPLS]

    load0 = os.getloadavg()[0]
    started = time.monotonic()
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {c: {i: [] for i in impls_for(c)} for c in args.cases}
    for rnd in range(args.rounds):
        for case in args.cases:
            for impl in impls_for(case):
                t = time.monotonic()
                r = run_one(case, impl, args.quick)
                raw[case][impl].append(r)
                shown = r.get("error") or f"{fmt(r['value'])}" + (f" p99 {fmt(r['p99'])}" if "p99" in r else "")
                print(f"round {rnd + 1} ({case}) {impl:20s} {shown}  [{time.monotonic() - t:.1f} s]", flush=True)
    res = {c: {i: median_of(rs) for i, rs in impls.items()} for c, impls in raw.items()}
    text = report(res, args, (load0, os.getloadavg()[0]), time.monotonic() - started)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"\nwrote {args.out}\n")
    for name, fig, rt, ok in targets(res):
        print(f"{name:45s} {fig:>16s}  {rt:>24s}  {'—' if ok is None else ('met' if ok else 'MISSED')}")


if __name__ == "__main__":
    main()
