"""Where a run's weights come from: ``model.pretrained`` / ``model.unet`` (local folder or hub id) and a
finished run's checkpoint.

Both ``engine/build.py`` (a run that starts from another run) and ``engine/export.py`` read a run's weights
from here, so neither imports the other.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.checkpoint import checkpoint_root, read_latest
from engine.config import ConfigError, RunConfig, load_config
from engine.safe_load import check_checkpoint_dir, only_allowed_types
from modeling.hub import ModelNotFoundError, resolve_model_folder


def resolve_pretrained(name: str, key: str = "model.pretrained") -> Path:
    """The local folder of ``model.pretrained`` (or ``model.unet``): a folder as is, a hub id ("org/name")
    through the Hugging Face cache (``HF_HOME``, ``HF_HUB_OFFLINE``), downloaded only when online.

    Cheap when the folder or cache entry exists (no weights are read), so a preflight check can call it.
    Raises ConfigError naming ``key`` when neither a local folder nor a cached / downloadable hub id.
    """
    try:
        return resolve_model_folder(name)
    except ModelNotFoundError as error:
        raise ConfigError(str(error), key=key) from None


def is_run_dir(path: Path) -> bool:
    """A training run directory (it has a newest-checkpoint pointer)."""
    return (checkpoint_root(path) / "latest").is_file()


def run_weights(
    run_dir: str | Path, *, tag: str | None = None, use_ema: bool = True
) -> tuple[RunConfig, dict[str, torch.Tensor], str]:
    """(saved run config, fp32 UNet state dict, tag) of a run's checkpoint (newest unless ``tag``).

    DeepSpeed's fp32 master weights (its zero_to_fp32 reader, its pickles read only through
    ``engine.safe_load``), overlaid with the EMA weights when the run kept an EMA and ``use_ema``.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # slow import

    root = checkpoint_root(run_dir)
    tag = tag or read_latest(root)
    if tag is None or not (root / tag).is_dir():
        raise ConfigError(f"no checkpoint in {root} (train first, or pass --tag)", source=str(run_dir))
    cfg = load_config(root / tag / "run_config.yaml")
    check_checkpoint_dir(root / tag)
    with only_allowed_types():  # zero_to_fp32 unpickles with weights_only=False: no code runs from its files
        weights = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    ema_path = root / tag / "ema.safetensors"
    if use_ema and ema_path.is_file():
        weights.update(load_file(ema_path))
    return cfg, {k: v.float() for k, v in weights.items()}, tag
