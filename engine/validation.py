"""Validation: generate the views of held-out objects, save a grid, score PSNR/SSIM against ground truth."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.config import RunConfig
from engine.ema import EMA
from engine.image_metrics import psnr, ssim
from modeling.components import Components
from modeling.pipeline import MVDiffusionPipeline


def validation_grid(batch: dict, normals: torch.Tensor, colors: torch.Tensor) -> np.ndarray:
    """uint8 image: per object, rows = predicted normals, true normals, predicted colors, true colors;
    the first column is the condition image. All inputs in [0, 1]."""
    rows = []
    for i in range(normals.shape[0]):
        cond = batch["image_cond"][i]
        for views in (normals[i], batch["normal_target"][i], colors[i], batch["image_target"][i]):
            rows.append(torch.cat([cond, *views], dim=-1))
    grid = torch.cat(rows, dim=-2).clamp(0, 1)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def validation_weights(ema: EMA, cfg: RunConfig) -> dict[str, torch.Tensor] | None:
    """Collective (every rank calls it): the full EMA weights on rank 0 when validation uses them, else None."""
    return ema.gather() if cfg.validation.use_ema and ema.enabled else None


@torch.no_grad()
def run_validation(
    unet: torch.nn.Module,
    components: Components,
    ema_weights: dict[str, torch.Tensor] | None,
    batch: dict,
    cfg: RunConfig,
    out_png: Path,
) -> dict[str, float]:
    """Generate with ``ema_weights`` (from ``validation_weights``; None = the live weights), write ``out_png``,
    return val/* metrics. Rank 0 only."""
    v = cfg.validation
    backup = None
    if ema_weights is not None:
        backup = {n: p.detach().clone() for n, p in unet.named_parameters() if n in ema_weights}
        for name, param in unet.named_parameters():
            if name in ema_weights:
                param.copy_(ema_weights[name])  # copy_ casts to the module dtype and device
    was_training = unet.training
    unet.eval()
    try:
        pipe = MVDiffusionPipeline(unet, components, scheduler=v.scheduler)
        camera = torch.stack(
            [batch["camera_embed_normal"], batch["camera_embed_image"]], dim=1
        )  # (B, 2, V, 10)
        out = pipe(
            batch["image_cond"],
            camera,
            num_inference_steps=v.steps,
            guidance_scale=v.guidance,
            seed=cfg.run.seed,
            progress=False,
        )
    finally:
        unet.train(was_training)
        if backup is not None:
            for name, param in unet.named_parameters():
                if name in backup:
                    param.copy_(backup[name])
    out_png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(validation_grid(batch, out.normals, out.colors)).save(out_png)
    return _scores(batch, out.normals, out.colors)


def _scores(batch: dict, normals: torch.Tensor, colors: torch.Tensor) -> dict[str, float]:
    scores = {}
    for name, pred, true in (
        ("normal", normals, batch["normal_target"]),
        ("color", colors, batch["image_target"]),
    ):
        pred, true = pred.flatten(0, 1).float(), true.flatten(0, 1).float()
        scores[f"val/psnr_{name}"] = psnr(pred, true).mean().item()
        scores[f"val/ssim_{name}"] = ssim(pred, true).mean().item()
    return scores
