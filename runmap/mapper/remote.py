"""A Mapper that runs on the cluster: the client's handle (:meth:`runmap.Mapper.to`).

The Mapper itself (:class:`~runmap.mapper.service.MapperService`) runs in a
servlet on the cluster and starts its replicas there, so calls between it and
its replicas stay inside the cluster; this handle only streams inputs up and
results back, in windows the service grants, and shows the map's progress as
the service counts it. A heartbeat tells the service its client is still
there: a client that is gone has its maps cancelled within the service's
lease, and a client process that dies takes the servlet with it.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from itertools import islice
from typing import TYPE_CHECKING, Any

from runmap import serialization as ser
from runmap.envs.env import Env
from runmap.exceptions import RunmapError
from runmap.mapper.progress import Progress
from runmap.mapper.run import input_len, parse_options, zip_inputs
from runmap.mapper.service import WINDOW, Sizer
from runmap.module import Function, RemoteInstance, _single_call, module

if TYPE_CHECKING:
    from runmap.cluster.base import Cluster

SERVICE = "runmap.mapper.service:MapperService"
HEARTBEAT_SECONDS = 1.0
WAIT_SECONDS = 0.5  # how long one exchange waits for a result when there is nothing to send


class RemoteMapper:
    """The client's handle on a Mapper placed on a cluster: the same methods as :class:`~runmap.Mapper`.

    Built by ``rm.mapper(target, ...).to(cluster)``. ``close()`` (or leaving the
    ``with`` block) ends the replicas and the servlet the Mapper runs in.
    """

    def __init__(self, cluster: Cluster, target: Any, method: str | None, options: dict[str, Any],
                 env: Env | None, name: str, concurrency: int, lease: float) -> None:
        self.cluster = cluster
        self._name = name
        base = env or Env(name=name)
        # The Mapper's own servlet runs in the replicas' env (it unpickles their target) but asks for no compute.
        self._env = cluster.unique_env(replace(base, compute={"CPU": 0}).renamed(f"{base.name}-mapper"))
        self._closed = False
        self._lock = threading.Lock()
        self._calls: ThreadPoolExecutor | None = None
        self._slots = concurrency
        # The target travels as the replicas' would: by value where the cluster lacks the client's files.
        fn = target.fn if isinstance(target, Function) and not isinstance(target.fn, str) else target
        shipped = ser.dump_module(fn, cluster.remote_files)
        where = cluster.from_inside()  # before anything starts: an SSH host it cannot describe fails here
        service = module(SERVICE).to(cluster, env=self._env)
        self.servlet = service.servlet
        try:
            self._service: RemoteInstance = service(shipped, method, {**options, "env": env}, where, lease)
        except BaseException:  # the replicas could not start (an AllocationError, say): nothing stays up
            cluster.stop_servlet(self.servlet)
            raise
        self._replicas = self._invoke("keepalive")
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name=f"runmap-remote-heartbeat-{name}", daemon=True)
        self._heartbeat.start()

    # ---------------------------------------------------------------- calls

    def _invoke(self, method: str, *args: Any) -> Any:
        """A call of the service, on this thread's connection, always in a thread there (it may wait)."""
        return _single_call(self.servlet, self._service.module_name, method, args, None, in_thread=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self._replicas = self._invoke("keepalive")
            except Exception:  # the servlet is gone: the next call says why
                return

    # -------------------------------------------------------------- replicas

    @property
    def replicas(self) -> list[str]:
        """The replicas in rotation on the cluster, as ``name@host`` (as of the last heartbeat)."""
        return list(self._replicas)

    @property
    def num_replicas(self) -> int:
        return len(self._replicas)

    # ------------------------------------------------------------------ maps

    def map(self, *iterables: Iterable[Any], **options: Any) -> list[Any]:
        """As :meth:`runmap.Mapper.map`; the inputs stream up and the results back."""
        return list(self.imap(*iterables, **options))

    def starmap(self, iterable: Iterable[Iterable[Any]], **options: Any) -> list[Any]:
        stars = (tuple(a) for a in iterable)
        return list(self._open(ser.STAR, stars, input_len(iterable), options, ordered=True).results())

    def imap(self, *iterables: Iterable[Any], **options: Any) -> Iterator[Any]:
        return self._open(*zip_inputs(iterables), options, ordered=True).results()

    def imap_unordered(self, *iterables: Iterable[Any], **options: Any) -> Iterator[Any]:
        return self._open(*zip_inputs(iterables), options, ordered=False).results()

    async def amap(self, *iterables: Iterable[Any], **options: Any) -> list[Any]:
        """``await`` form of :meth:`map`, as :meth:`runmap.Mapper.amap`."""
        return [r async for r in self.aimap(*iterables, **options)]

    def aimap(self, *iterables: Iterable[Any], **options: Any) -> AsyncIterator[Any]:
        """``async for`` form of :meth:`imap`; cancelling the task stops the map on the cluster."""
        from runmap.mapper import aio

        return aio.iterate(self._open(*zip_inputs(iterables), options, ordered=True))

    def aimap_unordered(self, *iterables: Iterable[Any], **options: Any) -> AsyncIterator[Any]:
        """``async for`` form of :meth:`imap_unordered`."""
        from runmap.mapper import aio

        return aio.iterate(self._open(*zip_inputs(iterables), options, ordered=False))

    def call(self, *args: Any, **kwargs: Any) -> Any:
        """One call on the next free replica."""
        self._check_open()
        return self._invoke("call", args, kwargs)

    def submit(self, *args: Any, **kwargs: Any) -> Future[Any]:
        """One call on the next free replica, as a :class:`concurrent.futures.Future`."""
        self._check_open()
        with self._lock:
            if self._calls is None:
                slots = max(1, self.num_replicas * self._slots)
                self._calls = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="runmap-remote-call")
            calls = self._calls
        return calls.submit(self._invoke, "call", args, kwargs)

    def _open(self, mode: int, items: Iterator[Any], total: int | None, options: dict[str, Any],
              ordered: bool) -> RemoteRun:
        opts = parse_options(options)  # a bad option fails here, before anything is sent
        self._check_open()
        remote_options = {k: v for k, v in options.items() if k != "progress"}
        return RemoteRun(self, mode, items, total, remote_options, opts.progress, ordered)

    # --------------------------------------------------------------- closing

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Ends the maps, the replicas and the Mapper's servlet. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            calls, self._calls = self._calls, None
        self._stop.set()
        self._heartbeat.join(5)
        if calls is not None:
            calls.shutdown(wait=False, cancel_futures=True)
        try:
            if not self.cluster.closed:
                self._invoke("close")
        finally:
            if not self.cluster.closed:
                self.cluster.stop_servlet(self.servlet)

    def _check_open(self) -> None:
        if self._closed:
            raise RunmapError("this Mapper is closed")

    def __enter__(self) -> RemoteMapper:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RemoteMapper {self._name} on {self.cluster.name} replicas={self.num_replicas}>"


class RemoteRun:
    """One map of a placed Mapper, not yet started: it runs as its :meth:`results` are read.

    As :class:`~runmap.mapper.run.MapRun` for a local Mapper, it can be
    cancelled from another thread (the async forms do): the map leaves at its
    next exchange with the service, within ``WAIT_SECONDS``, and is cancelled there.
    """

    def __init__(self, mapper: RemoteMapper, mode: int, items: Iterator[Any], total: int | None,
                 options: dict[str, Any], progress: bool, ordered: bool) -> None:
        self.mapper = mapper
        self.mode, self.items, self.total, self.options = mode, items, total, options
        self.progress, self.ordered = progress, ordered
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def results(self) -> Generator[Any, None, None]:
        mapper, items = self.mapper, self.items
        map_id, credit = mapper._invoke("open", self.mode, self.total, self.options, self.ordered)
        bar = Progress(self.progress, self.total, mapper._name)
        sizer = Sizer(WINDOW)
        shown = 0
        end = finished = False
        source_error: Exception | None = None
        try:
            while not self.cancelled:
                batch: list[Any] = []
                if not end and credit > 0:
                    room = min(credit, sizer.next())
                    try:
                        batch.extend(islice(items, room))
                    except Exception as exc:  # raised after the results of the inputs before it, as map does
                        source_error, end = exc, True
                    end = end or len(batch) < room
                wait = 0.0 if batch and not end else WAIT_SECONDS
                reply = mapper._invoke("exchange", map_id, sizer.dumps(batch), end, wait)
                credit = reply.credit
                bar.update(reply.tally.done - shown)
                shown = reply.tally.done
                bar.story(reply.tally.retried, reply.tally.replaced, reply.tally.errors)
                yield from ser.loads(reply.results)
                if reply.finished:
                    finished = True
                    if reply.error is not None:
                        raise reply.error
                    if source_error is not None:
                        raise source_error
                    return
        finally:
            bar.close()
            if not finished and not mapper._closed:
                try:
                    mapper._invoke("cancel", map_id)
                except Exception:  # the servlet is gone; its maps went with it
                    pass
