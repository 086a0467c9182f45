"""The "runmap" joblib backend, under joblib itself and under scikit-learn."""

from __future__ import annotations

import os

import pytest
from needs import need

import runmap as rm

joblib = need("joblib")


class BadInput(Exception):
    pass


def checked_square(x: int) -> int:
    if x < 0:
        raise BadInput(f"negative input {x}")
    return x * x


@pytest.fixture(autouse=True)
def registered() -> None:
    rm.register_joblib()


def test_parallel_runs_on_replicas_in_order() -> None:
    with joblib.parallel_config(backend="runmap", n_jobs=2):
        squares = joblib.Parallel()(joblib.delayed(checked_square)(i) for i in range(20))
        pids = set(joblib.Parallel()(joblib.delayed(os.getpid)() for _ in range(8)))
    assert squares == [i * i for i in range(20)]
    assert os.getpid() not in pids


def test_a_failing_job_raises_the_users_exception() -> None:
    with joblib.parallel_config(backend="runmap", n_jobs=2):
        with pytest.raises(BadInput, match="negative input -3"):
            joblib.Parallel()(joblib.delayed(checked_square)(i) for i in [1, 2, -3, 4])


def test_n_jobs_1_runs_here() -> None:
    with joblib.parallel_config(backend="runmap", n_jobs=1):
        assert joblib.Parallel()(joblib.delayed(os.getpid)() for _ in range(2)) == [os.getpid()] * 2


def test_cross_val_score_matches_the_sequential_scores() -> None:
    need("sklearn")
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    X, y = make_classification(n_samples=300, n_features=8, random_state=0)
    model = LogisticRegression(max_iter=500)
    sequential = cross_val_score(model, X, y, cv=4, n_jobs=1)
    here = os.getpid()

    def accuracy_on_a_replica(estimator, X_test, y_test):  # type: ignore[no-untyped-def]
        assert os.getpid() != here, "this fold was scored in the test process, not on a replica"
        return estimator.score(X_test, y_test)  # the default scoring of a classifier: accuracy

    with joblib.parallel_config(backend="runmap"):
        parallel = cross_val_score(model, X, y, cv=4, n_jobs=2, scoring=accuracy_on_a_replica)
    assert list(parallel) == list(sequential)
    assert len(sequential) == 4


def slow_pid(seconds: float) -> tuple[float, int]:
    import time

    time.sleep(seconds)
    return seconds, os.getpid()


def nested_sum(n: int) -> int:
    return sum(joblib.Parallel(n_jobs=2)(joblib.delayed(checked_square)(i) for i in range(n)))


def _child_pids() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_replicas_stay_warm_across_parallel_calls_in_one_block() -> None:
    import gc

    before = _child_pids()
    with joblib.parallel_config(backend="runmap", n_jobs=2):
        first = set(joblib.Parallel()(joblib.delayed(slow_pid)(0.05) for _ in range(8)))
        started = _child_pids() - before
        second = set(joblib.Parallel()(joblib.delayed(slow_pid)(0.05) for _ in range(8)))
        third = set(joblib.Parallel()(joblib.delayed(checked_square)(i) for i in range(4)))
        assert _child_pids() - before == started  # no new processes for the second and third calls
    assert {p for _, p in second} == {p for _, p in first}
    assert len({p for _, p in first}) == 2 and third == {0, 1, 4, 9}
    gc.collect()
    assert not (_child_pids() & started), "the block's replicas outlived it"


def test_a_parallel_call_outside_a_block_ends_its_replicas() -> None:
    before = _child_pids()
    assert joblib.Parallel(n_jobs=2, backend="runmap")(joblib.delayed(checked_square)(i) for i in range(4)) == [
        0, 1, 4, 9,
    ]
    assert _child_pids() - before == set()


@pytest.mark.parametrize("return_as", ["generator", "generator_unordered"])
def test_return_as_generators(return_as: str) -> None:
    with joblib.parallel_config(backend="runmap", n_jobs=2):
        out = joblib.Parallel(return_as=return_as)(joblib.delayed(slow_pid)(s) for s in [0.6, 0.0, 0.0, 0.0])
        assert not isinstance(out, list)
        seconds = [s for s, _ in out]
    if return_as == "generator":
        assert seconds == [0.6, 0.0, 0.0, 0.0]
    else:
        assert sorted(seconds) == [0.0, 0.0, 0.0, 0.6] and seconds[-1] == 0.6  # the slow one comes last


def test_nested_parallel_runs_inside_a_replica() -> None:
    with joblib.parallel_config(backend="runmap", n_jobs=2):
        assert joblib.Parallel()(joblib.delayed(nested_sum)(n) for n in [3, 4]) == [5, 14]


# joblib's own process backend leaves its process-wide resource tracker running, by design.
@pytest.mark.parametrize("backend", [pytest.param("multiprocessing", marks=pytest.mark.allow_leaks), "runmap"])
def test_same_semantics_as_joblibs_own_backend(backend: str) -> None:
    with joblib.parallel_config(backend=backend):
        ordered = joblib.Parallel(n_jobs=-1, batch_size="auto", pre_dispatch="2*n_jobs")(
            joblib.delayed(checked_square)(i) for i in range(50)
        )
        assert ordered == [i * i for i in range(50)]
        assert joblib.Parallel(n_jobs=2, batch_size=4, pre_dispatch="all")(
            joblib.delayed(checked_square)(i) for i in range(10)
        ) == [i * i for i in range(10)]
        with pytest.raises(BadInput, match="negative input -3"):
            joblib.Parallel(n_jobs=2)(joblib.delayed(checked_square)(i) for i in [1, 2, -3, 4])
        # after a failure, the next call in the block works
        assert joblib.Parallel(n_jobs=2)(joblib.delayed(checked_square)(i) for i in range(3)) == [0, 1, 4]


def test_grid_search_matches_the_sequential_search() -> None:
    need("sklearn")
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, cross_val_score

    X, y = make_classification(n_samples=200, n_features=6, random_state=1)
    grid = {"C": [0.01, 0.1, 1.0, 10.0]}
    sequential = GridSearchCV(LogisticRegression(max_iter=500), grid, cv=3, n_jobs=1).fit(X, y)
    seq_scores = cross_val_score(LogisticRegression(max_iter=500), X, y, cv=3, n_jobs=1)
    with joblib.parallel_config(backend="runmap", n_jobs=2):
        parallel = GridSearchCV(LogisticRegression(max_iter=500), grid, cv=3).fit(X, y)
        par_scores = cross_val_score(LogisticRegression(max_iter=500), X, y, cv=3)
    assert parallel.best_params_ == sequential.best_params_
    assert list(parallel.cv_results_["mean_test_score"]) == list(sequential.cv_results_["mean_test_score"])
    assert list(par_scores) == list(seq_scores)
