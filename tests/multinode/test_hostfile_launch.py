"""One ``deepspeed --hostfile`` command on node0 trains on two hosts it reaches over ssh (pdsh), as on a cluster.

The hosts are network namespaces with their own sshd (tests/multinode/harness.py), set up the way the README
tells users to: password-less ssh with a ConnectTimeout, a hostfile, a .deepspeed_env with what DeepSpeed's
runner does not forward by itself (it forwards only PYTHON*, MLFLOW*, MV2*, UCX* variables), and
GLOO_SOCKET_IFNAME where a node's hostname resolves to 127.0.1.1 (Debian's /etc/hosts), since gloo binds
the address of the hostname.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.distributed import free_port
from tests.engine.runs import REPO, TINY, env
from tests.multinode.harness import SILENT_HOST, Cluster

VENV_BIN = Path(sys.executable).parent
STEPS = ("run.max_steps=3", "checkpoint.every=3")
# What every node's ranks need and DeepSpeed's runner does not forward on its own.
NODE_ENV = {
    "DS_ACCELERATOR": "cpu",
    "OMP_NUM_THREADS": "1",
    "WANDB_MODE": "disabled",
    "GLOO_SOCKET_IFNAME": "eth0",
    "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
}
LAUNCH_BOUND_S = 30  # a launch that cannot work must end within this, naming why
RUN_TIMEOUT_S = 300


def write_deepspeed_env(path: Path) -> Path:
    # DeepSpeed splits every line at its first "=": no comments, no blank lines.
    path.write_text("".join(f"{key}={value}\n" for key, value in NODE_ENV.items()))
    return path


def head_env(deepspeed_env: Path) -> dict[str, str]:
    out = env()
    out["DS_ENV_FILE"] = str(deepspeed_env)  # what ~/.deepspeed_env does, without this machine's home
    return out


def deepspeed_args(hostfile: Path, run_dir: Path, cache: Path, *overrides: str) -> list[str]:
    return [
        str(VENV_BIN / "deepspeed"),
        f"--hostfile={hostfile}",
        "--master_addr=node0",
        f"--master_port={free_port()}",
        "launcher/train.py",
        "--deepspeed=ds_configs/zero2.json",
        *TINY,
        f"run.dir={run_dir}",
        f"data.demo_cache={cache}",
        *STEPS,
        *overrides,
    ]


def rank_processes(cluster: Cluster, index: int) -> dict[int, tuple[str, dict[str, str]]]:
    """The training ranks running on node ``index`` now: rank → (argv[0], environment), read from /proc."""
    found = {}
    for pid in cluster.pids_on(index):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # ended while we looked
            continue
        if b"launcher/train.py" not in argv or b"deepspeed.launcher.launch" in argv:
            continue
        variables = dict(item.decode().split("=", 1) for item in environ if b"=" in item)
        found[int(variables["RANK"])] = (argv[0].decode(), variables)
    return found


def run_on_head(cluster: Cluster, args: list[str], head: dict, log: Path, watch_node: int = 1):
    """Run ``args`` on node0; returns (exit code, wall seconds, the ranks seen on ``watch_node``)."""
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(
            cluster.command_on(0, args, REPO), env=head, stdout=out, stderr=subprocess.STDOUT
        )
    seen: dict[int, tuple[str, dict[str, str]]] = {}
    try:
        while proc.poll() is None:
            assert time.monotonic() - started < RUN_TIMEOUT_S, f"no end after {RUN_TIMEOUT_S} s: {log}"
            seen.update(rank_processes(cluster, watch_node))
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()  # the cluster's close() ends what it started on the nodes
    return proc.returncode, time.monotonic() - started, seen


def finished_run_losses(run_dir: Path, log: Path, world_size: int) -> list[float]:
    """Assert a 3-step run that checkpointed and ended with identical replicas; its loss per step."""
    output = log.read_text()
    assert f"world size {world_size}" in output, output[-5000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    training = [r for r in records if "loss" in r]
    assert [r["step"] for r in training] == [1, 2, 3]
    assert records[-1]["replicas_in_sync"] == 1.0  # sha256 of every parameter equal on every rank
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000003"
    return [r["loss"] for r in training]


@pytest.mark.slow
@pytest.mark.multiproc
def test_torchrun_on_each_node_over_ssh_trains_two_nodes(make_cluster, tmp_path, demo_cache):
    # First in this file, so the demo data is on disk before the timed runs below.
    # The recipe for launchers that start one process per node (srun, mpirun, a shell loop over ssh):
    # torchrun on every node with its --node_rank. Each node's name resolves to 127.0.1.1 on that node
    # (Debian's /etc/hosts) and GLOO_SOCKET_IFNAME is unset: engine.distributed must choose eth0 on both
    # nodes, or gloo binds loopback on node0 and node1 cannot connect.
    cluster = make_cluster(2, hostname_on_loopback=True)
    run_dir, port = tmp_path / "run", free_port()
    variables = {**NODE_ENV, "PYTHONPATH": str(REPO)}
    del variables["GLOO_SOCKET_IFNAME"]
    train = ["launcher/train.py", "--deepspeed=ds_configs/zero2.json", *TINY, *STEPS]
    train += [f"run.dir={run_dir}", f"data.demo_cache={demo_cache}"]
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    procs = []
    for rank, log in enumerate(logs):
        torchrun = f"{VENV_BIN}/torchrun --nnodes=2 --nproc_per_node=1 --node_rank={rank}"
        torchrun += f" --master_addr=node0 --master_port={port}"
        exports = " ".join(f"{key}={value}" for key, value in variables.items())
        remote = f"cd {REPO} && env {exports} {torchrun} {' '.join(train)}"
        with log.open("w") as out:
            procs.append(
                subprocess.Popen(
                    cluster.command_on(0, ["ssh", f"node{rank}", remote]), stdout=out, stderr=out
                )
            )
    for proc, log in zip(procs, logs):
        assert proc.wait(timeout=RUN_TIMEOUT_S) == 0, log.read_text()[-5000:]
    finished_run_losses(run_dir, logs[0], world_size=2)
    for log in logs:
        assert "gloo: using interface eth0" in log.read_text()


@pytest.mark.slow
@pytest.mark.multiproc
def test_one_hostfile_command_trains_on_two_nodes_over_ssh(make_cluster, tmp_path, demo_cache):
    cluster = make_cluster(2, hostname_on_loopback=True)
    head = head_env(write_deepspeed_env(tmp_path / "deepspeed_env"))
    hostfile = cluster.write_hostfile(tmp_path / "hostfile", slots=2)
    two_nodes, log = tmp_path / "two_nodes", tmp_path / "two_nodes.log"
    code, _, remote = run_on_head(cluster, deepspeed_args(hostfile, two_nodes, demo_cache), head, log)
    assert code == 0, log.read_text()[-5000:]
    assert "cmd = pdsh" in log.read_text()  # one command, the other node reached through pdsh/ssh
    finished_run_losses(two_nodes, log, world_size=4)
    assert sorted(remote) == [2, 3], "node1 should run ranks 2 and 3"
    for rank, (interpreter, variables) in remote.items():
        assert Path(interpreter).parent == VENV_BIN, f"rank {rank} ran {interpreter}, not the venv's python"
        for key, value in NODE_ENV.items():
            assert variables.get(key) == value, f"rank {rank} on node1: {key}={variables.get(key)}"
    # What the second host costs (vs the same command on one host) is measured side by side in
    # benchmarks/bench_multinode.py, not timed here.


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_host_that_does_not_answer_ends_the_launch_within_the_rendezvous_timeout(
    cluster, tmp_path, demo_cache
):
    # DeepSpeed tries ssh on the first host only; pdsh then fails on the silent one after ssh's ConnectTimeout
    # (5 s in the ssh config, not the kernel's ~2 min) while node0's rank waits at the rendezvous.
    head = head_env(write_deepspeed_env(tmp_path / "deepspeed_env"))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"node0 slots=1\n{SILENT_HOST} slots=1\n")
    args = deepspeed_args(hostfile, tmp_path / "run", demo_cache, "run.rendezvous_timeout_s=3")
    log = tmp_path / "launch.log"
    code, wall_s, _ = run_on_head(cluster, args, head, log)
    output = log.read_text()
    assert code != 0, output[-5000:]
    assert wall_s < LAUNCH_BOUND_S
    assert f"{SILENT_HOST}: ssh exited with exit code 255" in output  # pdsh names the host
    assert "rendezvous failed: 1 of 2 ranks joined at node0:" in output  # and the rank that came says so


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_run_dir_on_each_nodes_own_disk_is_refused(make_cluster, tmp_path, demo_cache):
    node_local = tmp_path / "node_local"
    node_local.mkdir()
    cluster = make_cluster(2, private_dirs=[node_local])  # each node mounts its own empty disk there
    head = head_env(write_deepspeed_env(tmp_path / "deepspeed_env"))
    hostfile = cluster.write_hostfile(tmp_path / "hostfile", slots=1)
    log = tmp_path / "launch.log"
    code, wall_s, _ = run_on_head(
        cluster, deepspeed_args(hostfile, node_local / "run", demo_cache), head, log
    )
    output = log.read_text()
    assert code == 2, output[-5000:]
    assert wall_s < LAUNCH_BOUND_S
    assert "is not on a filesystem shared by all nodes" in output
    assert "rank 1 (host node1): no such folder" in output


def test_check_hostfile_names_each_host_that_does_not_answer(cluster, tmp_path):
    # DeepSpeed tries ssh on the first host only: a later silent host is what the preflight is for.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"node0 slots=1\n{SILENT_HOST} slots=1\nnode1 slots=1\n")
    check = [sys.executable, "launcher/check_hostfile.py", str(hostfile), "--timeout=3"]
    started = time.monotonic()
    done = cluster.run_on(0, check, REPO, timeout=LAUNCH_BOUND_S)
    assert time.monotonic() - started < 10
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"{hostfile}:2: {SILENT_HOST}: ssh failed: ssh: connect to host {SILENT_HOST} port 22: Connection timed out"
    ]
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    done = cluster.run_on(0, check, REPO, timeout=LAUNCH_BOUND_S)
    assert done.returncode == 0, done.stderr
    assert "2 hosts, 2 slots" in done.stdout
