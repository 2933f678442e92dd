"""Data stall: the demo's training step fed by the shard streamer vs the same step fed from memory.

Both sides run ``engine.train.loop`` on one set-up run (demo config, DeepSpeed ZeRO-2, world size 1), in
rotation: ``streamer`` = the run's own loader (workers decoding and transforming shards while the step
runs); ``in_memory`` = a few batches read once and handed out again (the data path at no cost). The ratio is
streamer / in-memory seconds per step (goal ≤ 1.05×). The live metric is checked against it: the mean
``data_stall_pct`` the streamer run logged vs the measured stall 1 − in-memory/streamer time.

    python benchmarks/bench_stall.py            # 100 steps per side, 3 rounds
    python benchmarks/bench_stall.py --quick    # 25 steps per side, 2 rounds, 16 demo objects
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from common import main_args, write_result
from step_harness import InMemoryLoader, demo_run, timed_loop

from engine.train import Run

GOAL = 1.05


@dataclass(frozen=True)
class Sizes:
    steps: int = 100
    warmup: int = 5
    repeats: int = 3
    objects: int = 48  # demo objects rendered (the demo's default)
    in_memory_batches: int = 4


QUICK = Sizes(steps=25, repeats=2, objects=16)


def run(quick: bool, sizes: Sizes | None = None) -> dict:
    """Build the demo run, time both feeds in rotation; the payload."""
    s = sizes or (QUICK if quick else Sizes())
    with tempfile.TemporaryDirectory(prefix="bench_stall_") as tmp:
        return measure(demo_run(Path(tmp), f"data.demo_objects={s.objects}"), s)


def measure(run_: Run, s: Sizes) -> dict:
    """Time the streamer and in-memory feeds of ``run_``'s step in rotation; the payload."""
    # OMP_NUM_THREADS if set, else a core per data worker and the rest to the step: more threads than free
    # cores make every parallel op wait for its slowest thread, and the step's time becomes noise.
    default = max(1, (os.cpu_count() or 1) - run_.cfg.data.workers)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or default))
    memory = InMemoryLoader(run_.loader, s.in_memory_batches)
    feeds = {"in_memory": lambda: memory, "streamer": lambda: run_.loader}
    raw: dict = {name: [] for name in feeds}
    for _ in range(s.repeats):
        for name, feed in feeds.items():
            seconds, records = timed_loop(run_, feed(), s.steps, s.warmup, logging_every=1)
            raw[name].append(
                {
                    "mean_step_s": statistics.fmean(seconds),
                    "median_step_s": statistics.median(seconds),
                    "logged_stall_pct": statistics.fmean(r["data_stall_pct"] for r in records),
                    "logged_samples_per_s": statistics.fmean(r["samples_per_s"] for r in records),
                }
            )
    objects_per_step = run_.cfg.train.micro_batch_size * run_.cfg.train.grad_accum
    workers = run_.cfg.data.workers
    best = {name: min(raw[name], key=lambda r: r["mean_step_s"]) for name in raw}
    ratio = best["streamer"]["mean_step_s"] / best["in_memory"]["mean_step_s"]
    measured_stall = 100.0 * (1.0 - 1.0 / ratio)
    logged_stall = best["streamer"]["logged_stall_pct"]
    raw["measured_stall_pct"] = measured_stall
    raw["logged_stall_pct"] = logged_stall
    raw["objects_per_step"] = objects_per_step
    obj_s = {name: objects_per_step / best[name]["mean_step_s"] for name in best}
    return {
        "config": {**asdict(s), "workers": workers, "torch_threads": torch.get_num_threads()},
        "raw": raw,
        "ratio": round(ratio, 4),
        "goal": f"<= {GOAL}x",
        "met": ratio <= GOAL,
        "baseline": "the same demo step fed from in-memory batches",
        "summary": (
            f"demo step {obj_s['streamer']:.2f} obj/s from the shard streamer ({workers} worker) vs "
            f"{obj_s['in_memory']:.2f} from memory: stall {measured_stall:.1f} % measured, "
            f"{logged_stall:.1f} % shown by the live data_stall_pct."
        ),
    }


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, help="timed steps per side and round (default: 100)")
    parser.add_argument("--repeats", type=int, help="rounds, sides in rotation (default: 3)")


def main(argv: list[str] | None = None) -> dict:
    args = main_args(__doc__, argv, _add_args)
    chosen = {k: v for k, v in vars(args).items() if k != "quick" and v is not None}
    payload = run(args.quick, replace(QUICK if args.quick else Sizes(), **chosen))
    print(f"{write_result('stall', payload)}: {payload['summary']}")
    return payload


if __name__ == "__main__":
    main()
