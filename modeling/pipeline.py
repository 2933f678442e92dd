"""Inference: one condition image -> V normal maps and V color images (Wonder3D's image pipeline semantics).

Per object the UNet denoises 2·V latents in the batch layout (`modeling/layout.py`): normal rows, then color
rows. Its inputs per row are
- the noisy latent (4 ch) concatenated with the VAE latent of the condition image (mode × scaling factor,
  4 ch) -> 8 channels;
- the CLIP `image_embeds` of the condition image as a one-token cross-attention context;
- the row's 10-d camera + domain embedding as `class_labels`.

Classifier-free guidance (guidance_scale > 1): the unconditional branch zeroes both the CLIP embedding and
the condition latent. The two branches are stacked as if they were 2·B objects (uncond objects first), so
the normal and color halves stay row-aligned for cross-domain attention.

A plain class rather than a diffusers `DiffusionPipeline`: the UNet, its batch layout and the component
folder format are ours; `modeling.components.save_model_folder` / `load_model_folder` do the I/O.

    pipe = MVDiffusionPipeline.from_pretrained("runs/export")
    out = pipe(image_cond, camera_embedding, num_inference_steps=50, guidance_scale=3.0, seed=0)
    out.normals, out.colors  # [B, V, 3, H, W] in [0, 1]
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor, nn
from tqdm.auto import tqdm

from modeling.components import CLIP_MEAN, CLIP_STD, Components, load_model_folder
from modeling.layout import split_domains, stack_domains

# Inference schedulers, all built from the training (DDPM) scheduler's config.
SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}
CAMERA_DIM = 10


class PipelineError(ValueError):
    """Bad pipeline arguments; the message names the argument and the expected shape or value."""


@dataclass
class MVDiffusionOutput:
    """Generated views, each float32 [B, V, 3, H, W] in [0, 1] on the CPU, views in camera order."""

    normals: Tensor
    colors: Tensor


def make_scheduler(name: str, train_config: dict) -> SchedulerMixin:
    """A fresh inference scheduler `name` (see SCHEDULERS) built from the training scheduler's config.

    DDIM gets SD-1.x's `set_alpha_to_one=False` unless the config says otherwise (the sd-image-variations
    scheduler config sets it; a DDPM config has no such key and DDIM would default to True).
    """
    if name not in SCHEDULERS:
        raise PipelineError(f"scheduler {name!r} is unknown; choose one of {sorted(SCHEDULERS)}")
    config = dict(train_config)
    if name == "ddim":
        config.setdefault("set_alpha_to_one", False)
    return SCHEDULERS[name].from_config(config)


def _to_kwargs(device: torch.device | str | None, dtype: torch.dtype | None) -> dict:
    """`.to()` arguments without the None ones (diffusers warns when `dtype` is passed at all)."""
    return {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}


def per_view(x: Tensor, num_views: int) -> Tensor:
    """Repeat a per-object tensor for every view: [B, ...] -> [B, V, ...] (a view, no copy)."""
    return x.unsqueeze(1).expand(x.shape[0], num_views, *x.shape[1:])


def guide(noise_pred: Tensor, num_objects: int, num_views: int, guidance_scale: float) -> Tensor:
    """Combine the two CFG branches: uncond + scale · (cond − uncond), per domain.

    noise_pred: [2·(2B)·V, ...] in the batch layout with 2B objects (uncond objects first).
    Returns [2·B·V, ...] in the batch layout with B objects.
    """
    normal, color = split_domains(noise_pred, 2 * num_objects, num_views)
    guided = [
        half[:num_objects] + guidance_scale * (half[num_objects:] - half[:num_objects])
        for half in (normal, color)
    ]
    return stack_domains(*guided)


class MVDiffusionPipeline:
    """Multi-view cross-domain diffusion sampler (see module docstring)."""

    def __init__(self, unet: nn.Module, components: Components, scheduler: str = "ddim") -> None:
        make_scheduler(scheduler, components.noise_scheduler.config)  # fail early on a bad name
        self.unet = unet
        self.components = components
        self.scheduler_name = scheduler

    @classmethod
    def from_pretrained(cls, folder: str | Path, scheduler: str = "ddim") -> MVDiffusionPipeline:
        """Load a gnn3d model folder (`unet/ vae/ image_encoder/ scheduler/ feature_extractor/`) or hub id.

        The UNet loads strictly (`MVUNet.from_pretrained`); problems raise `ModelFolderError`.
        """
        components, unet = load_model_folder(folder)
        return cls(unet, components, scheduler)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> MVDiffusionPipeline:
        """Move UNet, VAE and image encoder; returns self."""
        if dtype == self.dtype:
            dtype = None  # diffusers warns on any dtype argument, even a no-op one
        self.unet.to(**_to_kwargs(device, dtype))
        self.components.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def _clip_pixels(self, image: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> CLIP input, as the training data does (antialiased bicubic + mean/std)."""
        extractor = self.components.feature_extractor
        size = extractor.crop_size["height"] if extractor is not None else 224
        mean = extractor.image_mean if extractor is not None else CLIP_MEAN
        std = extractor.image_std if extractor is not None else CLIP_STD
        resized = F.interpolate(image, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        mean_t = torch.tensor(mean, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
        std_t = torch.tensor(std, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
        return (resized.clamp(0.0, 1.0) - mean_t) / std_t

    @torch.no_grad()
    def encode_condition(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """Condition image [B, 3, H, W] in [0, 1] -> (CLIP context [B, 1, C], VAE latent [B, 4, H/8, W/8])."""
        encoder, vae = self.components.image_encoder, self.components.vae
        encoder_dtype = next(encoder.parameters()).dtype
        pixels = self._clip_pixels(image.float()).to(encoder_dtype)
        clip_embeds = encoder(pixels).image_embeds.unsqueeze(1)
        vae_dtype = next(vae.parameters()).dtype
        latent = vae.encode((image * 2.0 - 1.0).to(vae_dtype)).latent_dist.mode()
        return clip_embeds.float(), latent.float() * vae.config.scaling_factor

    def _conditioning(
        self, clip_embeds: Tensor, cond_latent: Tensor, camera: Tensor, cfg: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-row UNet conditioning in the batch layout: (context [N,1,C], cond latent [N,4,h,w], labels [N,10]).

        clip_embeds [B,1,C], cond_latent [B,4,h,w], camera [B,2,V,10]. N = 2·B·V, or 4·B·V with CFG
        (the zeroed unconditional objects first).
        """
        views = camera.shape[2]
        if cfg:
            clip_embeds = torch.cat([torch.zeros_like(clip_embeds), clip_embeds])
            cond_latent = torch.cat([torch.zeros_like(cond_latent), cond_latent])
            camera = torch.cat([camera, camera])
        context = per_view(clip_embeds, views)
        latent = per_view(cond_latent, views)
        return (
            stack_domains(context, context),
            stack_domains(latent, latent),
            stack_domains(camera[:, 0], camera[:, 1]),
        )

    def _check_inputs(self, image: Tensor, camera_embedding: Tensor) -> Tensor:
        """Validate shapes; returns the camera embedding as [B, 2, V, 10]."""
        if image.dim() != 4 or image.shape[1] != 3:
            raise PipelineError(f"image must be [B, 3, H, W] in [0, 1], got shape {tuple(image.shape)}")
        if image.shape[-1] % 8 or image.shape[-2] % 8:
            raise PipelineError(
                f"image height and width must be multiples of 8, got {tuple(image.shape[-2:])}"
            )
        camera = camera_embedding
        if camera.dim() == 3:
            camera = camera.unsqueeze(0).expand(image.shape[0], *camera.shape)
        if camera.dim() != 4 or camera.shape[0] != image.shape[0] or camera.shape[1] != 2:
            raise PipelineError(
                f"camera_embedding must be [2, V, {CAMERA_DIM}] (normal then color) or [B, 2, V, {CAMERA_DIM}] "
                f"with B = {image.shape[0]}, got shape {tuple(camera_embedding.shape)}"
            )
        if camera.shape[-1] != CAMERA_DIM:
            raise PipelineError(f"camera_embedding last dim must be {CAMERA_DIM}, got {camera.shape[-1]}")
        expected_views = getattr(self.unet.config, "num_views", None)
        if expected_views is not None and camera.shape[2] != expected_views:
            raise PipelineError(
                f"camera_embedding has {camera.shape[2]} views, the UNet expects {expected_views}"
            )
        return camera

    def _initial_noise(self, shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
        """Gaussian noise drawn on the generator's device (CPU by default) so a seed means the same everywhere."""
        noise_device = generator.device if generator is not None else torch.device("cpu")
        return torch.randn(shape, generator=generator, device=noise_device).to(self.device)

    @torch.no_grad()
    def decode(self, latents: Tensor, chunk: int = 16) -> Tensor:
        """Latents [N, 4, h, w] -> images [N, 3, 8h, 8w] in [0, 1] (decoded in chunks to bound memory)."""
        vae = self.components.vae
        vae_dtype = next(vae.parameters()).dtype
        images = [
            vae.decode((part / vae.config.scaling_factor).to(vae_dtype)).sample.float()
            for part in latents.split(chunk)
        ]
        return (torch.cat(images) / 2.0 + 0.5).clamp(0.0, 1.0)

    def _predict_noise(
        self, latents: Tensor, t: Tensor, cond: tuple[Tensor, Tensor, Tensor], scale: float, views: int
    ) -> Tensor:
        """One UNet evaluation, both CFG branches in one batch when scale != 1.

        latents [2·B·V, 4, h, w] (batch layout); cond from `_conditioning`. Returns noise [2·B·V, 4, h, w].
        """
        context, cond_latent, labels = cond
        batch = latents.shape[0] // (2 * views)
        if scale != 1.0:  # the same noisy latents for both branches, stacked as 2·B objects
            normal, color = split_domains(latents, batch, views)
            latents = stack_domains(torch.cat([normal, normal]), torch.cat([color, color]))
        model_input = torch.cat([latents, cond_latent], dim=1).to(self.dtype)
        timesteps = t.to(self.device).expand(model_input.shape[0])
        noise_pred = self.unet(
            model_input,
            timesteps,
            encoder_hidden_states=context.to(self.dtype),
            class_labels=labels.to(self.dtype),
        ).sample.float()
        return noise_pred if scale == 1.0 else guide(noise_pred, batch, views, scale)

    @torch.no_grad()
    def __call__(
        self,
        image: Tensor,
        camera_embedding: Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        scheduler: str | None = None,
        eta: float = 0.0,
        progress: bool = True,
        latents: Tensor | None = None,
    ) -> MVDiffusionOutput:
        """Generate V normal maps and V color images per condition image.

        Args:
            image: float [B, 3, H, W] in [0, 1], H and W multiples of 8 (outputs have the same size).
            camera_embedding: float [2, V, 10] (normal rows, then color rows; same for every object) or
                [B, 2, V, 10]; see `datapipes.cameras.camera_embedding`.
            num_inference_steps: denoising steps.
            guidance_scale: CFG scale; 1 runs the conditional branch only.
            generator / seed: noise source; `seed` builds a CPU generator. Same seed -> same output.
            scheduler: "ddim" (default of the pipeline), "dpm" or "euler"; overrides the pipeline's.
            eta: DDIM eta (0 = deterministic DDIM).
            progress: show a tqdm bar over the steps.
            latents: optional initial noise [2·B·V, 4, H/8, W/8] in the batch layout (instead of drawing it).
        Returns:
            MVDiffusionOutput with normals and colors [B, V, 3, H, W] in [0, 1] on the CPU.
        """
        camera = self._check_inputs(image, camera_embedding).to(self.device, torch.float32)
        if generator is None and seed is not None:
            generator = torch.Generator("cpu").manual_seed(seed)
        batch, views = image.shape[0], camera.shape[2]
        sampler = make_scheduler(scheduler or self.scheduler_name, self.components.noise_scheduler.config)
        sampler.set_timesteps(num_inference_steps, device=self.device)
        # The engine samples with its training UNet: switch to eval only for the call, then restore.
        was_training = self.unet.training
        self.unet.eval()
        try:
            clip_embeds, cond_latent = self.encode_condition(image.to(self.device))
            cond = self._conditioning(clip_embeds, cond_latent, camera, cfg=guidance_scale != 1.0)
            shape = (2 * batch * views, 4, *cond_latent.shape[-2:])
            if latents is None:
                latents = self._initial_noise(shape, generator)
            elif tuple(latents.shape) != shape:
                raise PipelineError(
                    f"latents must have shape {shape} (batch layout), got {tuple(latents.shape)}"
                )
            latents = latents.to(self.device, torch.float32) * sampler.init_noise_sigma
            step_kwargs = _step_kwargs(sampler, generator, eta)
            for t in tqdm(sampler.timesteps, desc="denoising", disable=not progress):
                # Only the noisy latent is scaled (Euler/DPM); the condition latent enters unscaled, as in training.
                scaled = sampler.scale_model_input(latents, t)
                noise_pred = self._predict_noise(scaled, t, cond, guidance_scale, views)
                latents = sampler.step(noise_pred, t, latents, **step_kwargs).prev_sample
            normals, colors = split_domains(self.decode(latents), batch, views)
        finally:
            self.unet.train(was_training)
        return MVDiffusionOutput(normals=normals.cpu(), colors=colors.cpu())


def _step_kwargs(sampler: SchedulerMixin, generator: torch.Generator | None, eta: float) -> dict:
    """The optional `step()` arguments this scheduler accepts (generator for stochastic samplers, DDIM eta)."""
    accepted = inspect.signature(sampler.step).parameters
    kwargs: dict = {}
    if "generator" in accepted:
        kwargs["generator"] = generator
    if "eta" in accepted:
        kwargs["eta"] = eta
    return kwargs


def view_grid(normals: Tensor, colors: Tensor, condition: Tensor | None = None) -> Tensor:
    """One object's views as an image grid: normals on the top row, colors below, views left to right.

    normals, colors: [V, 3, H, W]; condition: optional [3, H, W] shown first on both rows.
    Returns [3, 2·H, V·W] (or [3, 2·H, (V+1)·W]), same dtype and range as the inputs.
    """
    rows = [normals, colors]
    if condition is not None:
        rows = [torch.cat([condition.unsqueeze(0), row]) for row in rows]
    return torch.cat([torch.cat(list(row), dim=-1) for row in rows], dim=-2)
