"""One logging facade: metrics.jsonl always, tensorboard and wandb by config, a tqdm bar — rank 0 only.

The wandb identity (mode, project, entity) is resolved here and nowhere else: ``WANDB_*`` environment
variables win over ``logging.*`` in the run config. The default mode is offline: no network needed.
What is logged at a step is the mean of the logging interval's steps (``IntervalMeans``), summed on the
device and reduced over the ranks only then.
"""

import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from engine.config import RunConfig, config_to_dict


def wandb_identity(cfg: RunConfig) -> dict[str, str | None]:
    """mode/project/entity/name for wandb.init: environment first, then the run config."""
    log = cfg.logging
    return {
        "mode": os.environ.get("WANDB_MODE") or log.wandb_mode,
        "project": os.environ.get("WANDB_PROJECT") or log.wandb_project,
        "entity": os.environ.get("WANDB_ENTITY") or log.wandb_entity or None,
        "name": os.environ.get("WANDB_NAME") or log.run_name or Path(cfg.run.dir).name,
    }


def _record_step(line: bytes) -> int | None:
    """The step of one metrics.jsonl line; None for a line cut off by a crash or one that is not a record."""
    if not line.endswith(b"\n"):
        return None
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def keep_records_through(path: Path, last_step: int) -> int:
    """Rewrite metrics.jsonl with only the records of steps <= ``last_step``; returns how many were dropped.

    A resume from the checkpoint of step N trains steps N+1... again, so their earlier records are superseded:
    dropping them keeps one record per step and readers need not dedupe. A line cut off by a crash goes too.
    The rewrite is atomic (temp file + rename), so a kill now leaves the old file or the new one.
    """
    if not path.is_file():
        return 0
    lines = path.read_bytes().splitlines(keepends=True)
    kept = [line for line in lines if 0 < (_record_step(line) or 0) <= last_step]
    if len(kept) == len(lines):
        return 0
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(kept))
    os.replace(tmp, path)
    return len(lines) - len(kept)


def jsonl_line(step: int, metrics: dict[str, float]) -> str:
    """One strict-JSON line of metrics.jsonl. JSON has no NaN or Infinity: a non-finite value is left out and
    its key listed under ``nonfinite``, so a diverged loss stays visible and every line still parses."""
    finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
    record = {"step": step, "time": round(time.time(), 3), **finite}
    if len(finite) < len(metrics):
        record["nonfinite"] = sorted(set(metrics) - set(finite))
    return json.dumps(record, allow_nan=False) + "\n"


class IntervalMeans:
    """The values of every step of a logging interval, summed where they are (device tensors stay on the
    device), then read and reduced over the ranks once, when the interval is logged: no step but the logged
    one waits for the device or for the other ranks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor | float] = {}
        self.steps = 0
        self.seconds = 0.0

    def add(self, values: dict[str, Tensor | float], seconds: float) -> None:
        """One applied step's values (``engine.train.run_step``) and its wall time."""
        for key, value in values.items():
            if isinstance(value, Tensor):
                value = value.detach().to(torch.float64)  # sums of many steps: double, as the floats were
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1
        self.seconds += seconds

    def reduce(self) -> tuple[dict[str, float], float]:
        """Collective: (each value's mean per step over the interval and the ranks, seconds per step of this
        rank), then start a new interval. Ratios of two values (the domain sums and counts) are exact."""
        if self.steps == 0:
            return {}, 0.0
        keys = sorted(self.sums)
        local = torch.stack(
            [torch.as_tensor(self.sums[k], dtype=torch.float64, device=self.device) for k in keys]
        )
        world = 1
        if dist.is_initialized():
            dist.all_reduce(local)
            world = dist.get_world_size()
        values = {k: v / (world * self.steps) for k, v in zip(keys, local.tolist())}
        seconds = self.seconds / self.steps
        self.reset()
        return values, seconds


class Tracker:
    """Writes metrics on rank 0; a no-op on other ranks."""

    def __init__(self, cfg: RunConfig, run_dir: Path, *, is_main: bool, start_step: int, total_steps: int):
        self.is_main = is_main
        self._wandb = self._tb = self._bar = None
        if not is_main:
            return
        dropped = keep_records_through(run_dir / "metrics.jsonl", start_step)
        self._jsonl = (run_dir / "metrics.jsonl").open("a", buffering=1)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: tensorboard hides the earlier events of the steps trained again, as metrics.jsonl
            self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)
        identity = wandb_identity(cfg)
        if identity["mode"] != "disabled":
            self._wandb = self._init_wandb(cfg, run_dir, identity)
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if dropped:
            self.write(
                f"metrics.jsonl: dropped {dropped} records after step {start_step} (trained again now)"
            )

    @staticmethod
    def _init_wandb(cfg: RunConfig, run_dir: Path, identity: dict) -> Any:
        import wandb

        id_file = run_dir / "wandb_id"  # one wandb run across resumes
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        return wandb.init(dir=str(run_dir), id=run_id, resume="allow", config=config_to_dict(cfg), **identity)

    def log(self, step: int, metrics: dict[str, float], *, show: dict[str, str] | None = None) -> None:
        """Append ``metrics`` for ``step`` everywhere; ``show`` goes to the progress bar."""
        if not self.is_main:
            return
        self._jsonl.write(jsonl_line(step, metrics))
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if show and self._bar is not None:
            self._bar.set_postfix(show, refresh=False)

    def log_image(self, step: int, key: str, path: Path) -> None:
        if not self.is_main:
            return
        if self._tb is not None:
            import numpy as np
            from PIL import Image

            self._tb.add_image(key, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(str(path))}, step=step)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def write(self, message: str) -> None:
        """Print above the progress bar (rank 0)."""
        if self.is_main:
            tqdm.write(message)

    def close(self) -> None:
        if not self.is_main:
            return
        self._bar.close()
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
