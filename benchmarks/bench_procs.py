"""2 processes vs 1: demo objects/s of `deepspeed --num_gpus 2 launcher/train.py` (the README's command) vs
`python launcher/train.py`, side by side in one run, with the environment a user has (no OMP_NUM_THREADS).

Each side is a real training run of the CPU demo (ZeRO-2); its rate is read from metrics.jsonl: objects of
the steps after the first logged one ÷ the time between their records (start-up, the final checkpoint and
validation are not counted). Goal ≥ 1.5× on a 2-core machine.

    python benchmarks/bench_procs.py            # 150 steps per side; the old thread setup 20 steps
    python benchmarks/bench_procs.py --quick    # 50 steps per side (≤ 2 min on a quiet machine)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import main_args, write_result

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launcher" / "train.py")
GOAL = 1.5
OLD_STEPS = 20  # the old behaviour runs 2 processes 20-40x slower: keep it short
LOG_EVERY = 5
# The demo as configs/demo_cpu.yaml has it, without mid-run checkpoints or validation, and the end-of-run
# validation as small as it goes (it runs after the timed steps).
DEMO = [
    "validation.every=0",
    "validation.num_objects=1",
    "validation.steps=2",
    "checkpoint.every=100000",
    f"logging.every={LOG_EVERY}",
    "logging.tensorboard=false",
    "logging.wandb_mode=disabled",
]


def user_env(**extra: str) -> dict[str, str]:
    """This environment as a user's shell has it: none of the thread settings our test runners add."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "GNN3D_", "MKL_"))}
    out.update(DS_ACCELERATOR="cpu", WANDB_MODE="disabled", PYTHONUNBUFFERED="1", **extra)
    out["PYTHONPATH"] = str(ROOT) + os.pathsep + out.get("PYTHONPATH", "")
    return out


def launch_command(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, TRAIN]
    sys.path.insert(0, str(ROOT))
    from engine.distributed import free_port

    return ["deepspeed", "--num_gpus", str(processes), "--master_port", str(free_port()), TRAIN]


def demo_rate(processes: int, steps: int, env: dict[str, str], timeout: int = 900) -> dict:
    """Run the demo for ``steps`` steps on ``processes`` local ranks; objects/s and what it is made of."""
    with tempfile.TemporaryDirectory(prefix="bench_procs_") as tmp:
        args = [*launch_command(processes), *DEMO, f"run.dir={tmp}/run", f"run.max_steps={steps}"]
        proc = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:4])}... exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").open()]
    records = [r for r in records if "loss" in r]
    first, last = records[0], records[-1]  # the first logged interval holds the warm-up steps
    objects_per_step = 2 * processes  # the demo: micro-batch 2, no accumulation, per rank
    seconds = last["time"] - first["time"]
    threads = next((line for line in proc.stdout.splitlines() if line.startswith("threads:")), "")
    return {
        "processes": processes,
        "objects_per_s": (last["step"] - first["step"]) * objects_per_step / seconds,
        "timed_steps": last["step"] - first["step"],
        "timed_s": round(seconds, 3),
        "threads_line": threads,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def old_env() -> dict[str, str]:
    """What every rank got before gnn3d chose: all cores' worth of threads, libgomp's default spin-wait."""
    return user_env(OMP_NUM_THREADS=str(len(os.sched_getaffinity(0))), GOMP_SPINCOUNT="300000")


def run(quick: bool) -> dict:
    steps = 50 if quick else 150
    load_before = [round(x, 2) for x in os.getloadavg()]
    one = demo_rate(1, steps, user_env())
    two = demo_rate(2, steps, user_env())
    raw = {"one_process": one, "two_processes": two, "load_average_before": load_before}
    if not quick:
        raw["two_processes_old_threads"] = demo_rate(2, OLD_STEPS, old_env())
    ratio = two["objects_per_s"] / one["objects_per_s"]
    return {
        "config": {"config": "configs/demo_cpu.yaml", "steps": steps, "overrides": DEMO, "env": "no OMP_*"},
        "raw": raw,
        "ratio": ratio,
        "goal": f">= {GOAL}x",
        "met": ratio >= GOAL,
        "baseline": "1 process (python launcher/train.py), demo objects/s, same run",
        "summary": (
            f"deepspeed --num_gpus 2: {two['objects_per_s']:.2f} obj/s vs 1 process {one['objects_per_s']:.2f} "
            f"obj/s = {ratio:.2f}x (load average {load_before[0]:.1f} before)"
        ),
    }


def main(argv: list[str] | None = None) -> dict:
    args = main_args(__doc__, argv)
    payload = run(args.quick)
    print(f"{write_result('procs', payload)}: {payload['summary']}")
    return payload


if __name__ == "__main__":
    main()
