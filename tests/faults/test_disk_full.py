"""A checkpoint save that runs out of room (a real RLIMIT_FSIZE, a real full tmpfs) stops the run with one line
naming the reason, the file and the free bytes (exit 74, no traceback); the previous checkpoint and ``latest``
stay intact, and the next start removes a partial ``.tmp-step`` save and resumes from ``latest``. With two
ranks, one rank's failed write stops both (no rank waits at a barrier for ever)."""

import contextlib
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.engine.runs import REPO, TINY, command, env, losses_by_step, train

EXIT_STORAGE = 74  # engine.storage.EXIT_STORAGE, spelled out so the test also runs against older trees
SAVES = ["checkpoint.every=2", "checkpoint.keep_last=3"]


def launch_with(run_dir: Path, cache: Path, *overrides: str, preexec_fn=None) -> subprocess.CompletedProcess:
    """``tests.engine.runs.launch`` with a ``preexec_fn`` (the resource limit goes on the training process)."""
    args = [*command(1, 0), *TINY, f"run.dir={run_dir}", f"data.demo_cache={cache}", *overrides]
    return subprocess.run(
        args, env=env(), cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=preexec_fn
    )


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (the checkpoints folder), by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def stop_line(proc: subprocess.CompletedProcess) -> str:
    """The one line that says why the run stopped; no traceback anywhere."""
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output[-4000:]
    lines = [line for line in output.replace("\r", "\n").splitlines() if "training stopped" in line]
    assert len(lines) == 1, f"want one line, got {lines}:\n{output[-4000:]}"
    return lines[0]


def assert_previous_checkpoint_intact(run_dir: Path, before: dict[str, str]) -> None:
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text() == "step00000002", "latest moved off the last complete checkpoint"
    assert snapshot(root) == before, "the previous checkpoint changed"
    assert not list(root.glob(".tmp-*")), "the partial save was left taking up room"
    assert not (run_dir / "run.lock").exists(), "the run dir lock outlived the failed run"


@pytest.mark.slow
@pytest.mark.multiproc
def test_file_size_limit_stops_in_one_line_and_the_next_start_resumes(tmp_path, demo_cache):
    run_dir = tmp_path / "run"
    train(run_dir, demo_cache, "run.max_steps=2", *SAVES)
    before = snapshot(run_dir / "checkpoints")
    largest = max(p.stat().st_size for p in (run_dir / "checkpoints" / "step00000002").iterdir())
    limit = largest // 2  # the next save's largest file cannot be written; logs and configs can

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = launch_with(run_dir, demo_cache, "run.max_steps=4", *SAVES, preexec_fn=limit_file_size)
    assert proc.returncode == EXIT_STORAGE, f"exit {proc.returncode}:\n{proc.stderr[-4000:]}"
    line = stop_line(proc)
    assert "checkpoint step00000004 was not saved (`latest` is still step00000002)" in line, line
    assert "file size limit" in line and f"RLIMIT_FSIZE is {limit:,} bytes" in line, line
    assert str(run_dir / "checkpoints" / ".tmp-step00000004") in line and "bytes free" in line, line
    assert_previous_checkpoint_intact(run_dir, before)

    # A save cut off by a kill (no room to clean up) leaves a partial folder: the next start removes it.
    partial = run_dir / "checkpoints" / ".tmp-step00000004"
    shutil.copytree(run_dir / "checkpoints" / "step00000002", partial)
    optim = next(partial.glob("*optim_states.pt"))
    os.truncate(optim, optim.stat().st_size // 3)
    out = train(run_dir, demo_cache, "run.max_steps=4", *SAVES)
    assert f"removed {partial}: a save that never finished" in out.stderr, out.stderr[-3000:]
    assert "starting at step 2" in out.stdout, out.stdout[-3000:]
    assert sorted(losses_by_step(run_dir)) == [1, 2, 3, 4]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000004"
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def mount_tmpfs(path: Path, size: int) -> bool:
    """Mount (or resize) a tmpfs of ``size`` bytes at ``path``; False where this user may not mount."""
    path.mkdir(exist_ok=True)
    options = f"size={size}" + (",remount" if os.path.ismount(path) else "")
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]).returncode == 0


@pytest.mark.slow
@pytest.mark.multiproc
def test_full_disk_stops_in_one_line_with_the_free_bytes(tmp_path, demo_cache):
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, 256 << 20):
        pytest.skip("cannot mount a tmpfs here (needs root); test_file_size_limit_... covers the save path")
    try:
        run_dir = disk / "run"
        train(run_dir, demo_cache, "run.max_steps=2", *SAVES)
        before = snapshot(run_dir / "checkpoints")
        checkpoint = sum(p.stat().st_size for p in (run_dir / "checkpoints" / "step00000002").iterdir())
        used = shutil.disk_usage(disk).used
        assert mount_tmpfs(disk, used + checkpoint // 2), "could not shrink the tmpfs"  # room for half a save

        proc = launch_with(run_dir, demo_cache, "run.max_steps=4", *SAVES)
        assert proc.returncode == EXIT_STORAGE, f"exit {proc.returncode}:\n{proc.stderr[-4000:]}"
        line = stop_line(proc)
        assert "checkpoint step00000004 was not saved (`latest` is still step00000002)" in line, line
        assert "disk full writing " + str(run_dir / "checkpoints" / ".tmp-step00000004") in line, line
        assert "bytes free there" in line, line
        assert_previous_checkpoint_intact(run_dir, before)
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def child_pids(
    parent: int, *, env_entry: bytes = b"", forked: bool = False, timeout: float = 120
) -> list[int]:
    """Pids of ``parent``'s child processes (with ``env_entry`` in their environment; ``forked``: running the
    parent's own command line, as a data worker does, not a compiler), once there is one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                status, environ = (entry / "status").read_text(), (entry / "environ").read_bytes()
                same_command = (entry / "cmdline").read_bytes() == Path(
                    f"/proc/{parent}/cmdline"
                ).read_bytes()
            except OSError:  # not a process, or gone
                continue
            if f"\nPPid:\t{parent}\n" not in status or (forked and not same_command):
                continue
            if not env_entry or env_entry in environ.split(b"\0"):
                found.append(int(entry.name))
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"process {parent} started no child {env_entry.decode()}")


@pytest.mark.slow
@pytest.mark.multiproc
def test_one_rank_out_of_room_stops_both_ranks(tmp_path, demo_cache):
    if not Path("/proc/self/environ").is_file():
        pytest.skip("finds the rank's process through /proc")
    run_dir = tmp_path / "run"
    args = [*command(2, 29941), *TINY, f"run.dir={run_dir}", f"data.demo_cache={demo_cache}"]
    args += ["run.max_steps=2", *SAVES]
    launcher = subprocess.Popen(
        args, env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    ranks = []
    try:
        ranks = [child_pids(launcher.pid, env_entry=f"RANK={r}".encode())[0] for r in (0, 1)]
        # Once its data worker runs (torch passes batches through /dev/shm files, which the limit also
        # counts), rank 1 alone cannot write a file over 1 MB: its ZeRO optimizer partition fails; rank 0
        # writes all its files.
        child_pids(ranks[1], forked=True, timeout=240)
        resource.prlimit(ranks[1], resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        output, _ = launcher.communicate(timeout=240)  # a rank left waiting at a barrier would hang here
    finally:
        for pid in [launcher.pid, *ranks]:  # torchrun starts each rank in its own process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    assert launcher.returncode != 0, output[-4000:]
    assert "training failed" not in output, output[-4000:]
    lines = [line for line in output.replace("\r", "\n").splitlines() if "training stopped" in line]
    assert len(lines) == 1, f"want one line (rank 0 speaks for both), got {lines}:\n{output[-4000:]}"
    partition = run_dir / "checkpoints" / ".tmp-step00000002" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert "checkpoint step00000002 was not saved (no checkpoint yet): file size limit" in lines[0], lines[0]
    assert f"writing {partition} (" in lines[0] and lines[0].count("(rank 1)") == 1, lines[0]
    root = run_dir / "checkpoints"
    left = [p.name for p in root.iterdir() if not p.name.startswith("zero_to_")] if root.is_dir() else []
    assert left == [], f"a partial or unpublished checkpoint was left: {left}"  # DeepSpeed's scripts may stay
