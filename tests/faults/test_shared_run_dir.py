"""A run dir that is not shared by the nodes: two "nodes" on loopback (one rank each, started as a launcher
starts them), node 1 in a mount namespace of its own with an empty tmpfs over the run dir's parent, so it sees
its own empty disk at the same path. Both refuse at start (exit 2) with one line from rank 0 naming rank 1,
before anything is rendered or trained, and rank 0's lock is released. (The shared case trains:
tests/engine/test_multinode.py, tests/faults/test_node_loss.py.)
"""

import contextlib
import os
import signal
import subprocess
import time

import pytest

from engine.distributed import free_port
from tests.engine.runs import start_rank


def can_unshare_mounts() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.skipif(not can_unshare_mounts(), reason="needs mount namespaces (root, or CAP_SYS_ADMIN)")
def test_run_dir_on_node_local_disks_is_refused_at_start(tmp_path):
    disk = tmp_path / "disk"  # node 1 gets an empty tmpfs here
    disk.mkdir()
    run_dir, cache = disk / "run", tmp_path / "demo_cache"
    mount_empty_disk = 'mount -t tmpfs tmpfs "$0" && exec "$@"'
    own_disk = ("unshare", "-m", "--propagation", "private", "sh", "-c", mount_empty_disk, str(disk))
    port, logs = free_port(), [tmp_path / "node0.log", tmp_path / "node1.log"]
    started = time.monotonic()
    nodes = [
        start_rank(run_dir, cache, "run.max_steps=2", rank=k, world_size=2, port=port, log=logs[k], wrap=wrap)
        for k, wrap in ((0, ()), (1, own_disk))
    ]
    try:
        codes = [node.wait(timeout=240) for node in nodes]
    finally:
        for node in nodes:  # each rank leads its own session: this ends its data workers too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
    took = time.monotonic() - started
    out0, out1 = (log.read_text() for log in logs)
    assert codes == [2, 2], f"{codes}\n{out0[-3000:]}\n{out1[-3000:]}"
    [line] = [line for line in out0.splitlines() if "not on a filesystem shared by all nodes" in line]
    assert line.startswith("config error: ") and f"{run_dir} is not on a filesystem shared" in line, line
    assert "1 of 2 ranks do not see rank 0's lock" in line and "rank 1 (host " in line, line
    assert "no such folder" in line, line  # node 1's disk is empty
    assert "not on a filesystem shared" not in out1  # one line, from rank 0
    assert "rendering" not in out0 + out1, "refused only after the demo started"
    assert list(run_dir.iterdir()) == [], "something was left in the run dir (the lock must be released)"
    print(f"refused in {took:.1f} s")
