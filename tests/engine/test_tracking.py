"""Logging facade and throughput numbers: identity from env or config, crash-safe metrics.jsonl, MFU."""

import json
import math

import pytest
import torch

from engine.config import load_config
from engine.distributed import DistInfo
from engine.throughput import Throughput
from engine.tracking import Tracker, wandb_identity
from modeling.flops import unet_train_flops
from modeling.unet_mv import tiny_unet_config
from tests.engine.runs import train


def strict_records(path) -> list[dict]:
    """Every line of a metrics.jsonl, parsed as strict JSON (NaN / Infinity are not JSON)."""

    def refuse(constant: str):
        raise ValueError(f"{path}: non-JSON constant {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_wandb_identity_comes_from_env_first_then_config(monkeypatch):
    cfg = load_config(None, ["logging.wandb_entity=team-a", "logging.wandb_project=p", "run.dir=runs/abc"])
    for var in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME"):
        monkeypatch.delenv(var, raising=False)
    assert wandb_identity(cfg) == {"mode": "offline", "project": "p", "entity": "team-a", "name": "abc"}
    monkeypatch.setenv("WANDB_ENTITY", "team-b")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    identity = wandb_identity(cfg)
    assert identity["entity"] == "team-b" and identity["mode"] == "disabled"


def test_metrics_jsonl_survives_a_line_cut_by_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = load_config(None, ["logging.tensorboard=false"])
    tracker = Tracker(cfg, tmp_path, is_main=True, start_step=0, total_steps=3)
    tracker.log(1, {"loss": 0.5})
    tracker.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "lo')  # what a SIGKILL mid-write leaves
    tracker = Tracker(cfg, tmp_path, is_main=True, start_step=1, total_steps=3)
    tracker.log(2, {"loss": 0.25})
    tracker.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 0.5), (2, 0.25)]


def test_other_ranks_write_nothing(tmp_path):
    tracker = Tracker(load_config(), tmp_path, is_main=False, start_step=0, total_steps=1)
    tracker.log(1, {"loss": 1.0})
    tracker.close()
    assert not list(tmp_path.iterdir())


def test_throughput_rates_and_mfu():
    cfg = load_config(None, ["logging.peak_tflops=1", "train.micro_batch_size=2", "train.grad_accum=3"])
    info = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    unet_config = tiny_unet_config()
    meter = Throughput(cfg, info, unet_config)
    out = meter.metrics({"loss": 0.1, "data_wait_s": 0.5}, 2.0, lr=1e-4)
    assert out["samples_per_s"] == pytest.approx(2 * 3 * 2 / 2.0)  # objects per step / seconds
    assert out["data_stall_pct"] == pytest.approx(25.0)
    images = 2 * 3 * 2 * 2 * 6  # objects per step × 2 domains × 6 views
    flops = unet_train_flops(unet_config, images, cfg.data.resolution // 8)
    assert out["mfu_pct"] == pytest.approx(100 * flops / 2.0 / (2 * 1e12))
    assert "mfu_pct" not in Throughput(load_config(), info, unet_config).metrics({"loss": 0.1}, 1.0, lr=0)


def test_metrics_jsonl_leaves_non_finite_values_out_and_names_them(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = Tracker(load_config(None, ["logging.tensorboard=false"]), tmp_path, is_main=True, start_step=0,
                      total_steps=1)  # fmt: skip
    tracker.log(1, {"loss": math.nan, "loss_color": 0.5, "grad_norm": math.inf})
    tracker.close()
    (record,) = strict_records(tmp_path / "metrics.jsonl")
    assert record["loss_color"] == 0.5 and "loss" not in record and "grad_norm" not in record
    assert record["nonfinite"] == ["grad_norm", "loss"], "a diverged value must stay visible"


@pytest.mark.slow
def test_stage1_mix_mode_logs_only_the_domains_it_trained(tmp_path, demo_cache):
    run_dir = tmp_path / "stage1"
    # One object per step: each step trains exactly one domain (a fair coin per object).
    train(
        run_dir, demo_cache, "data.mode=mix", "model.cd_attention_mid=false", "train.micro_batch_size=1",
        "run.max_steps=6", "checkpoint.every=6",
    )  # fmt: skip
    records = [r for r in strict_records(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 7))
    domains = [tuple(k for k in ("loss_normal", "loss_color") if k in r) for r in records]
    assert all(len(d) == 1 for d in domains), f"each step logs only the domain it trained: {domains}"
    assert all("nonfinite" not in r for r in records)
