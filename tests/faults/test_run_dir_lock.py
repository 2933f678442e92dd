"""One run per run dir: a second real training process on a busy run.dir is refused in one line naming the
holder (exit 2) and the first run's checkpoints and metrics stay its own; stale locks (a SIGKILLed holder on
this host, an old heartbeat from another host) are taken over; ``--check`` never takes the lock."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from engine.config import load_config
from engine.rundir import LOCK_NAME, RunDirInUse, lock_run_dir
from launcher.train import main as train_main
from tests.engine.runs import REPO, TINY, command, env, launch, losses_by_step

FIRST = ["run.max_steps=60", "checkpoint.every=20", "checkpoint.keep_last=10"]
STALE_S = 300
SECOND_LR = 0.000321


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.multiproc
def test_second_run_on_a_busy_run_dir_is_refused_and_the_first_is_untouched(tmp_path, demo_cache):
    run_dir = tmp_path / "run"
    args = [*command(1, 0), *TINY, f"run.dir={run_dir}", f"data.demo_cache={demo_cache}", *FIRST]
    first = subprocess.Popen(
        args, env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not losses_by_step(run_dir):
            assert first.poll() is None, f"first run ended early:\n{first.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "first run never logged a step"
            time.sleep(0.1)
        lock = run_dir / LOCK_NAME
        lock_before = lock.read_text() if lock.exists() else None

        # A colleague's run that could resume this one (same stream settings) but saves every step with its
        # own learning rate: anything it wrote would show in the checks below.
        second = launch(
            run_dir, demo_cache, "run.max_steps=65", "checkpoint.every=1", f"train.lr={SECOND_LR}"
        )
        assert second.returncode == 2, f"the second run exited {second.returncode}:\n{second.stderr[-3000:]}"
        check = launch(run_dir, demo_cache, "--check")
        assert first.poll() is None, "the first run ended before the second was refused: make it longer"

        for proc in (second, check):
            assert proc.returncode == 2, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
            lines = error_lines(proc.stderr)
            assert len(lines) == 1, f"want one line, got:\n{proc.stderr[-3000:]}"
            assert "in use by another run" in lines[0], lines[0]
            assert f"host {socket.gethostname()}, pid {first.pid}, started " in lines[0], lines[0]
            assert "heartbeat" in lines[0] and str(run_dir / LOCK_NAME) in lines[0], lines[0]
        assert lock.read_text() == lock_before, "--check or the refused run touched the lock"

        _, stderr = first.communicate(timeout=300)
        assert first.returncode == 0, f"first run failed after the refusal:\n{stderr[-3000:]}"
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 61)), f"metrics.jsonl interleaved: {steps}"
    tags = sorted(p.name for p in (run_dir / "checkpoints").glob("step*"))
    assert tags == [f"step{s:08d}" for s in (20, 40, 60)], tags
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000060"
    for config in [run_dir / "config.yaml", *(run_dir / "checkpoints" / t / "run_config.yaml" for t in tags)]:
        assert yaml.safe_load(config.read_text())["train"]["lr"] != SECOND_LR, f"{config} is the second run's"
    assert not (run_dir / LOCK_NAME).exists(), "the lock outlived the run"


def test_check_never_takes_the_lock(tmp_path):
    run_dir = tmp_path / "run"
    assert train_main(["--check", *TINY, f"run.dir={run_dir}", f"data.demo_cache={tmp_path}/cache"]) == 0
    assert not (run_dir / LOCK_NAME).exists()


def config_for(run_dir: Path):
    return load_config(None, [f"run.dir={run_dir}", f"run.lock_stale_s={STALE_S}"])


def hold_lock_in_a_process(run_dir: Path) -> subprocess.Popen:
    """A real process that takes the lock of ``run_dir`` the way a training run does, then waits."""
    code = (
        "import sys, time\n"
        "from engine.config import load_config\n"
        "from engine.rundir import lock_run_dir\n"
        f"lock_run_dir(load_config(None, ['run.dir={run_dir}']), is_main=True, world_size=1)\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env(), cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.multiproc
def test_lock_of_a_live_process_refuses_and_of_a_killed_one_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = hold_lock_in_a_process(run_dir)
    try:
        with pytest.raises(
            RunDirInUse, match=rf"in use by another run \(host .*, pid {holder.pid}, started "
        ):
            lock_run_dir(config_for(run_dir), is_main=True, world_size=1)
    finally:
        holder.send_signal(signal.SIGKILL)  # as the OOM killer or a scheduler would: no cleanup runs
        holder.wait()
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == holder.pid, "the killed run left no lock"
    capsys.readouterr()

    lock = lock_run_dir(config_for(run_dir), is_main=True, world_size=1)
    try:
        warnings = error_lines(capsys.readouterr().err)
        assert len(warnings) == 1 and "taking over a stale lock" in warnings[0], warnings
        assert f"pid {holder.pid}" in warnings[0] and "is gone" in warnings[0], warnings[0]
        assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (run_dir / LOCK_NAME).exists()


def forge_other_host_lock(run_dir: Path, heartbeat_age_s: float) -> None:
    """The lock a run on another node writes (this host cannot see that node's processes)."""
    run_dir.mkdir(parents=True)
    lock = run_dir / LOCK_NAME
    owner = {"host": "node-b.cluster", "pid": 4242, "pid_start": "boot:1", "started": time.time() - 3600}
    lock.write_text(json.dumps({**owner, "token": "0123456789abcdef"}))
    beat = time.time() - heartbeat_age_s
    os.utime(lock, (beat, beat))


def test_lock_of_another_host_with_a_fresh_heartbeat_refuses(tmp_path):
    forge_other_host_lock(tmp_path / "run", heartbeat_age_s=20)
    with pytest.raises(RunDirInUse, match=r"host node-b.cluster, pid 4242, started .* heartbeat 2\d s ago"):
        lock_run_dir(config_for(tmp_path / "run"), is_main=True, world_size=1)
    assert "node-b" in (tmp_path / "run" / LOCK_NAME).read_text(), "a refused run must leave the lock alone"


def test_lock_of_another_host_with_an_old_heartbeat_is_taken_over(tmp_path, capsys):
    forge_other_host_lock(tmp_path / "run", heartbeat_age_s=STALE_S + 100)
    lock = lock_run_dir(config_for(tmp_path / "run"), is_main=True, world_size=1)
    lock.release()
    warnings = error_lines(capsys.readouterr().err)
    assert len(warnings) == 1, warnings
    assert "host node-b.cluster" in warnings[0] and f"run.lock_stale_s={STALE_S}" in warnings[0], warnings[0]


def test_heartbeat_keeps_the_lock_fresh(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}", "run.lock_stale_s=1.2"])  # a beat every 0.2 s
    lock = lock_run_dir(cfg, is_main=True, world_size=1)
    try:
        os.utime(tmp_path / LOCK_NAME, (0, 0))
        time.sleep(1.0)
        assert time.time() - (tmp_path / LOCK_NAME).stat().st_mtime < 1.0, "no heartbeat"
    finally:
        lock.release()
