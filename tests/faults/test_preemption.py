"""Preemption: a real SIGTERM / SIGUSR1 to the launcher's process group (as Kubernetes and SLURM send it) makes
every rank finish its step, save a checkpoint there and exit 75; the next start loses no step and continues
bit-exact."""

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.engine.runs import (
    REPO,
    TINY,
    command,
    env,
    losses_by_step,
    metrics_lines,
    train,
    training_records_after,
)

EXIT_PREEMPTED = 75  # engine.preempt.EXIT_PREEMPTED, spelled out so the test also runs against older trees
# No periodic checkpoint before the end: without preemption handling every step before the signal is lost.
STEPS = ["run.max_steps=8", "checkpoint.every=100", "checkpoint.keep_last=2"]
SIGNAL_AFTER_STEP = 3


@pytest.fixture(scope="module")
def straight(tmp_path_factory, demo_cache):
    """The uninterrupted run (per number of processes) every preempted one must match, loss for loss."""
    runs: dict[int, dict] = {}

    def losses(nproc: int) -> dict[int, dict]:
        if nproc not in runs:
            run_dir = tmp_path_factory.mktemp(f"straight{nproc}") / "run"
            train(run_dir, demo_cache, *STEPS, nproc=nproc, port=29900 + nproc)
            runs[nproc] = losses_by_step(run_dir)
        return runs[nproc]

    return losses


def rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of one rank among the launcher's children (by the RANK it was started with)."""
    for child in psutil.Process(launcher_pid).children():
        if child.environ().get("RANK") == str(rank):
            return child.pid
    raise AssertionError(f"no rank {rank} under process {launcher_pid}")


def train_and_signal(
    run_dir: Path,
    cache: Path,
    sig: int,
    *overrides: str,
    nproc: int,
    port: int,
    only_rank: int | None = None,
) -> tuple[int, str]:
    """Start training in its own session, send ``sig`` to the whole process group (or only to rank
    ``only_rank``) once step 3 is logged, and wait until every process holding the output (launcher, ranks,
    data workers) has exited.

    Returns (the launched process's exit code, stdout + stderr)."""
    args = [
        *command(nproc, port),
        *TINY,
        f"run.dir={run_dir}",
        f"data.demo_cache={cache}",
        *STEPS,
        *overrides,
    ]
    proc = subprocess.Popen(
        args,
        env=env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not any(step >= SIGNAL_AFTER_STEP for step in losses_by_step(run_dir)):
            assert proc.poll() is None, f"run ended before the signal:\n{proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "run never reached the signal step"
            time.sleep(0.05)
        if only_rank is None:
            os.killpg(proc.pid, sig)
        else:
            os.kill(rank_pid(proc.pid, only_rank), sig)
        output, _ = proc.communicate(timeout=120)  # EOF once the ranks that outlive a launcher are gone too
        return proc.returncode, output
    finally:
        with contextlib.suppress(ProcessLookupError):  # anything left over (also after a failed assertion)
            os.killpg(proc.pid, signal.SIGKILL)


def resume_matches_straight(
    run_dir: Path, cache: Path, straight: dict, *, stopped: int, nproc: int, port: int
):
    logged = metrics_lines(run_dir)
    out = train(run_dir, cache, *STEPS, nproc=nproc, port=port)
    assert f"starting at step {stopped}" in out.stdout, out.stdout[-2000:]
    rerun = [r["step"] for r in training_records_after(run_dir, logged)]
    assert rerun == list(range(stopped + 1, 9)), f"stopped after step {stopped}, resumed with steps {rerun}"
    resumed = losses_by_step(run_dir)
    assert sorted(resumed) == sorted(straight) == list(range(1, 9))
    for step in range(1, 9):
        for key in ("loss", "loss_normal", "loss_color"):
            assert resumed[step][key] == straight[step][key], f"step {step} {key} differs after the resume"


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize(
    ("sig", "nproc"),
    # Both signals and both process counts in two launches. torchrun forwards SIGTERM to its ranks, not SIGUSR1
    # (a cluster sends that to the ranks themselves): so SIGUSR1 is tested with the rank as the launched process.
    [(signal.SIGUSR1, 1), (signal.SIGTERM, 2)],
    ids=["SIGUSR1-1proc", "SIGTERM-2proc"],
)
def test_signal_saves_the_current_step_and_the_resume_loses_none(tmp_path, demo_cache, straight, sig, nproc):
    run_dir = tmp_path / "run"
    port = 29910 + 10 * nproc + (sig == signal.SIGUSR1)
    code, output = train_and_signal(run_dir, demo_cache, sig, nproc=nproc, port=port)

    trained = max(losses_by_step(run_dir))
    assert SIGNAL_AFTER_STEP <= trained < 8, f"the signal must land mid-run (last step logged {trained})"
    latest = run_dir / "checkpoints" / "latest"
    assert latest.is_file(), (
        f"no checkpoint after {signal.Signals(sig).name} at step {trained}: {output[-3000:]}"
    )
    assert latest.read_text() == f"step{trained:08d}", (
        "the checkpoint is not at the step the run stopped after"
    )
    assert f"preempted ({signal.Signals(sig).name}) after step {trained}" in output, output[-3000:]
    if nproc == 1:  # the rank is the launched process: its code reaches the caller
        assert code == EXIT_PREEMPTED, f"exit code {code}:\n{output[-3000:]}"
    else:  # torchrun forwards the SIGTERM to its ranks (in their own session) and reports its own failure
        assert f"exiting with code {EXIT_PREEMPTED}" in output, output[-3000:]
    resume_matches_straight(run_dir, demo_cache, straight(nproc), stopped=trained, nproc=nproc, port=port + 5)


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path, demo_cache):
    """The signal reaches ranks at different times (here: only rank 1); all must stop and save together."""
    run_dir = tmp_path / "run"
    _, output = train_and_signal(run_dir, demo_cache, signal.SIGUSR1, nproc=2, port=29960, only_rank=1)
    trained = max(losses_by_step(run_dir))
    assert SIGNAL_AFTER_STEP <= trained < 8, f"the signal must land mid-run (last step logged {trained})"
    latest = run_dir / "checkpoints" / "latest"
    assert latest.is_file() and latest.read_text() == f"step{trained:08d}", output[-3000:]
    assert f"preempted (a preemption signal on another rank) after step {trained}" in output, output[-3000:]
    # Both ranks took part in the save (a collective with barriers; a rank left training would hang it). Rank 0
    # exits 75 first; torchrun then SIGTERMs the other rank on its way out, so only rank 0's code is reported.
    assert f"exitcode  : {EXIT_PREEMPTED} (pid" in output, output[-3000:]


@pytest.mark.slow
def test_a_save_over_the_grace_period_says_so_and_keeps_the_previous_checkpoint(tmp_path, demo_cache):
    run_dir = tmp_path / "run"
    no_save_fits = "checkpoint.preempt_grace_s=0.001"  # the watchdog must end the run before the save ends
    code, output = train_and_signal(run_dir, demo_cache, signal.SIGTERM, no_save_fits, nproc=1, port=29970)
    lines = [line for line in output.splitlines() if "did not finish within" in line]
    assert code == 1 and len(lines) == 1, f"exit code {code}:\n{output[-3000:]}"
    assert "checkpoint.preempt_grace_s=0.001" in lines[0] and "checkpoints/latest" in lines[0], lines[0]
    assert not (run_dir / "checkpoints" / "latest").exists(), "no checkpoint can have been published"
