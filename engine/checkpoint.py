"""Checkpoints that a crash can never break, and the resume that continues bit-exact.

Layout under ``run.dir/checkpoints``::

    step00000100/               DeepSpeed model + ZeRO optimizer states (DeepSpeed's own files)
        gnn3d_rank00000.pt      per-rank state: data position, RNG states (plain types, weights_only-safe)
        ema.safetensors         full EMA weights (gathered from every rank's slice; written by rank 0)
        run_config.yaml         the resolved run config
    latest                      the newest complete tag (DeepSpeed's convention; zero_to_fp32 reads it)

A save goes into ``.tmp-stepN`` and is renamed after a barrier; ``latest`` is replaced atomically last.
A kill at any moment leaves the previous checkpoint and ``latest`` intact.
"""

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from engine.config import ConfigError, RunConfig

TMP_PREFIX = ".tmp-"


@dataclass
class ResumeState:
    step: int
    data_state: dict[str, Any] | None
    tag: str


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rank_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"gnn3d_rank{rank:05d}.pt"


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as plain types (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def save_checkpoint(engine: Any, run_dir: Path, step: int, *, rank: int, extra: dict[str, Any]) -> Path:
    """Collective: every rank calls it. ``extra`` holds 'data_state', 'ema' (EMA), 'config_yaml' (str)."""
    root = checkpoint_root(run_dir)
    tag = tag_for(step)
    tmp = TMP_PREFIX + tag
    engine.save_checkpoint(str(root), tag=tmp, client_state={"gnn3d_step": step}, save_latest=False)
    torch.save({"data_state": extra["data_state"], "rng": rng_state()}, rank_file(root / tmp, rank))
    if extra["ema"].enabled:  # collective: every rank holds a slice of the EMA; rank 0 writes it whole
        extra["ema"].save(str(root / tmp / "ema.safetensors"))
    if rank == 0:
        (root / tmp / "run_config.yaml").write_text(extra["config_yaml"])
    dist.barrier()  # every rank's files are on disk before the tag becomes visible
    if rank == 0:
        _publish(root, tmp, tag)
    dist.barrier()
    return root / tag


def _publish(root: Path, tmp: str, tag: str) -> None:
    final = root / tag
    if final.exists():  # a re-save of the same step after a resume
        shutil.rmtree(final)
    os.replace(root / tmp, final)
    pointer = root / "latest.tmp"
    pointer.write_text(tag)
    os.replace(pointer, root / "latest")


def prune_checkpoints(run_dir: Path, keep_last: int) -> list[str]:
    """Delete complete checkpoints older than the newest ``keep_last`` and stale temporary saves (rank 0)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    latest = read_latest(root)
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))
    doomed = [t for t in tags[:-keep_last] if t != latest]
    doomed += [p.name for p in root.iterdir() if p.name.startswith(TMP_PREFIX)]
    for name in doomed:
        shutil.rmtree(root / name, ignore_errors=True)
    return doomed


def read_latest(root: Path) -> str | None:
    pointer = root / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def find_resume_dir(resume: str, run_dir: Path) -> tuple[Path, str] | None:
    """Resolve ``run.resume`` to (checkpoints root, tag), or None to start fresh."""
    if resume == "none":
        return None
    if resume == "auto":
        root = checkpoint_root(run_dir)
        tag = read_latest(root)
        return (root, tag) if tag else None
    path = Path(resume)
    if (path / "latest").is_file():  # a checkpoints root
        return path, read_latest(path)
    if (path / "checkpoints" / "latest").is_file():  # a run directory
        return path / "checkpoints", read_latest(path / "checkpoints")
    if path.is_dir() and path.name.startswith("step"):  # one tag directory
        return path.parent, path.name
    raise ConfigError(
        f"no checkpoint found at {path} (want a run dir, its checkpoints/, or a step dir)", key="run.resume"
    )


# Keys that change the UNet's parameters or the meaning of its inputs: a resume must not change them.
ARCHITECTURE_KEYS = (
    "model.num_views", "model.multiview_attention", "model.sparse_mv_attention", "model.rowwise_mv_attention",
    "model.cd_attention_mid", "model.cd_attention_last", "model.block_out_channels", "model.layers_per_block",
    "model.attention_head_dim", "model.cross_attention_dim", "model.pretrained", "model.unet", "data.resolution",
    "data.views", "data.mode", "train.trainable",
)  # fmt: skip


def check_same_architecture(saved: RunConfig, current: RunConfig, *, source: str) -> None:
    """Refuse to resume a checkpoint whose architecture keys differ from the run config's, naming them."""
    diffs = []
    for key in ARCHITECTURE_KEYS:
        section, name = key.split(".")
        before, now = getattr(getattr(saved, section), name), getattr(getattr(current, section), name)
        if before != now:
            diffs.append(f"{key}: checkpoint {before!r}, run config {now!r}")
    if diffs:
        raise ConfigError(
            "cannot resume with a different architecture: " + "; ".join(diffs) + ". Set these back, or start "
            "a new run.dir (model.unet=<old run> starts from its weights)",
            key="run.resume",
            source=source,
        )


def load_checkpoint(engine: Any, root: Path, tag: str, *, rank: int, ema: Any) -> ResumeState:
    """Collective: restore engine (weights, optimizer, LR schedule), EMA, RNG and this rank's data position.

    ``engine.preflight.check_resume`` has already refused a checkpoint this run cannot continue (architecture,
    number of ranks, data-stream settings, global batch).
    """
    _, client = engine.load_checkpoint(
        str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if client is None:
        raise ConfigError(f"DeepSpeed could not load {root / tag}", key="run.resume")
    own = torch.load(rank_file(root / tag, rank), weights_only=True)
    set_rng_state(own["rng"])
    if ema.enabled and (root / tag / "ema.safetensors").is_file():
        ema.load(str(root / tag / "ema.safetensors"))
    return ResumeState(step=int(client["gnn3d_step"]), data_state=own["data_state"], tag=tag)
