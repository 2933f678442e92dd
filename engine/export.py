"""Export a training run to a self-contained diffusers-layout model folder (EMA weights, safetensors)."""

from pathlib import Path

import torch

from engine.build import build_components, build_unet
from engine.config import ConfigError
from engine.sources import run_weights
from modeling.components import save_model_folder


def export_run(run_dir: str | Path, out: str | Path, *, tag: str | None = None, use_ema: bool = True) -> Path:
    """Write ``out/{unet,vae,image_encoder,scheduler,feature_extractor}`` from the run's checkpoint.

    The frozen parts are rebuilt the way the run built them (its saved ``components/``, else
    ``model.pretrained``), so the exported scheduler carries the run's ``train.prediction_type``.
    """
    run_dir = Path(run_dir)
    cfg, weights, _ = run_weights(run_dir, tag=tag, use_ema=use_ema)
    unet = build_unet(cfg)
    missing, unexpected = unet.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint does not match the UNet: missing {missing[:5]}, unexpected {unexpected[:5]}",
            source=str(run_dir),
        )
    saved = run_dir / "components"
    if not cfg.model.pretrained and not saved.is_dir():  # a fresh tiny VAE would export silent garbage
        raise ConfigError(f"{saved} is missing: the run's VAE and CLIP encoder are gone", source=str(run_dir))
    components = build_components(cfg, saved=saved)
    save_model_folder(components, unet.to(torch.float32), out)
    return Path(out)
