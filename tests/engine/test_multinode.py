"""Two "nodes" on loopback, each started by hand with ``deepspeed --no_ssh --node_rank`` (clusters without ssh
between nodes); the ssh launch from one command is tests/multinode/test_hostfile_launch.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.distributed import free_port
from tests.engine.runs import REPO, TINY, env


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_node_hostfile_run_keeps_replicas_identical(tmp_path, demo_cache):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    run_dir = tmp_path / "run"
    port = free_port()
    procs = []
    for node_rank in (0, 1):
        cmd = [
            str(Path(sys.executable).parent / "deepspeed"),
            "--hostfile",
            str(hostfile),
            "--no_ssh",
            f"--node_rank={node_rank}",
        ]
        cmd += ["--master_addr=127.0.0.1", f"--master_port={port}", "launcher/train.py"]
        cmd += [
            "--deepspeed",
            "ds_configs/zero2.json",
            *TINY,
            f"run.dir={run_dir}",
            f"data.demo_cache={demo_cache}",
        ]
        cmd += ["run.max_steps=3", "checkpoint.every=3"]
        # The launcher starts "python" from PATH: make it this interpreter (the venv's).
        launcher_env = env()
        launcher_env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + launcher_env["PATH"]
        procs.append(
            subprocess.Popen(
                cmd, env=launcher_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    assert "world size 2" in outputs[0]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert records[-1]["replicas_in_sync"] == 1.0  # sha256 of every parameter equal on both ranks
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000003"
