"""One benchmark case for one implementation, in a fresh process.

    python benchmarks/cases.py <case> <impl> [--quick]

prints one JSON line: ``{"value": ..., ...}``. ``benchmarks/run.py`` runs every
(case, impl) pair this way, in interleaved rounds, and writes the report.

The workloads are defined here, at the top level of ``__main__``: the peers
get them by fork (multiprocessing) or by value (Ray, runmap), the same way a
user's script would hand them over. Every case checks its results.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

# ------------------------------------------------------------------ workloads

SPIN_LOOPS = 200_000  # about 20 ms of pure-Python CPU on this kind of machine
BLOB_MB = 10


def ident(x: Any) -> Any:
    return x


def spin(seed: int) -> int:
    total = seed
    for i in range(SPIN_LOOPS):
        total = (total * 31 + i) & 0xFFFFFFFF
    return total


class Echo:
    def echo(self, x: Any) -> Any:
        return x


def sizes(quick: bool) -> dict[str, int]:
    # a_task: peers that run one task per item (Dask) get fewer items: their rate does not depend on the count.
    # h: inputs of the scale case; j: inputs per unit of chunk size in the chunk-size sweep (capped at "a").
    if quick:
        return {"a": 20_000, "a_task": 500, "b": 12, "c": 200, "d": 1_000, "d_ray": 300, "f": 100_000, "g": 10,
                "g_mb": 2, "h": 2_000, "j": 200}
    return {"a": 200_000, "a_task": 2_000, "b": 60, "c": 2_000, "d": 10_000, "d_ray": 2_000, "f": 1_000_000,
            "g": 100, "g_mb": BLOB_MB, "h": 10_000, "j": 2_000}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def check(got: Any, want: Any, what: str) -> None:
    if got != want:
        raise SystemExit(f"wrong results for {what}")


# ----------------------------------------------------------------- peers


class Ray:
    """Ray started locally, as a user on this machine would, and shut down after."""

    def __enter__(self) -> Any:
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        self.ray = ray
        return ray

    def __exit__(self, *exc: Any) -> None:
        self.ray.shutdown()


def ray_actors(ray: Any, n: int) -> list[Any]:
    actor = ray.remote(Echo)
    actors = [actor.remote() for _ in range(n)]
    ray.get([a.echo.remote(0) for a in actors])  # ready
    return actors


class Dask:
    """A ``distributed.LocalCluster`` of ``n`` single-threaded worker processes, and its client."""

    def __init__(self, n: int = 2) -> None:
        self.n = n

    def __enter__(self) -> Any:
        from distributed import Client, LocalCluster

        self.cluster = LocalCluster(
            n_workers=self.n, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=50
        )
        self.client = Client(self.cluster)
        return self.client

    def __exit__(self, *exc: Any) -> None:
        self.client.close()
        self.cluster.close()


def joblib_parallel(n: int, **kw: Any) -> Any:
    """joblib's default backend (loky), as scikit-learn users get it; workers stay warm between calls."""
    from joblib import Parallel

    return Parallel(n_jobs=n, backend="loky", **kw)


def joblib_map(parallel: Any, fn: Callable[[Any], Any], xs: Any) -> list[Any]:
    from joblib import delayed

    return parallel(delayed(fn)(x) for x in xs)  # type: ignore[no-any-return]


def mp_pool(n: int) -> Any:
    import multiprocessing

    return multiprocessing.Pool(n)


def ppe(n: int) -> Any:
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(n)


def runmap_mapper(fn: Callable[..., Any], **kw: Any) -> Any:
    import runmap as rm

    return rm.mapper(fn, num_replicas=2, **kw)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


# ------------------------------------------------------------------ (a)


SMALL_REPEATS = 15  # a map of a tenth of (a)'s items takes ~2-3 ms: one is mostly scheduler noise; with 5, one
# process's median for `Pool` moved from 4.1M to 9.9M items/s between runs
D_REPEATS = 5  # (d): one run of 10k calls (~0.15 s) moved from 60k to 110k calls/s between runs on 2 vCPUs
REPEATS = 3  # a map of all (a)'s items takes ~25 ms on 2 vCPUs: one alone moved 15% between rounds, either way


def median_timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """The median time of ``repeats`` calls of ``fn``, and its last result."""
    times = []
    for _ in range(repeats):
        dt, out = timed(fn)
        times.append(dt)
    return statistics.median(times), out


def case_a(impl: str, n: dict[str, int]) -> dict[str, Any]:
    """Trivial items on 2 workers: items/s (start-up excluded).

    Each peer but Dask (few items: its rate is flat) takes the median of ``REPEATS`` maps;
    runmap and Pool are also timed on a tenth of the items: the median of ``SMALL_REPEATS`` maps.
    """
    xs = list(range(n["a_task"] if impl == "dask" else n["a"]))
    small = xs[: n["a"] // 10]
    if impl == "runmap":
        with runmap_mapper(ident) as m:
            m.map(range(100), progress=False)  # replicas warm, as for every peer
            dt, out = median_timed(lambda: m.map(xs, progress=False), REPEATS)
            dt_small, out_small = median_timed(lambda: m.map(small, progress=False), SMALL_REPEATS)
    elif impl == "pool":
        with mp_pool(2) as p:
            p.map(ident, range(100))
            dt, out = median_timed(lambda: p.map(ident, xs), REPEATS)
            dt_small, out_small = median_timed(lambda: p.map(ident, small), SMALL_REPEATS)
    elif impl == "ppe":
        with ppe(2) as ex:
            list(ex.map(ident, range(100)))
            dt, out = median_timed(lambda: list(ex.map(ident, xs, chunksize=256)), REPEATS)
    elif impl == "ray_pool":
        with Ray():
            from ray.util.multiprocessing import Pool

            p = Pool(2)
            p.map(ident, range(100))
            dt, out = median_timed(lambda: p.map(ident, xs), REPEATS)
            p.terminate()
    elif impl == "dask":
        with Dask() as client:
            client.gather(client.map(ident, range(100), pure=False))
            dt, out = timed(lambda: client.gather(client.map(ident, xs, pure=False)))
    elif impl == "joblib":
        with joblib_parallel(2) as par:
            joblib_map(par, ident, range(100))
            dt, out = median_timed(lambda: joblib_map(par, ident, xs), REPEATS)
    else:
        raise SystemExit(f"no impl {impl}")
    check(out, xs, "a")
    if impl in ("runmap", "pool"):  # (a) is also checked at a tenth of the items
        check(out_small, small, "a")
        return {"value": len(xs) / dt, "seconds": dt, "small": len(small) / dt_small}
    return {"value": len(xs) / dt, "seconds": dt}


# ------------------------------------------------------------------ (b)


def case_b(impl: str, n: dict[str, int]) -> dict[str, Any]:
    """~20 ms CPU inputs on 2 workers: seconds (the report turns them into speedups)."""
    xs = list(range(n["b"]))
    want = [spin(x) for x in xs[:2]]
    if impl == "sequential":
        dt, out = timed(lambda: [spin(x) for x in xs])
    elif impl == "runmap":
        with runmap_mapper(spin) as m:
            m.map([0, 1], progress=False)
            dt, out = timed(lambda: m.map(xs, progress=False))
    elif impl == "pool":
        with mp_pool(2) as p:
            p.map(ident, [0, 1])
            dt, out = timed(lambda: p.map(spin, xs))
    elif impl == "ppe":
        with ppe(2) as ex:
            list(ex.map(ident, [0, 1]))
            dt, out = timed(lambda: list(ex.map(spin, xs)))
    elif impl == "ray_actorpool":
        with Ray() as ray:
            from ray.util import ActorPool

            class Spinner:
                def spin(self, x: int) -> int:
                    return spin(x)

                def echo(self, x: Any) -> Any:
                    return x

            actors = [ray.remote(Spinner).remote() for _ in range(2)]
            ray.get([a.echo.remote(0) for a in actors])
            pool = ActorPool(actors)
            dt, out = timed(lambda: list(pool.map(lambda a, x: a.spin.remote(x), xs)))
    elif impl == "ray_pool":
        with Ray():
            from ray.util.multiprocessing import Pool

            p = Pool(2)
            p.map(ident, [0, 1])
            dt, out = timed(lambda: p.map(spin, xs))
            p.terminate()
    elif impl == "dask":
        with Dask() as client:
            client.gather(client.map(ident, [0, 1], pure=False))
            dt, out = timed(lambda: client.gather(client.map(spin, xs, pure=False)))
    elif impl == "joblib":
        with joblib_parallel(2) as par:
            joblib_map(par, ident, [0, 1])
            dt, out = timed(lambda: joblib_map(par, spin, xs))
    else:
        raise SystemExit(f"no impl {impl}")
    check(out[:2], want, "b")
    check(len(out), len(xs), "b")
    return {"value": dt, "seconds": dt, "per_input_ms": dt / len(xs) * 1e3}


# ------------------------------------------------------------------ (c)


def latencies(call: Callable[[int], Any], count: int) -> dict[str, Any]:
    for i in range(50):  # warm-up
        call(i)
    lat = []
    clock = time.perf_counter
    for i in range(count):
        t = clock()
        out = call(i)
        lat.append(clock() - t)
        if out != i:
            raise SystemExit("wrong result for c")
    return {"value": percentile(lat, 0.5) * 1e6, "p99": percentile(lat, 0.99) * 1e6}


def case_c(impl: str, n: dict[str, int]) -> dict[str, Any]:
    """Sequential calls of a method returning its argument: p50/p99 in µs."""
    count = n["c"]
    if impl in ("runmap", "runmap_mapper_call"):
        import runmap as rm

        with rm.LocalCluster(name="bench") as cluster:
            echo = rm.module(Echo).to(cluster)()
            if impl == "runmap":
                return latencies(echo.echo, count)
            with rm.mapper(echo.echo) as m:
                return latencies(m.call, count)
    if impl == "pool":
        with mp_pool(1) as p:
            return latencies(lambda i: p.apply(ident, (i,)), count)
    if impl == "ppe":
        with ppe(1) as ex:
            return latencies(lambda i: ex.submit(ident, i).result(), count)
    if impl == "ray_actor":
        with Ray() as ray:
            (a,) = ray_actors(ray, 1)
            return latencies(lambda i: ray.get(a.echo.remote(i)), count)
    if impl == "dask":
        with Dask(1) as client:
            return latencies(lambda i: client.submit(ident, i, pure=False).result(), count)
    raise SystemExit(f"no impl {impl}")


# ------------------------------------------------------------------ (d)


def case_d(impl: str, n: dict[str, int]) -> dict[str, Any]:
    """One call per input (chunksize 1), 2 workers, several calls in flight: calls/s.

    runmap, Pool, ProcessPoolExecutor and joblib take the median of ``D_REPEATS`` runs (Ray and Dask, slower, one).
    """
    xs = list(range(n["d_ray"] if impl.startswith("ray") else n["a_task"] if impl == "dask" else n["d"]))
    if impl == "runmap":
        import runmap as rm

        with rm.LocalCluster(name="bench") as cluster:
            echo = rm.module(Echo).to(cluster)()
            with rm.mapper(echo.echo, num_replicas=2, concurrency=4) as m:
                m.map(range(100), chunksize=1, progress=False)
                dt, out = median_timed(lambda: list(m.imap(xs, chunksize=1, progress=False)), D_REPEATS)
    elif impl == "pool":
        with mp_pool(2) as p:
            p.map(ident, range(100))
            dt, out = median_timed(lambda: list(p.imap(ident, xs, chunksize=1)), D_REPEATS)
    elif impl == "ppe":
        with ppe(2) as ex:
            list(ex.map(ident, range(100)))
            dt, out = median_timed(lambda: list(ex.map(ident, xs)), D_REPEATS)
    elif impl == "ray_actorpool":
        with Ray() as ray:
            from ray.util import ActorPool

            pool = ActorPool(ray_actors(ray, 2))
            dt, out = timed(lambda: list(pool.map(lambda a, x: a.echo.remote(x), xs)))
    elif impl == "ray_pool":
        with Ray():
            from ray.util.multiprocessing import Pool

            p = Pool(2)
            p.map(ident, range(10))
            dt, out = timed(lambda: list(p.imap(ident, xs, chunksize=1)))
            p.terminate()
    elif impl == "dask":
        with Dask() as client:
            client.gather(client.map(ident, range(100), pure=False))
            dt, out = timed(lambda: client.gather(client.map(ident, xs, pure=False)))
    elif impl == "joblib":
        with joblib_parallel(2, batch_size=1, pre_dispatch="8") as par:
            joblib_map(par, ident, range(100))
            dt, out = median_timed(lambda: joblib_map(par, ident, xs), D_REPEATS)
    else:
        raise SystemExit(f"no impl {impl}")
    check(out, xs, "d")
    return {"value": len(xs) / dt, "seconds": dt}


# ------------------------------------------------------------------ (e)


def case_e(impl: str, n: dict[str, int]) -> dict[str, Any]:
    """A whole short script: a fresh interpreter maps 2 inputs on 2 workers, closes them, and exits.

    The parent passes the wall-clock time it started this process at in
    ``BENCH_T0``; ``value`` (to the results) includes interpreter start and
    every import, ``close`` is the time the workers took to end, and the
    parent adds ``wall``: until this process has exited (its exit hooks too).
    """
    t0 = float(os.environ["BENCH_T0"])
    xs = [0, 1]
    if impl == "runmap":
        import runmap as rm

        m = rm.mapper(ident, num_replicas=2)
        out, t = m.map(xs, progress=False), time.time()
        m.close()
    elif impl == "pool":
        p = mp_pool(2)
        out, t = p.map(ident, xs), time.time()
        p.terminate()  # what ``with Pool(2)`` does on leaving
        p.join()
    elif impl == "ppe":
        ex = ppe(2)
        out, t = list(ex.map(ident, xs)), time.time()
        ex.shutdown()
    elif impl == "ray_actorpool":
        ray_ctx = Ray()
        ray = ray_ctx.__enter__()
        from ray.util import ActorPool

        actor = ray.remote(Echo)
        pool = ActorPool([actor.remote() for _ in range(2)])
        out, t = list(pool.map(lambda a, x: a.echo.remote(x), xs)), time.time()
        ray_ctx.__exit__()
    elif impl == "dask":
        dask_ctx = Dask()
        client = dask_ctx.__enter__()
        out, t = client.gather(client.map(ident, xs, pure=False)), time.time()
        dask_ctx.__exit__()
    elif impl == "joblib":
        from joblib.externals.loky import get_reusable_executor

        out, t = joblib_map(joblib_parallel(2), ident, xs), time.time()
        get_reusable_executor().shutdown(wait=True)  # else its workers idle on until the interpreter exits
    else:
        raise SystemExit(f"no impl {impl}")
    closed = time.time()
    check(out, xs, "e")
    return {"value": t - t0, "close": closed - t}


# ------------------------------------------------------------------ (f)


def gen(count: int) -> Iterator[int]:
    yield from range(count)


def case_f(impl: str, n: dict[str, int]) -> dict[str, Any]:
    """Items from a generator: growth of the client's peak RSS (MB) over an empty map."""
    count = n["f"]
    want = count * (count - 1) // 2

    def consume(results: Any) -> int:
        return sum(results)

    if impl == "runmap":
        with runmap_mapper(ident) as m:
            consume(m.imap(gen(0), progress=False))
            consume(m.imap(gen(1000), progress=False))
            base = peak_rss_mb()
            dt, total = timed(lambda: consume(m.imap(gen(count), progress=False)))
    elif impl == "pool":
        with mp_pool(2) as p:
            consume(p.imap(ident, gen(1000), chunksize=100))
            base = peak_rss_mb()
            dt, total = timed(lambda: consume(p.imap(ident, gen(count), chunksize=1000)))
    elif impl == "ppe":
        with ppe(2) as ex:
            consume(ex.map(ident, gen(1000), chunksize=100))
            base = peak_rss_mb()
            dt, total = timed(lambda: consume(ex.map(ident, gen(count), chunksize=1000)))
    else:
        raise SystemExit(f"no impl {impl}")
    check(total, want, "f")
    return {"value": peak_rss_mb() - base, "base_mb": base, "seconds": dt}


# ------------------------------------------------------------------ (g)


def blobs(mb: int) -> list[bytes]:
    return [bytes([k]) * (mb << 20) for k in range(4)]


def echo_server(port_out: Any) -> None:
    """A raw-socket echo server: 8-byte length, then the bytes, sent back."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port_out.put(srv.getsockname()[1])
    conns = []

    def serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            head = recv_exact(conn, 8)
            if head is None:
                return
            size = int.from_bytes(head, "big")
            buf = recv_exact(conn, size)
            assert buf is not None
            conn.sendall(head)
            conn.sendall(buf)

    while True:
        conn, _ = srv.accept()
        conns.append(conn)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def recv_exact(conn: socket.socket, size: int) -> bytearray | None:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        k = conn.recv_into(view[got:])
        if not k:
            return None
        got += k
    return buf


def raw_copy(items: list[bytes]) -> list[bytes]:
    """Two connections to two echo processes, one thread each, like 2 replicas."""
    import multiprocessing

    ports: Any = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=echo_server, args=(ports,), daemon=True) for _ in range(2)]
    for p in procs:
        p.start()
    conns = []
    for _ in procs:
        c = socket.create_connection(("127.0.0.1", ports.get()))
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns.append(c)
    out: list[Any] = [None] * len(items)

    def run(k: int) -> None:
        for i in range(k, len(items), 2):
            conns[k].sendall(len(items[i]).to_bytes(8, "big"))
            conns[k].sendall(items[i])
            head = recv_exact(conns[k], 8)
            assert head is not None
            out[i] = bytes(recv_exact(conns[k], int.from_bytes(head, "big")))  # type: ignore[arg-type]

    try:
        t = time.perf_counter()
        threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        dt = time.perf_counter() - t
    finally:
        for c in conns:
            c.close()
        for p in procs:
            p.kill()
            p.join()
    raw_copy.seconds = dt  # type: ignore[attr-defined]
    return out


def case_g(impl: str, n: dict[str, int]) -> dict[str, Any]:
    """Large bytes inputs, echoed back: MB/s of input (each MB travels both ways)."""
    source = blobs(n["g_mb"])
    items = [source[i % 4] for i in range(n["g"])]
    ok = True

    def consume(results: Any) -> None:
        nonlocal ok
        for i, r in enumerate(results):
            ok = ok and r == source[i % 4]

    if impl == "raw_socket":
        out = raw_copy(items)
        consume(out)
        dt = raw_copy.seconds  # type: ignore[attr-defined]
    elif impl == "runmap":
        with runmap_mapper(ident) as m:
            m.map([b"x"] * 4, progress=False)
            dt, _ = timed(lambda: consume(m.imap(items, progress=False)))
    elif impl == "pool":
        with mp_pool(2) as p:
            p.map(ident, range(4))
            dt, _ = timed(lambda: consume(p.imap(ident, items, chunksize=1)))
    elif impl == "ppe":
        with ppe(2) as ex:
            list(ex.map(ident, range(4)))
            dt, _ = timed(lambda: consume(ex.map(ident, items)))
    elif impl == "ray_actorpool":
        with Ray() as ray:
            from ray.util import ActorPool

            pool = ActorPool(ray_actors(ray, 2))
            dt, _ = timed(lambda: consume(pool.map(lambda a, x: a.echo.remote(x), items)))
    else:
        raise SystemExit(f"no impl {impl}")
    if not ok:
        raise SystemExit("wrong results for g")
    mb = len(items) * n["g_mb"]
    return {"value": mb / dt, "seconds": dt}


# ------------------------------------------------------------------ (h)

# slots -> (replicas, concurrency) for runmap; a peer's slots are its worker processes.
SLOT_SHAPES = {8: (2, 4), 64: (8, 8), 256: (16, 16), 1024: (64, 16)}


def case_h(impl: str, n: dict[str, int]) -> dict[str, Any]:
    """Dispatch at scale: chunksize-1 calls of a trivial function over ``slots`` slots.

    ``value`` is the wall time per input (µs, the per-input overhead), with the
    client's threads during the map and its peak RSS (MB).
    """
    kind, slots = impl.rsplit("_", 1)
    xs = list(range(n["h"]))
    threads = 0

    def run(imap: Callable[[], Iterator[Any]]) -> list[Any]:
        nonlocal threads
        out = []
        for i, r in enumerate(imap()):
            out.append(r)
            if i == len(xs) // 2:
                threads = threading.active_count()
        return out

    if kind == "runmap":
        import runmap as rm

        replicas, concurrency = SLOT_SHAPES[int(slots)]
        with rm.mapper(ident, num_replicas=replicas, concurrency=concurrency) as m:
            m.map(range(4 * int(slots)), chunksize=1, progress=False)
            base = peak_rss_mb()
            dt, out = timed(lambda: run(lambda: m.imap(xs, chunksize=1, progress=False)))
    elif kind == "pool":
        with mp_pool(int(slots)) as p:
            p.map(ident, range(4 * int(slots)), chunksize=1)
            base = peak_rss_mb()
            dt, out = timed(lambda: run(lambda: p.imap(ident, xs, chunksize=1)))
    else:
        raise SystemExit(f"no impl {impl}")
    check(out, xs, "h")
    rss = peak_rss_mb()
    return {"value": dt / len(xs) * 1e6, "threads": threads, "rss_mb": rss, "rss_growth_mb": rss - base}


# ------------------------------------------------------------------ (i)


class Pid:
    def pid(self) -> int:
        return os.getpid()


def case_i(impl: str, n: dict[str, int]) -> dict[str, Any]:
    """Idle worker memory: RSS (MB) of each of 2 workers, warmed by one small map, then idle."""
    import psutil

    def rss(pids: list[int]) -> dict[str, Any]:
        time.sleep(0.5)  # idle
        mbs = [psutil.Process(pid).memory_info().rss / 2**20 for pid in pids]
        return {"value": max(mbs), "min": min(mbs)}

    if impl == "runmap":
        import runmap as rm

        with rm.mapper(ident, num_replicas=2) as m:
            m.map(range(100), progress=False)
            return rss([r.servlet.pid for r in m.replicas])
    if impl == "pool":
        with mp_pool(2) as p:
            p.map(ident, range(100))
            return rss([w.pid for w in p._pool])  # type: ignore[attr-defined]
    if impl == "joblib":
        joblib_map(joblib_parallel(2), ident, range(100))
        workers = [c for c in psutil.Process().children() if "resource_tracker" not in " ".join(c.cmdline())]
        return rss([c.pid for c in workers])
    if impl == "dask":
        with Dask() as client:
            client.gather(client.map(ident, range(100), pure=False))
            return rss(list(client.run(os.getpid).values()))
    if impl == "ray_actor":
        with Ray() as ray:
            actors = [ray.remote(Pid).remote() for _ in range(2)]
            return rss(ray.get([a.pid.remote() for a in actors]))
    raise SystemExit(f"no impl {impl}")


# ------------------------------------------------------------------ (j)

CHUNKS = (1, 4, 16, 64, 256, 1024, 4096)


def case_j(impl: str, n: dict[str, int]) -> dict[str, Any]:
    """Trivial items on 2 workers at each fixed chunk size: items/s (``c<size>``), for the plot."""
    out: dict[str, Any] = {}

    def sweep(run: Callable[[list[int], int], list[Any]]) -> None:
        for c in CHUNKS:
            xs = list(range(min(n["a"], n["j"] * c)))
            dt, got = timed(lambda: run(xs, c))  # noqa: B023 - called at once
            check(got, xs, "j")
            out[f"c{c}"] = len(xs) / dt

    if impl == "runmap":
        with runmap_mapper(ident) as m:
            m.map(range(100), chunksize=1, progress=False)
            sweep(lambda xs, c: m.map(xs, chunksize=c, progress=False))
    elif impl == "pool":
        with mp_pool(2) as p:
            p.map(ident, range(100))
            sweep(lambda xs, c: p.map(ident, xs, chunksize=c))
    elif impl == "ppe":
        with ppe(2) as ex:
            list(ex.map(ident, range(100)))
            sweep(lambda xs, c: list(ex.map(ident, xs, chunksize=c)))
    elif impl == "joblib":
        joblib_map(joblib_parallel(2), ident, range(100))
        sweep(lambda xs, c: joblib_map(joblib_parallel(2, batch_size=c), ident, xs))
    else:
        raise SystemExit(f"no impl {impl}")
    return {"value": out[f"c{CHUNKS[-1]}"], **out}


CASES = {
    "a": case_a, "b": case_b, "c": case_c, "d": case_d, "e": case_e, "f": case_f, "g": case_g,
    "h": case_h, "i": case_i, "j": case_j,
}


def main() -> None:
    case, impl = sys.argv[1], sys.argv[2]
    quick = "--quick" in sys.argv[3:]
    result = CASES[case](impl, sizes(quick))
    sys.stdout.write("BENCH " + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
