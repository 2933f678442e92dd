"""Export a training run to a self-contained diffusers-layout model folder (EMA weights, safetensors)."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.build import build_unet
from engine.checkpoint import checkpoint_root, read_latest
from engine.config import ConfigError, load_config
from modeling.components import load_components, save_model_folder


def run_weights(run_dir: str | Path, *, tag: str | None = None, use_ema: bool = True):
    """(saved run config, fp32 UNet state dict, tag) of a run's checkpoint (newest unless ``tag``).

    DeepSpeed's fp32 master weights (its zero_to_fp32 reader), overlaid with the EMA weights when the run kept
    an EMA and ``use_ema``.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root = checkpoint_root(run_dir)
    tag = tag or read_latest(root)
    if tag is None or not (root / tag).is_dir():
        raise ConfigError(f"no checkpoint in {root} (train first, or pass --tag)", source=str(run_dir))
    cfg = load_config(root / tag / "run_config.yaml")
    weights = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    ema_path = root / tag / "ema.safetensors"
    if use_ema and ema_path.is_file():
        weights.update(load_file(ema_path))
    return cfg, {k: v.float() for k, v in weights.items()}, tag


def export_run(run_dir: str | Path, out: str | Path, *, tag: str | None = None, use_ema: bool = True) -> Path:
    """Write ``out/{unet,vae,image_encoder,scheduler,feature_extractor}`` from the run's checkpoint."""
    run_dir = Path(run_dir)
    cfg, weights, _ = run_weights(run_dir, tag=tag, use_ema=use_ema)
    unet = build_unet(cfg)
    missing, unexpected = unet.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint does not match the UNet: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    components_dir = (
        run_dir / "components" if (run_dir / "components").is_dir() else Path(cfg.model.pretrained)
    )
    save_model_folder(load_components(components_dir), unet.to(torch.float32), out)
    return Path(out)
