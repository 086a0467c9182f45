"""A joblib parallel backend named ``"runmap"``: scikit-learn's ``n_jobs`` work on runmap replicas.

    >>> import joblib, runmap as rm
    >>> rm.register_joblib()
    >>> with joblib.parallel_config(backend="runmap", n_jobs=2):
    ...     joblib.Parallel()(joblib.delayed(abs)(-i) for i in range(3))
    [0, 1, 2]

joblib hands the backend batches of calls (picklable callables); each Parallel
call gets an :class:`runmap.Executor` with ``n_jobs`` replicas, and the batches
are submitted to it, as joblib's own loky backend submits them to a process pool.
joblib is imported only by :func:`register_joblib`, so ``import runmap`` stays light.
"""

from __future__ import annotations

BACKEND_NAME = "runmap"


def register_joblib(make_default: bool = False) -> None:
    """Registers the joblib parallel backend ``"runmap"``.

    Select it with ``joblib.parallel_config(backend="runmap", n_jobs=N)``; the
    replicas run on the embedded local cluster unless ``cluster=`` (and
    ``env=``) are given there too. ``n_jobs=1`` runs in this process, as with
    joblib's other process backends; ``n_jobs=-1`` means one replica per CPU.

    Args:
        make_default: make ``"runmap"`` joblib's default backend.

    Example:
        >>> import joblib, runmap as rm
        >>> from sklearn.model_selection import cross_val_score   # doctest: +SKIP
        >>> rm.register_joblib()
        >>> with joblib.parallel_config(backend="runmap", n_jobs=4):   # doctest: +SKIP
        ...     scores = cross_val_score(model, X, y, cv=5)
    """
    try:
        import joblib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("register_joblib needs joblib: pip install joblib") from exc
    from runmap.integrations._joblib_backend import RunmapBackend

    joblib.register_parallel_backend(BACKEND_NAME, RunmapBackend, make_default=make_default)


__all__ = ["BACKEND_NAME", "register_joblib"]
