"""Fit the tiny demo VAE to the synthetic renders once, so the CPU demo learns a meaningful latent space.

A randomly initialised AutoencoderKL decodes anything to noise, so a diffusion model trained in its latent
space can never show a recognisable validation grid. For the demo (no ``model.pretrained``) we train the tiny
VAE as an autoencoder on the demo's own color and normal views (composited on white, black and gray, exactly
as ``datapipes.transform`` prepares training images), set ``scaling_factor`` so scaled latents have about
unit standard deviation (Stable Diffusion's 0.18215 plays the same role), and cache the tiny components with
that VAE as an ordinary components folder next to the demo shards.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm import tqdm

from datapipes.cameras import rotate_normals_to_cond
from datapipes.render_folder import list_objects, read_sample, resolve_layout
from datapipes.sample import MultiViewSample
from datapipes.transform import BACKGROUNDS, composite, resize_rgba
from engine.config import RunConfig
from engine.demo.data import build_then_publish, demo_shards_dir
from modeling.components import save_components, tiny_components

VAE_FORMAT_VERSION = 2  # bump when the fitting recipe changes, so stale cached VAEs are not reused
DEFAULT_STEPS = 1000
DEFAULT_LR = 5e-3
DEFAULT_BATCH = 8
WARMUP_STEPS = 20
EVAL_IMAGES = 256  # PSNR / latent std are measured on a fixed random subset: the full set costs seconds
FIT_STATS = "fit_stats.json"
LOGVAR_SHIFT = -8.0  # initial log-variance offset, see _start_with_small_posterior_std
KL_WEIGHT = 1e-5  # small: keeps the posterior well-behaved without blurring reconstructions
L1_WEIGHT = 0.5  # L1 alongside MSE sharpens edges and thin parts


class DemoVAEError(RuntimeError):
    """The demo VAE could not be fitted or loaded; the message names the folder."""


def demo_images(source: str | Path | Sequence[MultiViewSample], resolution: int) -> torch.Tensor:
    """Every color and normal view of every object, on white, black and gray, in [-1, 1].

    source: a render folder (render-script layout, what ``engine.demo.data`` writes under ``renders/``) or
    decoded samples. Prepared like ``datapipes.transform.make_example`` prepares training targets: resized
    to ``resolution``, normals rotated into the condition camera frame, alpha-composited on the background.
    Returns float32 [N, 3, resolution, resolution], N = objects * 3 backgrounds * 2 domains * views.
    """
    samples = _samples(source)
    if not samples:
        raise DemoVAEError(f"no objects found in {source}")
    views = []
    for sample in samples:
        color = resize_rgba(sample.color_rgba, resolution).astype(np.float32) / 255.0  # [V,H,W,4]
        normal = resize_rgba(sample.normal_rgba, resolution).astype(np.float32) / 255.0
        rotated = rotate_normals_to_cond(normal[..., :3] * 2.0 - 1.0, sample.cond_w2c, sample.w2c)
        normal[..., :3] = np.clip(rotated * 0.5 + 0.5, 0.0, 1.0)
        views += [color, normal]
    rgba = np.concatenate(views)  # [N0, H, W, 4]
    backgrounds = [
        composite(rgba[..., :3], rgba[..., 3:], np.asarray(bg, np.float32)) for bg in BACKGROUNDS.values()
    ]
    images = torch.from_numpy(np.concatenate(backgrounds)).permute(0, 3, 1, 2).contiguous()
    return images * 2.0 - 1.0


def _samples(source: str | Path | Sequence[MultiViewSample]) -> list[MultiViewSample]:
    if not isinstance(source, str | Path):
        return list(source)
    layout = resolve_layout(source, "auto")
    return [read_sample(ref, layout) for ref in list_objects(source)]


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), over the whole batch."""
    mse = F.mse_loss(reconstruction.clamp(-1, 1), target).item()
    return 10.0 * math.log10(4.0 / max(mse, 1e-12))


@torch.no_grad()
def evaluate(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 64) -> tuple[float, float, float]:
    """Over ``images`` [N,3,H,W] in [-1,1]: (reconstruction PSNR in dB from the posterior mode, std of the
    unscaled latent means, mean posterior std)."""
    recons, latents, stds = [], [], []
    for chunk in images.split(batch_size):
        posterior = vae.encode(chunk).latent_dist
        latents.append(posterior.mode())
        stds.append(posterior.std.mean())
        recons.append(vae.decode(latents[-1]).sample)
    return psnr(torch.cat(recons), images), torch.cat(latents).std().item(), torch.stack(stds).mean().item()


def fit_demo_vae(
    vae: AutoencoderKL,
    images_source: str | Path | Sequence[MultiViewSample] | torch.Tensor,
    *,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> dict[str, float]:
    """Train ``vae`` in place as an autoencoder on the demo images, then set its ``scaling_factor``.

    Loss per step: MSE + L1_WEIGHT * L1 of the reconstruction of a posterior sample, + KL_WEIGHT * KL per
    latent element. AdamW, short warmup, cosine decay to 0; batches and posterior noise come from a
    generator seeded with ``seed``, so the result depends only on (initial weights, images, arguments).
    images_source: a render folder, decoded samples, or float [N, 3, H, W] in [-1, 1] (H, W multiples of 8).
    PSNR and latent std are measured with the posterior mode on a fixed subset of EVAL_IMAGES images; the
    scaling factor is 1 / that latent std. Leaves the VAE frozen in eval mode on its device.
    Returns {"psnr_before", "psnr" (dB), "latent_std", "posterior_std", "scaling_factor", "images",
    "steps", "seconds"}.
    """
    start = time.perf_counter()
    if isinstance(images_source, torch.Tensor):
        images = images_source.float()
    else:
        images = demo_images(images_source, int(vae.config.sample_size))
    generator = torch.Generator().manual_seed(seed)
    device = next(vae.parameters()).device
    images = images.to(device)
    subset = images[torch.randperm(images.shape[0], generator=generator)[:EVAL_IMAGES].to(device)]
    psnr_before, _, _ = evaluate(vae.eval(), subset)
    _start_with_small_posterior_std(vae)
    _train(vae, images, steps=steps, batch_size=batch_size, lr=lr, generator=generator, log=log)
    vae.eval().requires_grad_(False)
    psnr_after, latent_std, posterior_std = evaluate(vae, subset)
    # SD convention (0.18215 there): latents * scaling_factor have ~unit std, the scale the noise schedule
    # was designed for; otherwise the tiny UNet would see a far weaker or stronger signal than the noise.
    vae.register_to_config(scaling_factor=1.0 / max(latent_std, 1e-6))
    stats = {
        "psnr_before": round(psnr_before, 3),
        "psnr": round(psnr_after, 3),
        "latent_std": round(latent_std, 5),
        "posterior_std": round(posterior_std, 5),
        "scaling_factor": float(vae.config.scaling_factor),
        "images": int(images.shape[0]),
        "steps": steps,
        "seconds": round(time.perf_counter() - start, 2),
    }
    if log is not None:
        log(f"demo VAE fitted: {stats}")
    return stats


def _start_with_small_posterior_std(vae: AutoencoderKL) -> None:
    """Shift the initial log-variance down by LOGVAR_SHIFT (posterior std ~0.02 instead of ~1).

    At std ~1 the sampled latents start as mostly noise, so the first hundreds of steps only learn to shrink
    it; starting small fits faster (+1 dB in our budget) and leaves the near-deterministic latents that the
    diffusion objective samples its targets from.
    """
    layer = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    channels = layer.out_channels // 2  # DiagonalGaussianDistribution: [mean | logvar] along channels
    with torch.no_grad():
        layer.bias[channels:] += LOGVAR_SHIFT


def _train(
    vae: AutoencoderKL,
    images: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    log: Callable[[str], None] | None,
) -> None:
    if steps <= 0:
        return
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, foreach=True)
    warmup = max(1, min(WARMUP_STEPS, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * s / steps))
    )
    bar = tqdm(range(steps), desc="demo VAE", unit="step", disable=log is None)
    for _ in bar:
        index = torch.randint(images.shape[0], (batch_size,), generator=generator).to(images.device)
        batch = images[index]
        posterior = vae.encode(batch).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=generator).to(batch.device)
        recon = vae.decode(posterior.mean + posterior.std * eps).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        mse = F.mse_loss(recon, batch)
        loss = mse + L1_WEIGHT * F.l1_loss(recon, batch) + KL_WEIGHT * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(mse=f"{mse.item():.4f}", refresh=False)


# ------------------------------------------------------------------------------------ cached entry point


def demo_vae_settings(cfg: RunConfig) -> tuple[int, float, int]:
    """(steps, lr, batch_size) from ``model.demo_vae_*``."""
    m = cfg.model
    return m.demo_vae_steps, m.demo_vae_lr, m.demo_vae_batch_size


def demo_components_dir(cfg: RunConfig) -> Path:
    """Cache folder of the tiny components with the fitted VAE, inside the demo dataset folder, keyed by the
    fitting recipe and every setting the tiny components are built from."""
    steps, lr, batch_size = demo_vae_settings(cfg)
    name = f"components-v{VAE_FORMAT_VERSION}-steps{steps}-lr{lr:g}-b{batch_size}-c{cfg.model.cross_attention_dim}"
    return demo_shards_dir(cfg) / name


def ensure_demo_components(
    cfg: RunConfig,
    *,
    local_rank: int,
    run_components: str | Path,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
) -> Path | None:
    """The components folder (vae/ image_encoder/ scheduler/ feature_extractor/) a demo run should use, with
    its VAE fitted to the demo renders; fits it on first use (collective).

    None (the run builds its own) when ``model.pretrained`` or ``model.components`` is set or
    ``model.demo_vae_steps=0``. ``run_components`` (a resumed run's own folder) wins when it holds a VAE: the
    UNet was trained in that latent space. Otherwise local rank 0 fits the seeded tiny VAE (the global RNG is
    not used) and publishes the folder (safetensors) by renaming a private temporary folder, so nodes never
    see a half-written cache; the other processes wait at a barrier. Needs the demo renders
    (``ensure_demo_shards``).
    """
    steps, lr, batch_size = demo_vae_settings(cfg)
    if cfg.model.pretrained or cfg.model.components or steps <= 0:
        return None
    run_components = Path(run_components)
    folder = (
        run_components if (run_components / "vae" / "config.json").is_file() else demo_components_dir(cfg)
    )
    if local_rank == 0 and not (folder / "vae" / "config.json").is_file():
        _fit_and_save(cfg, folder, steps=steps, lr=lr, batch_size=batch_size, device=device, log=log)
    if dist.is_initialized():
        dist.barrier()  # on every path: ranks that see different folders must not deadlock
    return folder


def _fit_and_save(
    cfg: RunConfig, final: Path, *, steps: int, lr: float, batch_size: int, device, log
) -> dict:
    renders = demo_shards_dir(cfg) / "renders"
    if not renders.is_dir():
        raise DemoVAEError(
            f"no demo renders at {renders}: call ensure_demo_shards before ensure_demo_components"
        )
    log(f"fitting the demo VAE to {renders} ({steps} steps, first use only)")
    # The same seeded tiny parts the run would build itself: only the VAE's weights change.
    components = tiny_components(cfg.data.resolution, cfg.model.cross_attention_dim, seed=cfg.run.seed)
    components.vae.to(device)
    stats = fit_demo_vae(
        components.vae, renders, steps=steps, batch_size=batch_size, lr=lr, seed=cfg.run.seed, log=log
    )
    components.vae.to("cpu")

    def save(tmp: Path) -> None:
        save_components(components, tmp)
        (tmp / FIT_STATS).write_text(json.dumps(stats, indent=1) + "\n")

    build_then_publish(final, save)
    return stats
