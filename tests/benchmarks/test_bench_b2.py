"""Smoke tests of the attention, scaling, startup, parameter-count and multi-node benchmarks at tiny sizes,
and of the start-up phase timing they read (engine/startup.py)."""

import json

import bench_attention
import bench_multinode
import bench_scaling
import common
import pytest
import torch

from engine.startup import SHM_COMM_OP, StartupClock, parse_startup_line, skip_unused_comm_op

TINY_ATTENTION = {
    "views": [1, 2],
    "latent": 4,
    "channels": 16,
    "heads": 2,
    "repeats": 1,
    "device": "cpu",
    "max_naive_mb": 1.0,
    "threads": 1,
}


@pytest.mark.parametrize("views", [2, 4])
def test_repeated_kv_baseline_computes_our_multiview_attention(views):
    """The Wonder3D-style baseline (K/V repeated per view) and ours are the same attention, so the memory
    ratio compares equal work."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2 * views, 9, 16) for _ in range(3))  # 2 objects, 9 tokens per view
    ours = bench_attention.ours_attention(q, k, v, views, 2)
    assert torch.allclose(bench_attention.repeat_kv_attention(q, k, v, views, 2), ours, atol=1e-5)
    assert torch.allclose(bench_attention.naive_attention(q, k, v, views, 2), ours, atol=1e-5)


def test_attention_benchmark_writes_a_contract_result(results_tmp):
    rows = [
        row
        for views in TINY_ATTENTION["views"]
        for row in bench_attention.measure_views(views, TINY_ATTENTION)
    ]
    assert {(r["impl"], r["mode"]) for r in rows} >= {("repeat_kv", "train"), ("ours", "forward")}
    path = common.write_result("attention", bench_attention.payload(rows, TINY_ATTENTION))
    record = json.loads(path.read_text())
    assert record["raw"]["ratios_repeat_kv_over_ours"]["train_2_views"]["memory"] == record["ratio"]


def test_fitted_exponent_recovers_a_power_law():
    views = [1, 2, 4, 6]
    assert bench_scaling.fit_exponent(views, [3.0 * v**1.5 for v in views]) == pytest.approx(1.5)
    assert bench_scaling.fit_exponent(views, [0.2 * v for v in views]) == pytest.approx(1.0)


def test_scaling_benchmark_writes_json_and_plot(results_tmp):
    settings = {**bench_scaling.settings_for(quick=True), "views": [1, 2], "pixels": [16], "repeats": 0}
    settings["widths"] = [8, 16]
    rows = bench_scaling.measure_resolution(16, settings)
    assert [(r["views"], r["latent"]) for r in rows] == [(1, 2), (2, 2)]
    result = bench_scaling.payload(rows, settings)
    assert set(result["raw"]["time_exponent"]) == {"16px"}
    common.write_result("scaling", result)
    png = bench_scaling.plot(rows, results_tmp / "scaling.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_startup_line_accounts_for_every_phase():
    clock = StartupClock()
    clock.lap("imports")
    clock.lap("imports")  # a phase lapped twice adds up
    line = clock.first_step(data_wait_s=0.0)
    assert clock.first_step(data_wait_s=0.0) is None  # once per process
    phases = parse_startup_line("junk before " + line)
    assert list(phases)[-3:] == ["first batch", "first step", "total"]
    assert list(phases).count("imports") == 1
    assert sum(v for k, v in phases.items() if k != "total") == pytest.approx(
        phases["total"], abs=0.1 * len(phases)
    )


def test_deepspeed_does_not_build_the_unused_comm_op(monkeypatch):
    """The shared-memory op serves only tensor-parallel inference; building it cost ~2 min on a first run."""
    import deepspeed.ops
    from deepspeed.comm.torch import build_shm_op

    table = deepspeed.ops.__compatible_ops__
    monkeypatch.setitem(table, SHM_COMM_OP, table[SHM_COMM_OP])  # restored after the test
    assert skip_unused_comm_op()
    assert build_shm_op() is None


def test_param_counts_and_multinode_results_follow_the_contract(results_tmp):
    import param_counts

    counts = param_counts.run(quick=True)
    assert counts["raw"]["stages"][0]["parameters_total"] > 8e8
    common.write_result("param_counts", counts)
    run = {"wall_s": 10.0, "train_s": 4.0, "losses": [1.0, 0.5]}
    runs = {"two_nodes": [{**run, "wall_s": 10.5}], "one_node": [run]}
    result = bench_multinode.payload(runs, steps=2, repeats=1)
    assert result["ratio"] == 1.05 and result["met"]
    common.write_result("multinode", result)
