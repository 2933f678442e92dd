"""Smoke tests: the overhead, stall and data benchmarks at tiny sizes give contract payloads; run_all runs a
benchmark in its own process and picks up its result."""

import json
import textwrap

import bench_data
import bench_overhead
import bench_stall
import common
import pytest
import run_all
import torch
from step_harness import demo_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One demo run at 32² for both step benchmarks (building DeepSpeed's engine is most of their cost)."""
    threads = torch.get_num_threads()
    work = tmp_path_factory.mktemp("bench_run")
    # an unfitted tiny VAE: the smoke test times steps, it does not need the demo's 20 s VAE fit
    yield demo_run(
        work, "data.resolution=32", "data.demo_objects=8", "data.workers=0", "model.demo_vae_steps=0"
    )
    torch.set_num_threads(threads)


def _check(name: str, payload: dict) -> dict:
    common.check_payload(name, payload)
    path = common.write_result(name, payload)
    return json.loads(path.read_text())


def test_bench_overhead_tiny(tiny_run, results_tmp):
    payload = bench_overhead.measure(tiny_run, bench_overhead.Sizes(steps=3, warmup=1, repeats=1, batches=2))
    record = _check("overhead", payload)
    assert record["ratio"] > 0 and record["goal"] == "<= 1.05x"
    assert {"engine", "bare"} <= set(record["raw"])


def test_bench_stall_tiny(tiny_run, results_tmp):
    sizes = bench_stall.Sizes(steps=3, warmup=1, repeats=1, in_memory_batches=2)
    record = _check("stall", bench_stall.measure(tiny_run, sizes))
    assert record["ratio"] > 0
    assert 0 <= record["raw"]["logged_stall_pct"] <= 100  # the live metric, read back from metrics.jsonl


def test_bench_data_tiny(results_tmp):
    sizes = bench_data.Sizes(
        objects=4, res=32, workers=0, batch_size=2, epochs=1, samples_per_shard=2, shuffle_buffer=2, repeats=1
    )
    record = _check("data", bench_data.run(False, sizes))
    assert record["ratio"] > 0 and record["raw"]["per_object_ms"]["transform"] > 0
    assert set(record["raw"]["example"]["best_samples_per_s"]) == {"ceiling", "folder", "streamer"}


def test_run_all_runs_a_benchmark_in_its_own_process(results_tmp, tmp_path, monkeypatch):
    bench_dir = tmp_path / "benches"
    bench_dir.mkdir()
    (bench_dir / "bench_fake.py").write_text(
        textwrap.dedent(
            """
            import os
            from common import write_result
            payload = {"config": {}, "raw": {"pid": os.getpid()}, "ratio": 2.0, "goal": ">= 1x",
                       "met": True, "baseline": "none", "summary": "fake."}
            write_result("fake", payload)
            """
        )
    )
    (bench_dir / "bench_broken.py").write_text("raise SystemExit(3)\n")
    monkeypatch.setattr(run_all, "BENCH_DIR", bench_dir)
    status, _ = run_all.run_one("bench_fake", quick=True, timeout_s=60)
    assert status == "ok"
    assert json.loads((results_tmp / "fake.json").read_text())["raw"]["pid"] > 0
    assert run_all.run_one("bench_broken", quick=True, timeout_s=60)[0] == "failed (exit 3)"
    assert run_all.skip_reason("bench_missing", quick=True) == "missing"
