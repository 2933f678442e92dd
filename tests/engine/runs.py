"""Helpers for tests that launch real training runs as subprocesses (one or several processes)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAIN = str(REPO / "launcher" / "train.py")

# A tiny, fast run on 32² synthetic data; every test adds its own run.dir and overrides.
TINY = [
    "data.resolution=32",
    "model.demo_vae_steps=0",  # the VAE fit has its own tests; training mechanics don't need it
    "data.demo_objects=16",
    "data.workers=1",
    "data.shuffle_buffer=4",
    "train.micro_batch_size=2",
    "train.warmup_steps=2",
    "logging.every=1",
    "logging.wandb_mode=disabled",
    "logging.tensorboard=false",
    "validation.every=0",
    "validation.num_objects=1",
    "validation.steps=2",
]


RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def env() -> dict[str, str]:
    # In-process tests set this process's rendezvous variables; a child must not reuse its port.
    out = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    out.update(DS_ACCELERATOR="cpu", WANDB_MODE="disabled", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    out["PYTHONPATH"] = str(REPO) + os.pathsep + out.get("PYTHONPATH", "")
    return out


def command(nproc: int, port: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, TRAIN]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={port}",
        TRAIN,
    ]


def launch(
    run_dir: Path,
    cache: Path,
    *overrides: str,
    nproc: int = 1,
    port: int = 29511,
    timeout: int = 300,
    ds: str = "",
) -> subprocess.CompletedProcess:
    """Run ``launcher/train.py`` on the tiny config (``ds``: a DeepSpeed JSON under ds_configs/); any exit code."""
    ds_args = ["--deepspeed", str(REPO / "ds_configs" / ds)] if ds else []
    args = [
        *command(nproc, port),
        *ds_args,
        *TINY,
        f"run.dir={run_dir}",
        f"data.demo_cache={cache}",
        *overrides,
    ]
    return subprocess.run(args, env=env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def train(run_dir: Path, cache: Path, *overrides: str, **options) -> subprocess.CompletedProcess:
    """``launch`` that must succeed; raises with the output tail."""
    proc = launch(run_dir, cache, *overrides, **options)
    if proc.returncode != 0:
        raise AssertionError(
            f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def train_and_kill(
    run_dir: Path, cache: Path, *overrides: str, kill_after_step: int, nproc: int = 1, port: int = 29512
):
    """Start training and SIGKILL its whole process group once ``kill_after_step`` is logged."""
    args = [*command(nproc, port), *TINY, f"run.dir={run_dir}", f"data.demo_cache={cache}", *overrides]
    proc = subprocess.Popen(
        args, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO, start_new_session=True
    )
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"run ended before the kill: {proc.stderr.read()[-3000:]}")
            if any(r["step"] >= kill_after_step for r in losses_by_step(run_dir).values()):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return
            time.sleep(0.05)
        raise AssertionError("run never reached the kill step")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def losses_by_step(run_dir: Path) -> dict[int, dict]:
    """The last logged training record of every step in metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    records = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the line being written when we looked
                continue
            if "loss" in record:
                records[record["step"]] = record
    return records


def metrics_lines(run_dir: Path) -> int:
    """Complete lines in metrics.jsonl (a resumed run drops a line cut off by a kill and appends after these)."""
    path = run_dir / "metrics.jsonl"
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def training_records_after(run_dir: Path, line: int) -> list[dict]:
    """Training records (those with a loss) from line ``line`` of metrics.jsonl on."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()[line:]
    return [record for record in map(json.loads, lines) if "loss" in record]


def start_node(
    run_dir: Path,
    cache: Path,
    *overrides: str,
    node_rank: int,
    hostfile: Path,
    port: int,
    log: Path,
    wrap: tuple[str, ...] = (),
) -> subprocess.Popen:
    """One "node" of a loopback multi-node run: ``deepspeed --no_ssh --node_rank=K`` on the tiny config, in its
    own session (so ``os.killpg`` ends it with its ranks), stdout and stderr into ``log``.

    ``wrap``: a command the launcher runs under (e.g. ``unshare`` for a mount namespace of its own)."""
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    args = [
        *wrap,
        deepspeed,
        "--hostfile",
        str(hostfile),
        "--no_ssh",
        f"--node_rank={node_rank}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        TRAIN,
        *TINY,
        f"run.dir={run_dir}",
        f"data.demo_cache={cache}",
        *overrides,
    ]
    node_env = env()
    # The launcher starts "python" from PATH: make it this interpreter (the venv's).
    node_env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + node_env["PATH"]
    with open(log, "w") as out:
        return subprocess.Popen(
            args, env=node_env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def training_pids(launcher_pid: int) -> list[int]:
    """The training processes (ranks, not their data workers) under a launcher process."""
    import psutil

    found = {}
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            cmdline, parent = child.cmdline(), child.ppid()
        except psutil.NoSuchProcess:
            continue
        if any(arg.startswith("--local_rank=") for arg in cmdline) and TRAIN in cmdline:
            found[child.pid] = parent
    return [pid for pid, parent in found.items() if parent not in found]  # forked workers share the cmdline


def start_rank(
    run_dir: Path,
    cache: Path,
    *overrides: str,
    rank: int,
    world_size: int,
    port: int,
    log: Path,
    wrap: tuple[str, ...] = (),
) -> subprocess.Popen:
    """One rank started the way a launcher starts it (RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT set),
    without the launcher: a "node" of one rank at a fraction of the start-up cost. Own session (``os.killpg``
    ends it with its data workers); stdout and stderr into ``log``; ``wrap`` as in ``start_node``."""
    rank_env = env()
    rank_env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    rank_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    args = [*wrap, sys.executable, TRAIN, *TINY, f"run.dir={run_dir}", f"data.demo_cache={cache}", *overrides]
    with open(log, "w") as out:
        return subprocess.Popen(
            args, env=rank_env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
