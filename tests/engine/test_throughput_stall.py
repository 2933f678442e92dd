"""The live data-stall metric counts the CPU the data workers take from the step, not only the queue wait."""

import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

from engine.config import load_config
from engine.distributed import DistInfo
from engine.throughput import Throughput

STEP_CPU_S = 0.15  # CPU seconds of work per simulated step


def _burn(cpu_seconds: float) -> None:
    end = time.thread_time() + cpu_seconds
    while time.thread_time() < end:
        pass


def _worker() -> None:
    _burn(10.0)  # a data worker decoding flat out (terminated by the test long before)


@pytest.fixture
def one_cpu():
    """This process on one CPU, as a step and a worker on a machine with no free core."""
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(saved)})
    yield
    os.sched_setaffinity(0, saved)


def _stall_pct(meter: Throughput, step_seconds: float) -> float:
    return meter.metrics({"loss": 0.0, "data_wait_s": 0.0}, step_seconds, lr=0.0)["data_stall_pct"]


SCHEDSTAT = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/schedstat")


@pytest.mark.skipif(not SCHEDSTAT.is_file(), reason="needs Linux /proc/<pid>/task/*/schedstat")
def test_stall_metric_matches_the_measured_slowdown_from_a_busy_worker(one_cpu):
    cfg = load_config(None, ["run.dir=unused"])
    meter = Throughput(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    ctx = mp.get_context("fork")
    alone_s, shared_s, shown = [], [], []
    for _ in range(5):  # in rotation; the least disturbed of each side, as the benchmarks do
        start = time.perf_counter()
        _burn(STEP_CPU_S)
        alone_s.append(time.perf_counter() - start)
        _stall_pct(meter, alone_s[-1])  # the alone step: no worker, nothing to count
        worker = ctx.Process(target=_worker, daemon=True)
        worker.start()
        try:
            _stall_pct(meter, 1.0)  # from here on: the worker's CPU while the step runs
            start = time.perf_counter()
            _burn(STEP_CPU_S)
            shared_s.append(time.perf_counter() - start)
            shown.append(_stall_pct(meter, shared_s[-1]))
        finally:
            worker.terminate()
            worker.join()
    measured = 100.0 * (1.0 - min(alone_s) / min(shared_s))  # what the worker cost the step, as a share
    # The old metric (queue wait only) shows 0 % while the step ran ~2× slower.
    assert measured > 20, f"the worker did not slow the step: {alone_s} s alone vs {shared_s} s"
    assert abs(statistics.median(shown) - measured) < 8, f"stall shown {shown} % vs measured {measured:.1f} %"
