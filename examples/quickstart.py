"""runmap's quickstart: a real map with a progress bar on the embedded local cluster.

Run it with ``make demo`` (or ``python examples/quickstart.py`` once runmap is installed).
"""

import os
import time

import runmap as rm


def slow_square(n: int) -> tuple[int, int]:
    """Pretends to work for 20 ms, then says which process did it."""
    time.sleep(0.02)
    return n * n, os.getpid()


class Model:
    def __init__(self, bias: float) -> None:
        self.bias = bias

    def predict(self, x: float) -> float:
        return 2 * x + self.bias


def main() -> None:
    # A plain function over 4 replicas: each is a servlet process on this machine.
    with rm.mapper(slow_square, num_replicas=4) as mapper:
        start = time.perf_counter()
        results = mapper.map(range(200))
        elapsed = time.perf_counter() - start
    squares = [r for r, _ in results]
    assert squares == [n * n for n in range(200)], "results came back out of order"
    pids = {pid for _, pid in results}
    print(f"200 × 20 ms on {len(pids)} replica processes in {elapsed:.2f} s (sequential: 4.0 s)")

    # A class: the instance lives in a servlet; the Mapper duplicates its env twice.
    with rm.cluster("local", name="quickstart") as cluster:
        env = rm.env(name="model")
        model = rm.module(Model).to(cluster, env=env)(bias=0.5)
        print("one remote call:", model.predict(1.0))
        with rm.mapper(model.predict, num_replicas=3, concurrency=2) as mapper:
            preds = mapper.map([float(i) for i in range(1000)])
            print("first predictions:", preds[:4], "replicas:", [r.name for r in mapper.replicas])


if __name__ == "__main__":
    main()
