"""The real training loop in this process (demo config, world size 1), timed step by step, for benchmarks.

``demo_run`` builds the run through ``engine.train.setup`` as ``launcher/train.py`` does (demo data rendered
into a temporary cache, DeepSpeed ZeRO-2 engine, the run's shard loader). ``timed_loop`` runs
``engine.train.loop`` itself — so whatever per-step work the loop does (metrics, reductions, logging) is
measured as it is — with the checkpoint and validation hooks switched off, and returns the wall time of
every loop iteration (one optimizer step and its bookkeeping) plus the metrics the run logged.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from contextlib import contextmanager
from pathlib import Path

import engine.train as train_module
from engine.config import load_config, load_ds_config
from engine.demo import prepare_demo
from engine.distributed import init_distributed
from engine.train import Run, setup

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "demo_cpu.yaml"
ZERO2 = REPO / "ds_configs" / "zero2.json"

# The demo as a user runs it, minus what no step touches (VAE fit quality, validation, external loggers).
BENCH_OVERRIDES = [
    "model.demo_vae_steps=0",
    "validation.every=0",
    "validation.num_objects=1",  # a few demo objects leave one in the validation split
    "logging.wandb_mode=disabled",
    "logging.tensorboard=false",
    "train.ema_every=1000000000",  # EMA off: the same work on either side of every comparison here
]


def demo_run(work: Path, *overrides: str) -> Run:
    """A set-up Run on the demo config with its data cache and run dir under ``work``."""
    cfg = load_config(
        DEMO, [f"run.dir={work / 'run'}", f"data.demo_cache={work / 'cache'}", *BENCH_OVERRIDES, *overrides]
    )
    info = init_distributed()
    cfg = prepare_demo(cfg, local_rank=0, world_size=1, device=info.device)
    run = setup(cfg, load_ds_config(ZERO2), str(ZERO2), info)
    run.validate = False
    return run


class InMemoryLoader:
    """The run's loader with ``count`` batches read once and then handed out again and again: the data path
    at no cost. Counts and state are the real loader's (unchanged), for the loop's bookkeeping."""

    def __init__(self, loader, count: int) -> None:
        stream = iter(loader)
        self.batches = [next(stream) for _ in range(count)]
        stream.close()
        self.loader = loader

    def __iter__(self):
        yield from itertools.cycle(self.batches)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)


@contextmanager
def _patched(**attrs):
    saved = {name: getattr(train_module, name) for name in attrs}
    for name, value in attrs.items():
        setattr(train_module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(train_module, name, value)


def timed_loop(
    run: Run, loader, steps: int, warmup: int, logging_every: int | None = None
) -> tuple[list[float], list[dict]]:
    """Run ``engine.train.loop`` for ``warmup + steps + 1`` steps over ``loader``; returns the seconds of each
    of the last ``steps`` loop iterations (start of one step to the start of the next) and the records the
    run logged in metrics.jsonl (one per ``logging.every`` steps; ``logging_every`` to change it)."""
    starts: list[float] = []
    real_step = train_module.run_step

    def stamped_step(run_, batches, step):
        starts.append(time.perf_counter())
        return real_step(run_, batches, step)

    cfg = run.cfg
    logging = dataclasses.replace(cfg.logging, every=logging_every or cfg.logging.every)
    run.cfg = dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, max_steps=warmup + steps + 1), logging=logging
    )
    run.loader, real_loader = loader, run.loader
    try:
        with _patched(run_step=stamped_step, _checkpoint=_no_op, _validate=_no_op):
            train_module.loop(run)
    finally:
        run.cfg, run.loader = cfg, real_loader
    seconds = [b - a for a, b in itertools.pairwise(starts)][warmup:]
    lines = (run.run_dir / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if "samples_per_s" in r and r["step"] > warmup]
    return seconds, records


def _no_op(*args, **kwargs) -> None:
    return None
