"""metrics.jsonl after a kill -9 and a resume: one record per step, equal to the uninterrupted run's (the records
of steps trained again after the checkpoint are superseded and dropped, so readers need not dedupe)."""

import json

import pytest

from tests.engine.runs import losses_by_step, train, train_and_kill

STEPS = ["run.max_steps=8", "checkpoint.every=4", "checkpoint.keep_last=2"]


def training_records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "loss" in record]


@pytest.mark.slow
def test_a_resumed_run_logs_each_step_once(tmp_path, demo_cache):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train(straight, demo_cache, *STEPS, port=29761)
    train_and_kill(crashed, demo_cache, *STEPS, kill_after_step=6, port=29762)
    resume_step = int((crashed / "checkpoints" / "latest").read_text().removeprefix("step"))
    logged = max(losses_by_step(crashed))
    assert resume_step == 4 and logged >= 6, f"killed after step {logged}, checkpoint of step {resume_step}"

    train(crashed, demo_cache, *STEPS, port=29763)
    steps = [r["step"] for r in training_records(crashed)]
    assert steps == list(range(1, 9)), f"steps logged after the resume from step {resume_step}: {steps}"
    expected = {r["step"]: r for r in training_records(straight)}
    for record in training_records(crashed):
        for key in ("loss", "loss_normal", "loss_color", "lr", "skipped_steps"):
            assert record.get(key) == expected[record["step"]].get(key), f"step {record['step']} {key}"


def test_tracker_resumed_at_a_step_supersedes_the_later_records(tmp_path, monkeypatch):
    """The same rule in process, for metrics.jsonl and tensorboard (a line cut off by the kill goes too)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from engine.config import load_config
    from engine.tracking import Tracker

    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = load_config(None, ["logging.tensorboard=true"])
    first = Tracker(cfg, tmp_path, is_main=True, start_step=0, total_steps=6)
    for step in range(1, 6):
        first.log(step, {"loss": float(step)})
    first.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "lo')  # what a SIGKILL mid-write leaves
    resumed = Tracker(cfg, tmp_path, is_main=True, start_step=3, total_steps=6)
    for step in range(4, 7):
        resumed.log(step, {"loss": 10.0 + step})
    resumed.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [(r["step"], r["loss"]) for r in map(json.loads, lines)] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0), (6, 16.0)
    ]  # fmt: skip
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0), (6, 16.0)
    ]  # fmt: skip
