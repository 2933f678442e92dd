"""The CPU demo, turned into an ordinary run config before the engine starts.

With ``data.shards`` empty a run trains on synthetic objects that are rendered and sharded on first use; for
the tiny model it also uses a tiny VAE fitted to those renders (``model.demo_vae_steps``). Both are cached
under ``data.demo_cache``. ``prepare_demo`` builds what is missing (one process per node; the others wait)
and returns the config pointing at them (``data.shards``, ``model.components``), so the engine reads the demo
exactly like user data and a user's components folder.
"""

import dataclasses
from pathlib import Path

import torch

from engine.config import RunConfig
from engine.demo.data import ensure_demo_shards
from engine.demo.vae import ensure_demo_components
from engine.preflight import check_data

DEMO_SOURCE = "demo (data.shards empty)"


def prepare_demo(cfg: RunConfig, *, local_rank: int, world_size: int, device: torch.device) -> RunConfig:
    """``cfg`` unchanged when it names its own shards; else a copy pointing at the (cached) demo data and,
    unless disabled, the components folder with the fitted demo VAE. Collective: every process calls it.

    The data is checked (``engine.preflight.check_data``) before the VAE fit, the expensive part.
    """
    if cfg.data.shards:
        return cfg
    manifest = ensure_demo_shards(cfg, local_rank=local_rank)
    cfg = _with(cfg, "data.shards", str(manifest))
    check_data(cfg, world_size=world_size)
    components = ensure_demo_components(
        cfg, local_rank=local_rank, run_components=Path(cfg.run.dir) / "components", device=device
    )
    return cfg if components is None else _with(cfg, "model.components", str(components))


def _with(cfg: RunConfig, key: str, value: str) -> RunConfig:
    section, name = key.split(".")
    out = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})
    out.sources = {**cfg.sources, key: DEMO_SOURCE}
    return out
