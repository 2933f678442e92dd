"""Engine overhead: our training loop (DeepSpeed ZeRO-2, world size 1, logging on) vs a bare PyTorch loop.

Both train the demo's UNet on the same in-memory batches with the same objective (frozen VAE/CLIP encode,
noise, min-SNR MSE), AdamW with the same settings, gradient clipping and LR schedule:
- ``engine``: ``engine.train.loop`` as a run does it (``engine.backward`` / ``engine.step`` of the ZeRO-2
  engine, the loop's metrics, reductions, divergence checks and the log record every ``logging.every`` steps);
- ``bare``: ``loss.backward(); clip_grad_norm_; opt.step(); opt.zero_grad(); sched.step()`` on the module.
The EMA is off on both sides (``step_harness``): its cost is the same work either way.
Ratio = engine / bare seconds per step, sides in rotation (goal ≤ 1.05×).

    python benchmarks/bench_overhead.py            # 60 steps per side, 3 rounds
    python benchmarks/bench_overhead.py --quick    # 25 steps per side, 2 rounds
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from common import main_args, write_result
from step_harness import InMemoryLoader, demo_run, timed_loop

from engine.build import build_unet
from engine.optim import build_optimizer, lr_lambda, param_groups, select_trainable
from engine.randomness import first_slot, object_generators
from engine.train import Run

GOAL = 1.05


@dataclass(frozen=True)
class Sizes:
    steps: int = 60
    warmup: int = 5
    repeats: int = 3
    objects: int = 16  # demo objects rendered: the batches come from memory, a few are enough
    batches: int = 4


QUICK = Sizes(steps=25, repeats=2)


class BareLoop:
    """The demo's UNet trained by hand: no DeepSpeed, no logging; the same objective, optimizer and batches."""

    def __init__(self, run) -> None:
        cfg = run.cfg
        torch.manual_seed(cfg.run.seed)
        self.unet = build_unet(cfg).to(run.info.device)
        select_trainable(self.unet, cfg.train.trainable)
        self.opt = build_optimizer(param_groups(self.unet, cfg), cfg, False, run.info.device)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.objective, self.cfg, self.step = run.objective, cfg, 0

    def __call__(self, batches) -> float:
        batch = next(batches)
        micro = len(batch["object_id"])
        generators = object_generators(self.cfg.run.seed, self.step, range(first_slot(0, 0, 1, micro), micro))
        inputs = self.objective.prepare(batch, generators)
        loss, _ = self.objective.loss(self.unet, inputs)
        loss.backward()
        if self.cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.step += 1
        return loss.item()  # what a bare loop prints; also keeps the step honest on an async device

    def timed(self, batches, steps: int, warmup: int) -> list[float]:
        starts = []
        for _ in range(warmup + steps + 1):
            starts.append(time.perf_counter())
            self(batches)
        return [b - a for a, b in itertools.pairwise(starts)][warmup:]


def run(quick: bool, sizes: Sizes | None = None) -> dict:
    """Build the demo run, time our loop and the bare loop in rotation; the payload."""
    s = sizes or (QUICK if quick else Sizes())
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
        return measure(demo_run(Path(tmp), f"data.demo_objects={s.objects}"), s)


def measure(run_: Run, s: Sizes) -> dict:
    """Time ``run_``'s loop and a bare loop on the same in-memory batches, in rotation; the payload."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))  # the same threads on both sides
    memory = InMemoryLoader(run_.loader, s.batches)
    bare = BareLoop(run_)
    sides = {
        "engine": lambda: timed_loop(run_, memory, s.steps, s.warmup)[0],
        "bare": lambda: bare.timed(iter(memory), s.steps, s.warmup),
    }
    raw: dict = {name: [] for name in sides}
    for _ in range(s.repeats):
        for name, side in sides.items():
            seconds = side()
            raw[name].append(
                {"mean_step_s": statistics.fmean(seconds), "median_step_s": statistics.median(seconds)}
            )
    logging_every, precision = run_.cfg.logging.every, run_.cfg.train.precision
    best = {name: min(r["mean_step_s"] for r in runs) for name, runs in raw.items()}
    ratio = best["engine"] / best["bare"]
    return {
        "config": {
            **asdict(s),
            "logging_every": logging_every,
            "precision": precision,
            "torch_threads": torch.get_num_threads(),
        },
        "raw": raw,
        "ratio": round(ratio, 4),
        "goal": f"<= {GOAL}x",
        "met": ratio <= GOAL,
        "baseline": "bare PyTorch loop (backward, clip, AdamW step), same UNet, objective and batches",
        "summary": (
            f"demo step {1000 * best['engine']:.0f} ms with our ZeRO-2 loop (logging every {logging_every}) vs "
            f"{1000 * best['bare']:.0f} ms bare: {100 * (ratio - 1):+.1f} % per step."
        ),
    }


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, help="timed steps per side and round (default: 60)")
    parser.add_argument("--repeats", type=int, help="rounds, sides in rotation (default: 3)")


def main(argv: list[str] | None = None) -> dict:
    args = main_args(__doc__, argv, _add_args)
    chosen = {k: v for k, v in vars(args).items() if k != "quick" and v is not None}
    payload = run(args.quick, replace(QUICK if args.quick else Sizes(), **chosen))
    print(f"{write_result('overhead', payload)}: {payload['summary']}")
    return payload


if __name__ == "__main__":
    main()
