"""Resume: a SIGKILLed run continues from its newest checkpoint bit-exact; a resume that could not is refused."""

import shutil
import time

import pytest

from tests.engine.runs import (
    launch,
    losses_by_step,
    metrics_lines,
    train,
    train_and_kill,
    training_records_after,
)

STEPS = ["run.max_steps=8", "checkpoint.every=2", "checkpoint.keep_last=2"]


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_and_resume_is_bit_exact(tmp_path, demo_cache, nproc):
    port = 29600 + nproc * 10
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train(straight, demo_cache, *STEPS, nproc=nproc, port=port)
    train_and_kill(crashed, demo_cache, *STEPS, kill_after_step=5, nproc=nproc, port=port + 1)
    before = losses_by_step(crashed)
    assert max(before) >= 5 and max(before) < 8, "the kill must land mid-run"
    checkpoint = (crashed / "checkpoints" / "latest").read_text()
    resume_step = int(checkpoint.removeprefix("step"))
    assert 4 <= resume_step < 8, checkpoint
    logged = resume_step  # the resume keeps one record per step up to its checkpoint and drops the rest
    out = train(crashed, demo_cache, *STEPS, nproc=nproc, port=port + 2)

    # The second run started at the checkpoint and trained only the steps after it.
    assert f"starting at step {resume_step}" in out.stdout, out.stdout[-2000:]
    rerun = [r["step"] for r in training_records_after(crashed, logged)]
    assert rerun == list(range(resume_step + 1, 9)), f"resumed from {checkpoint}, then trained steps {rerun}"
    expected, resumed = losses_by_step(straight), losses_by_step(crashed)
    assert sorted(expected) == sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        for key in ("loss", "loss_normal", "loss_color"):
            assert resumed[step][key] == expected[step][key], f"step {step} {key} differs"
    # The newest checkpoint is complete and the pointer names it; no temporary save is left behind.
    ckpts = crashed / "checkpoints"
    assert (ckpts / "latest").read_text() == "step00000008"
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")]
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step00000006", "step00000008"]


# ------------------------------------------------------------------- resumes that cannot continue the run


FIRST = ["run.max_steps=2", "checkpoint.every=2"]
WRITTEN = ("config.yaml", "ds_config.json", "metrics.jsonl")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, demo_cache):
    """A 2-step run with its checkpoint at step 2."""
    run_dir = tmp_path_factory.mktemp("resume_checks") / "run"
    train(run_dir, demo_cache, *FIRST, port=29641)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize(
    "change",
    ["train.micro_batch_size=1", "data.workers=2", "run.seed=7", "train.grad_accum=2"],
)
def test_resume_with_another_data_stream_or_global_batch_is_refused(finished, demo_cache, change):
    before = {name: (finished / name).read_bytes() for name in WRITTEN}
    started = time.monotonic()
    proc = launch(finished, demo_cache, *FIRST, "run.max_steps=4", change, port=29642)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    key = change.split("=")[0]
    saved = finished / "checkpoints" / "step00000002" / "run_config.yaml"
    assert key in lines[0] and "command line" in lines[0] and str(saved) in lines[0], lines[0]
    assert time.monotonic() - started < 30, "refused before the process group and the checkpoint load"
    assert {name: (finished / name).read_bytes() for name in WRITTEN} == before


@pytest.mark.slow
def test_resume_with_another_grad_accum_when_allowed(finished, demo_cache, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    logged = metrics_lines(run_dir)
    out = train(
        run_dir, demo_cache, *FIRST, "run.max_steps=3", "train.grad_accum=2", "run.allow_batch_change=true"
    )
    warnings = [line for line in out.stderr.splitlines() if "run.allow_batch_change" in line]
    assert len(warnings) == 1 and "from 2 to 4 objects" in warnings[0], out.stderr[-2000:]
    assert "starting at step 2" in out.stdout
    assert [r["step"] for r in training_records_after(run_dir, logged)] == [3]
