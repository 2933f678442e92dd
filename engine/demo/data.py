"""The demo's dataset: synthetic objects rendered and sharded on first use, cached on disk."""

import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from datapipes.convert import ConvertOptions, convert
from datapipes.synth.dataset import render_dataset
from engine.config import RunConfig

FORMAT_VERSION = 1  # bump when the renderer or shard format changes, so stale caches are not reused


def demo_shards_dir(cfg: RunConfig) -> Path:
    """Cache folder of the demo dataset (renders/, shards/, the fitted components), keyed by its settings."""
    d = cfg.data
    name = f"synth-v{FORMAT_VERSION}-n{d.demo_objects}-r{d.resolution}-s{cfg.run.seed}"
    return Path(d.demo_cache).expanduser() / name


def build_then_publish(final: Path, build: Callable[[Path], None]) -> None:
    """Run ``build`` into a private temporary folder, then rename it to ``final``.

    Nodes that share a filesystem never see a half-written cache; if another node published first, its
    (deterministic, equivalent) copy wins and ours is discarded.
    """
    tmp = final.with_name(f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_demo_shards(cfg: RunConfig, *, local_rank: int, log=print) -> Path:
    """Return the demo ``manifest.json``, rendering and converting it first if no cache exists (collective).

    One process per node builds it into a private temporary folder and renames it into place; the other
    processes wait at a barrier.
    """
    final = demo_shards_dir(cfg)
    manifest = final / "shards" / "manifest.json"
    if local_rank == 0 and not manifest.is_file():
        log(f"rendering {cfg.data.demo_objects} synthetic objects into {final} (first use only)")

        def build(tmp: Path) -> None:
            render_dataset(tmp / "renders", cfg.data.demo_objects, res=cfg.data.resolution, seed=cfg.run.seed)
            convert(tmp / "renders", tmp / "shards", ConvertOptions(samples_per_shard=2, val_fraction=0.1))

        build_then_publish(final, build)
    if dist.is_initialized():
        dist.barrier()
    return manifest
