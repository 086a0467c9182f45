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
