"""Training on one fixed, deterministic global batch, shared by in-process tests and multi-process scripts."""

from pathlib import Path

import numpy as np
import torch

from datapipes.synth import render_object
from datapipes.transform import TransformOptions, collate, make_example
from engine.config import RunConfig, load_config, load_ds_config, resolve_ds_config
from engine.distributed import DistInfo
from engine.ema import EMA
from engine.objective import DiffusionObjective
from engine.train import Run, build_components, build_engine, run_step

REPO = Path(__file__).resolve().parents[2]
RES = 32


def tiny_config(*overrides: str) -> RunConfig:
    return load_config(
        REPO / "configs" / "demo_cpu.yaml", [f"data.resolution={RES}", "run.dir=unused", *overrides]
    )


def global_batch(objects: int, seed: int = 0) -> dict:
    """``objects`` synthetic objects in the batch contract, identical in every process."""
    opts = TransformOptions(resolution=RES, background="white")
    rng = np.random.default_rng(seed)
    return collate([make_example(render_object(seed + i, res=RES), opts, rng) for i in range(objects)])


def slice_batch(batch: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in batch.items()}


def fixed_batch_run(cfg: RunConfig, info: DistInfo, ds_name: str = "zero2.json") -> Run:
    """A Run with a DeepSpeed engine (``ds_configs/<ds_name>``) and no loader: feed it batches with ``run_step``."""
    ds = resolve_ds_config(
        load_ds_config(REPO / "ds_configs" / ds_name),
        cfg,
        world_size=info.world_size,
        source=ds_name,
        cuda=False,
    )
    components = build_components(cfg)
    engine, _ = build_engine(cfg, ds, info)
    ema = EMA(engine, cfg.train.ema_decay, cfg.train.ema_every)
    objective = DiffusionObjective(components, cfg, info.device)
    return Run(cfg, info, Path(cfg.run.dir), engine, ema, objective, components, loader=None, train_shards="")


def train_steps(run: Run, batch: dict, steps: int, *, same_noise: bool = False) -> list[float]:
    """Losses of ``steps`` optimizer steps on this rank's slice of ``batch``; ``same_noise`` fixes the noise too."""
    micro = run.cfg.train.micro_batch_size
    mine = slice_batch(batch, run.info.rank * micro, (run.info.rank + 1) * micro)
    losses = []
    for step in range(steps):
        values = run_step(run, iter([mine]), 0 if same_noise else step)
        loss = torch.tensor(values["loss"])
        torch.distributed.all_reduce(loss)
        losses.append(loss.item() / run.info.world_size)
    return losses
