"""Validation: generate the views of held-out objects, save a grid, score PSNR/SSIM against ground truth.

Every rank generates its share of the objects (``object_share``: object i on rank i mod W), one object per
pipeline call from the slice of one seeded noise tensor that a 1-rank run draws for the whole batch; rank 0
gathers the images for the grid and the scores. So the numbers do not depend on the number of ranks: each
object sees the same noise and the same batch shape (one object) on any world size.
"""

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from engine.config import RunConfig
from engine.ema import EMA
from engine.image_metrics import psnr, ssim
from modeling.components import Components
from modeling.layout import split_domains, stack_domains
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


def validation_weights(ema: EMA, cfg: RunConfig, unet: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Collective (every rank calls it): the full EMA weights on every rank when validation uses them (every
    rank generates), else None. ``unet`` gives the shapes the non-zero ranks receive into."""
    if not (cfg.validation.use_ema and ema.enabled):
        return None
    full = ema.gather()  # rank 0 only
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return full
    names = [sorted(full) if full is not None else None]
    dist.broadcast_object_list(names, src=0)
    params = dict(unet.named_parameters())
    device = next(unet.parameters()).device
    out = {}
    for name in names[0]:
        p = params[name]
        t = (
            full[name].to(device)
            if full is not None
            else torch.empty(p.shape, dtype=torch.float32, device=device)
        )
        dist.broadcast(t, src=0)
        out[name] = t.cpu()
    return out


def object_share(num_objects: int, rank: int, world_size: int) -> list[int]:
    """The batch indices of the objects rank ``rank`` generates (round-robin, so shares differ by at most 1)."""
    return list(range(rank, num_objects, world_size))


def initial_noise(batch: dict, components: Components, seed: int) -> torch.Tensor:
    """The noise a single pipeline call over the whole batch draws from ``seed``: [2·B·V, 4, h, w] (layout)."""
    objects, views = batch["camera_embed_normal"].shape[:2]
    factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
    h, w = (s // factor for s in batch["image_cond"].shape[-2:])
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((2 * objects * views, 4, h, w), generator=generator)


@torch.no_grad()
def generate_share(
    pipe: MVDiffusionPipeline, batch: dict, noise: torch.Tensor, indices: list[int], cfg: RunConfig
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Object index -> (normals, colors) [V, 3, H, W] in [0, 1], one object per pipeline call."""
    v = cfg.validation
    objects, views = batch["camera_embed_normal"].shape[:2]
    noise_normal, noise_color = split_domains(noise, objects, views)  # each [B, V, 4, h, w]
    out = {}
    for i in indices:
        camera = torch.stack([batch["camera_embed_normal"][i], batch["camera_embed_image"][i]])  # (2, V, 10)
        result = pipe(
            batch["image_cond"][i : i + 1],
            camera,
            num_inference_steps=v.steps,
            guidance_scale=v.guidance,
            progress=False,
            latents=stack_domains(noise_normal[i : i + 1], noise_color[i : i + 1]),
        )
        out[i] = (result.normals[0], result.colors[0])
    return out


def gather_to_main(share: dict, rank: int, world_size: int) -> dict | None:
    """Collective: the union of every rank's ``share`` dict on rank 0, None elsewhere."""
    if world_size == 1:
        return share
    parts = [None] * world_size if rank == 0 else None
    dist.gather_object(share, parts, dst=0)
    return {k: val for part in parts for k, val in part.items()} if rank == 0 else None


@torch.no_grad()
def run_validation(
    unet: torch.nn.Module,
    components: Components,
    ema_weights: dict[str, torch.Tensor] | None,
    batch: dict,
    cfg: RunConfig,
    out_png: Path,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float] | None:
    """Collective when ``world_size`` > 1: every rank generates its share of ``batch`` (the same batch on
    every rank) with ``ema_weights`` (from ``validation_weights``; None = the live weights); rank 0 writes
    ``out_png`` and returns the val/* metrics, the other ranks return None."""
    backup = None
    if ema_weights is not None:
        backup = {n: p.detach().clone() for n, p in unet.named_parameters() if n in ema_weights}
        for name, param in unet.named_parameters():
            if name in ema_weights:
                param.copy_(ema_weights[name])  # copy_ casts to the module dtype and device
    was_training = unet.training
    unet.eval()
    try:
        pipe = MVDiffusionPipeline(unet, components, scheduler=cfg.validation.scheduler)
        noise = initial_noise(batch, components, cfg.run.seed)
        indices = object_share(len(batch["image_cond"]), rank, world_size)
        share = generate_share(pipe, batch, noise, indices, cfg)
    finally:
        unet.train(was_training)
        if backup is not None:
            for name, param in unet.named_parameters():
                if name in backup:
                    param.copy_(backup[name])
    generated = gather_to_main(share, rank, world_size)
    if generated is None:
        return None
    order = sorted(generated)
    normals = torch.stack([generated[i][0] for i in order])
    colors = torch.stack([generated[i][1] for i in order])
    out_png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(validation_grid(batch, normals, colors)).save(out_png)
    return _scores(batch, normals, colors)


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
