"""The ``"runmap"`` joblib backend itself; imported only by :func:`runmap.register_joblib`."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from joblib._parallel_backends import (
    AutoBatchingMixin,
    FallbackToBackend,
    ParallelBackendBase,
    SequentialBackend,
)

from runmap.cluster.base import Cluster
from runmap.envs.env import Env
from runmap.executor import Executor


class RunmapBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]
    """Runs joblib's batches of calls on an :class:`runmap.Executor`.

    The backend that a ``parallel_config(backend="runmap")`` block made serves
    every ``Parallel`` call in it: its replicas stay warm from one call to the
    next and end when the block's backend is let go of (at the block's end, or
    at the next garbage collection), or at exit. A backend made for one
    ``Parallel(backend="runmap")`` call ends its replicas with the call.

    Args:
        cluster: where the replicas run (default: the embedded local cluster).
        env: their env (default: this interpreter, with BLAS/OpenMP threads
            limited to ``cpu_count // n_jobs`` as joblib does for its workers).
    """

    supports_retrieve_callback = True
    supports_inner_max_num_threads = True
    supports_sharedmem = False
    uses_threads = False

    def __init__(
        self,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
        cluster: Cluster | None = None,
        env: Env | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads, **kwargs)
        self.cluster = cluster
        self.env = env
        self._executor: Executor | None = None
        self._finalizer: weakref.finalize | None = None

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return 1
        if n_jobs < 0:
            return max((os.cpu_count() or 1) + 1 + n_jobs, 1)
        return int(n_jobs)

    def configure(self, n_jobs: int | None = 1, parallel: Any = None, **backend_kwargs: Any) -> int:
        n_jobs = self.effective_n_jobs(n_jobs)
        if n_jobs == 1:
            # Starting a replica for one job would only add latency; joblib's
            # process backends make the same choice.
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self.parallel = parallel
        if self._executor is not None and self._executor.num_replicas != n_jobs:
            self._close_executor()
        if self._executor is None:
            env = self.env or Env(name="joblib", env_vars=self._prepare_worker_env(n_jobs))
            self._executor = Executor(num_replicas=n_jobs, cluster=self.cluster, env=env)
            self._finalizer = weakref.finalize(self, self._executor.shutdown, wait=True, cancel_futures=True)
        return n_jobs

    def _configured_by_a_block(self) -> bool:
        """Whether this backend is the one a ``parallel_config`` block in effect made (so more calls may come)."""
        from joblib.parallel import _backend

        config = getattr(_backend, "config", None)
        return isinstance(config, dict) and config.get("backend") is self

    def submit(self, func: Callable[[], Any], callback: Callable[[Future[Any]], Any] | None = None) -> Future[Any]:
        assert self._executor is not None, "configure() starts the executor"
        future = self._executor.submit(func)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, future: Future[Any]) -> Any:
        return future.result()

    def terminate(self) -> None:
        """The end of a Parallel call: the replicas stay warm while its ``parallel_config`` block lasts."""
        self.parallel = None  # no cycle through the Parallel call, so the block's end frees this backend
        if self._executor is not None and not self._configured_by_a_block():
            self._close_executor()
        self.reset_batch_stats()

    def _close_executor(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """A batch failed: drop the calls not yet run and end the replicas now."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._executor is not None:
            self._executor.terminate_workers()
            self._executor.shutdown()
            self._executor = None
        if ensure_ready and self.parallel is not None:
            self.configure(n_jobs=self.parallel.n_jobs, parallel=self.parallel)
