"""Benchmark smoke tests import the benchmark scripts as top-level modules, as ``python benchmarks/x.py``
runs them (benchmarks/ is not a package), and write results to a temporary folder, never the real one."""

import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))


@pytest.fixture
def results_tmp(tmp_path, monkeypatch):
    """Results written by the test land in a temporary folder."""
    import common

    monkeypatch.setenv(common.RESULTS_ENV, str(tmp_path))
    return tmp_path
