"""The diffusion training objective of one micro-batch, following Wonder3D's trainers.

Frozen VAE and CLIP encode the batch (no grad) → condition dropout per object → one timestep per object and
domain, shared by its views → noisy target latent ++ condition latent (8 channels) → UNet → MSE with min-SNR
weighting. Images are laid out as ``modeling.layout`` defines (domain, object, view).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.config import RunConfig
from engine.randomness import rand_per_object, randint_per_object, randn_per_object
from modeling.components import Components
from modeling.layout import stack_domains


@dataclass
class ModelInputs:
    """UNet inputs and targets for N images (N = 2·B·V joint, B·V mix)."""

    latents: Tensor  # (N, 4, h, w) clean target latents
    cond_latent: Tensor  # (N, 4, h, w)
    clip_embeds: Tensor  # (N, 1, C)
    camera: Tensor  # (N, 10)
    timesteps: Tensor  # (N,)
    noise: Tensor  # (N, 4, h, w)
    is_normal: Tensor  # (N,) bool: which domain each image belongs to


DOMAINS = {"normal": True, "color": False}  # logged name -> value of ModelInputs.is_normal


def domain_sums(per_image: Tensor, is_normal: Tensor) -> dict[str, float]:
    """Sum and image count of the per-image loss of each domain: ``loss_<domain>_sum``, ``loss_<domain>_images``.

    Sums and counts add up over micro-steps and ranks; ``domain_means`` divides them at the end, so a domain
    that a micro-batch lacks (mix mode) contributes nothing instead of a NaN.
    """
    out = {}
    for domain, normal in DOMAINS.items():
        mine = per_image[is_normal == normal]
        out[f"loss_{domain}_sum"] = mine.sum().item()
        out[f"loss_{domain}_images"] = float(mine.numel())
    return out


def domain_means(values: dict[str, float]) -> dict[str, float]:
    """``values`` with each domain's sum/count pair replaced by ``loss_<domain>``, the mean over the images (and
    so the objects, each having the same views) that had it; a domain no image of the step had is left out."""
    out = dict(values)
    for domain in DOMAINS:
        total, images = out.pop(f"loss_{domain}_sum"), out.pop(f"loss_{domain}_images")
        if images > 0:
            out[f"loss_{domain}"] = total / images
    return out


def choose_normal_domain(generators: list[torch.Generator]) -> Tensor:
    """Mix mode: one fair coin per object, True = the object trains its normal views. Shape [B] bool."""
    return rand_per_object(generators) < 0.5


class DiffusionObjective:
    """Computes the loss of one micro-batch; holds the frozen encoders and the noise scheduler."""

    def __init__(self, components: Components, cfg: RunConfig, device: torch.device):
        self.vae, self.clip = components.vae, components.image_encoder
        self.scheduler = components.noise_scheduler
        self.scaling = float(self.vae.config.scaling_factor)
        self.cfg, self.device = cfg, device
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)

    @torch.no_grad()
    def prepare(self, batch: dict, generators: list[torch.Generator]) -> ModelInputs:
        """Encode, drop conditions, draw timesteps and noise for every image of the batch."""
        views = batch["image_target_vae"].shape[1]
        drop_clip, drop_latent = self._condition_dropout(generators)
        cond_latent = self._encode_mode(batch["image_cond_vae"]) * ~drop_latent[:, None, None, None]
        clip = self.clip(batch["image_cond_CLIP"].to(self.device)).image_embeds * ~drop_clip[:, None]
        if self.cfg.data.mode == "joint":
            return self._joint(batch, generators, views, cond_latent, clip)
        return self._mix(batch, generators, views, cond_latent, clip)

    def loss(self, unet: torch.nn.Module, inputs: ModelInputs) -> tuple[Tensor, dict[str, float]]:
        """Weighted MSE of the UNet prediction, and the per-domain sums for logging (see ``domain_sums``)."""
        noisy = self.scheduler.add_noise(inputs.latents, inputs.noise, inputs.timesteps)
        dtype = next(unet.parameters()).dtype
        sample = torch.cat([noisy, inputs.cond_latent], dim=1).to(dtype)
        pred = unet(
            sample, inputs.timesteps, inputs.clip_embeds.to(dtype), class_labels=inputs.camera.to(dtype)
        )
        pred = pred.sample.float()
        target = self._target(inputs)
        per_image = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * self._snr_weight(inputs)
        return per_image.mean(), domain_sums(per_image.detach(), inputs.is_normal)

    def _condition_dropout(self, generators: list[torch.Generator]) -> tuple[Tensor, Tensor]:
        """One draw per object ("drop as a whole"): CLIP only / both / condition latent only."""
        t = self.cfg.train
        u = rand_per_object(generators).to(self.device)
        drop_clip = u < t.drop_image_embed + t.drop_both
        drop_latent = (u >= t.drop_image_embed) & (u < t.drop_image_embed + t.drop_both + t.drop_cond_latent)
        return drop_clip, drop_latent

    def _encode_mode(self, images: Tensor) -> Tensor:
        return self.vae.encode(images.to(self.device)).latent_dist.mode() * self.scaling

    def _encode_sample(self, images: Tensor, generators: list[torch.Generator]) -> Tensor:
        """VAE posterior sample with per-object noise; images (B, V, 3, H, W) -> (B, V, 4, h, w)."""
        b, v = images.shape[:2]
        dist = self.vae.encode(images.flatten(0, 1).to(self.device)).latent_dist
        eps = randn_per_object(generators, (v, *dist.mean.shape[1:])).to(self.device)
        return (dist.mean + dist.std * eps.flatten(0, 1)).unflatten(0, (b, v)) * self.scaling

    def _joint(self, batch, generators, views, cond_latent, clip) -> ModelInputs:
        # The reference draws independent timesteps for the normal and the color half.
        steps = randint_per_object(generators, self.scheduler.config.num_train_timesteps, 2).to(self.device)
        normal = self._encode_sample(batch["normal_target_vae"], generators)
        color = self._encode_sample(batch["image_target_vae"], generators)
        latents = stack_domains(normal, color)

        def per_view(x: Tensor) -> Tensor:  # (B, ...) -> (B, V, ...) repeated over views
            return x.unsqueeze(1).expand(x.shape[0], views, *x.shape[1:])

        b = cond_latent.shape[0]
        return ModelInputs(
            latents=latents,
            cond_latent=stack_domains(per_view(cond_latent), per_view(cond_latent)),
            clip_embeds=stack_domains(per_view(clip), per_view(clip)).unsqueeze(1),
            camera=stack_domains(batch["camera_embed_normal"], batch["camera_embed_image"]).to(self.device),
            timesteps=stack_domains(per_view(steps[:, 0]), per_view(steps[:, 1])),
            noise=stack_domains(*self._domain_noise(generators, views, latents.shape[1:])),
            is_normal=torch.arange(2 * b * views, device=self.device) < b * views,
        )

    def _mix(self, batch, generators, views, cond_latent, clip) -> ModelInputs:
        # Stage 1: each object trains one domain, 50/50, marked by the domain one-hot of its camera embedding.
        is_normal = choose_normal_domain(generators).to(self.device)
        steps = randint_per_object(generators, self.scheduler.config.num_train_timesteps, 1)[:, 0].to(
            self.device
        )
        normal = self._encode_sample(batch["normal_target_vae"], generators)
        color = self._encode_sample(batch["image_target_vae"], generators)
        pick = is_normal[:, None, None, None, None]
        latents = torch.where(pick, normal, color).flatten(0, 1)
        camera = torch.where(
            is_normal[:, None, None],
            batch["camera_embed_normal"].to(self.device),
            batch["camera_embed_image"].to(self.device),
        )
        noise = randn_per_object(generators, (views, *latents.shape[1:])).to(self.device).flatten(0, 1)
        return ModelInputs(
            latents=latents,
            cond_latent=cond_latent.repeat_interleave(views, dim=0),
            clip_embeds=clip.repeat_interleave(views, dim=0).unsqueeze(1),
            camera=camera.flatten(0, 1),
            timesteps=steps.repeat_interleave(views),
            noise=noise,
            is_normal=is_normal.repeat_interleave(views),
        )

    def _domain_noise(self, generators, views: int, latent_shape) -> tuple[Tensor, Tensor]:
        noise = randn_per_object(generators, (2, views, *latent_shape)).to(self.device)  # (B, 2, V, 4, h, w)
        return noise[:, 0], noise[:, 1]

    def _target(self, inputs: ModelInputs) -> Tensor:
        if self.scheduler.config.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(inputs.latents, inputs.noise, inputs.timesteps)
        return inputs.noise

    def _snr_weight(self, inputs: ModelInputs) -> Tensor:
        """Min-SNR-γ weights (Hang et al. 2023); all ones when snr_gamma is 0."""
        gamma = self.cfg.train.snr_gamma
        if gamma <= 0:
            return torch.ones_like(inputs.timesteps, dtype=torch.float32)
        alpha = self.alphas_cumprod[inputs.timesteps]
        snr = alpha / (1 - alpha)
        clipped = torch.clamp(snr, max=gamma)
        v_pred = self.scheduler.config.prediction_type == "v_prediction"
        return clipped / (snr + 1) if v_pred else clipped / snr
