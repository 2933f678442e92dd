"""The diffusion training objective of one micro-batch, following Wonder3D's trainers.

Frozen VAE and CLIP encode the batch (no grad) → condition dropout per object → one timestep per object and
domain, shared by its views → noisy target latent ++ condition latent (8 channels) → UNet → MSE with min-SNR
weighting. Images are laid out as ``modeling.layout`` defines (domain, object, view).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from datapipes.latent_stream import LATENT_BATCH_KEY
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


def domain_sums(per_image: Tensor, is_normal: Tensor) -> dict[str, Tensor]:
    """Sum and image count of the per-image loss of each domain: ``loss_<domain>_sum``, ``loss_<domain>_images``.

    0-d tensors on the loss's device, so no micro-step waits for the device (a boolean-mask select or
    ``.item()`` would): the train loop adds them up and reads them once per logging interval. Sums and counts
    add up over micro-steps, steps and ranks; ``domain_means`` divides them at the end, so a domain that a
    micro-batch lacks (mix mode) contributes nothing instead of a NaN.
    """
    out = {}
    for domain, normal in DOMAINS.items():
        mine = is_normal == normal
        # where, not a product: another domain's non-finite loss must not leak into this domain's sum
        out[f"loss_{domain}_sum"] = torch.where(mine, per_image, 0.0).sum()
        out[f"loss_{domain}_images"] = mine.sum(dtype=per_image.dtype)
    return out


def domain_means(values: dict[str, float]) -> dict[str, float]:
    """``values`` (read from the device: floats) with each domain's sum/count pair replaced by ``loss_<domain>``,
    the mean over the images (and so the objects, each having the same views) that had it; a domain no image
    of the step had is left out."""
    out = dict(values)
    for domain in DOMAINS:
        total, images = out.pop(f"loss_{domain}_sum"), out.pop(f"loss_{domain}_images")
        if images > 0:
            out[f"loss_{domain}"] = total / images
    return out


def _per_object(normal: Tensor, color: Tensor, is_normal: Tensor) -> Tensor:
    """Per object (dim 0), the normal-domain or the color-domain tensor; no copy when all pick the same."""
    if bool(is_normal.all()):
        return normal
    if not bool(is_normal.any()):
        return color
    return torch.where(is_normal.view(-1, *[1] * (normal.dim() - 1)).to(normal.device), normal, color)


def choose_normal_domain(generators: list[torch.Generator]) -> Tensor:
    """Mix mode: one fair coin per object, True = the object trains its normal views. Shape [B] bool."""
    return rand_per_object(generators) < 0.5


class DiffusionObjective:
    """Computes the loss of one micro-batch; holds the frozen encoders and the noise scheduler.

    A batch of images (``datapipes.transform``) is encoded here; a batch of cached latents
    (``datapipes.latent_stream``) carries the encoders' outputs, and only the sampling is done here, with the
    same per-object draws in the same order, so both give the same latents up to the fp16 storage.
    """

    def __init__(self, components: Components, cfg: RunConfig, device: torch.device):
        self.vae, self.clip = components.vae, components.image_encoder
        self.scheduler = components.noise_scheduler
        self.scaling = float(self.vae.config.scaling_factor)
        self.cfg, self.device = cfg, device
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)

    @torch.no_grad()
    def prepare(self, batch: dict, generators: list[torch.Generator]) -> ModelInputs:
        """Encode (or read the cached posteriors), drop conditions, draw timesteps and noise for every image."""
        views = batch["camera_embed_image"].shape[1]
        drop_clip, drop_latent = self._condition_dropout(generators)
        cond_latent = self._cond_latent(batch) * ~drop_latent[:, None, None, None]
        clip = self._clip_embeds(batch) * ~drop_clip[:, None]
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

    def _cond_latent(self, batch: dict) -> Tensor:
        """Scaled posterior mode (= mean, as Wonder3D) of the condition image: (B, 4, h, w) float32."""
        if LATENT_BATCH_KEY in batch:
            return batch["cond_mean"].to(self.device).float() * self.scaling
        return self._vae_posterior(batch["image_cond_vae"])[0] * self.scaling

    def _clip_embeds(self, batch: dict) -> Tensor:
        """CLIP image embedding of the condition image: (B, C) float32."""
        if LATENT_BATCH_KEY in batch:
            return batch["clip_embed"].to(self.device).float()
        # The frozen encoders may run in the training precision (engine.build): inputs in their dtype,
        # outputs back to float32 so the noise and loss maths stay as they are.
        images = batch["image_cond_CLIP"].to(self.device, self.clip.dtype)
        return self.clip(images).image_embeds.float()

    def _vae_posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, std) of the VAE posterior of images (N, 3, H, W): each (N, 4, h, w) float32, unscaled."""
        dist = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
        return dist.mean.float(), torch.exp(0.5 * dist.logvar.float())

    def _target_posterior(self, batch: dict, is_normal: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, std) of each object's target views of the domain ``is_normal`` (B,) picks for it:
        (B, V, 4, h, w) float32, unscaled. Only those views are encoded (mix mode: one domain per object)."""
        if LATENT_BATCH_KEY in batch:
            mean = _per_object(batch["normal_mean"], batch["color_mean"], is_normal)
            logvar = _per_object(batch["normal_logvar"], batch["color_logvar"], is_normal)
            return mean.to(self.device).float(), torch.exp(0.5 * logvar.to(self.device).float())
        images = _per_object(batch["normal_target_vae"], batch["image_target_vae"], is_normal)
        b, v = images.shape[:2]
        mean, std = self._vae_posterior(images.flatten(0, 1))
        return mean.unflatten(0, (b, v)), std.unflatten(0, (b, v))

    def _sample_latents(self, posterior: tuple[Tensor, Tensor], eps: Tensor) -> Tensor:
        """Posterior sample (mean + std·eps)·scaling, as diffusers' ``latent_dist.sample()``; (B, V, 4, h, w)."""
        mean, std = posterior
        return (mean + std * eps.to(self.device)) * self.scaling

    def _joint(self, batch, generators, views, cond_latent, clip) -> ModelInputs:
        # The reference draws independent timesteps for the normal and the color half.
        steps = randint_per_object(generators, self.scheduler.config.num_train_timesteps, 2).to(self.device)
        b = cond_latent.shape[0]
        normal_post = self._target_posterior(batch, torch.ones(b, dtype=torch.bool))
        normal = self._sample_latents(normal_post, randn_per_object(generators, normal_post[0].shape[1:]))
        color_post = self._target_posterior(batch, torch.zeros(b, dtype=torch.bool))
        color = self._sample_latents(color_post, randn_per_object(generators, color_post[0].shape[1:]))
        latents = stack_domains(normal, color)

        def per_view(x: Tensor) -> Tensor:  # (B, ...) -> (B, V, ...) repeated over views
            return x.unsqueeze(1).expand(x.shape[0], views, *x.shape[1:])

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
        chosen = choose_normal_domain(generators)
        is_normal = chosen.to(self.device)
        steps = randint_per_object(generators, self.scheduler.config.num_train_timesteps, 1)[:, 0].to(
            self.device
        )
        posterior = self._target_posterior(batch, chosen)  # only the domain each object trains is encoded
        shape = posterior[0].shape[1:]
        # Both domains' draws are made, in the order the step made them when it encoded both, so the draws
        # after them (the noise) and so the loss curve stay what they were.
        eps_normal, eps_color = randn_per_object(generators, shape), randn_per_object(generators, shape)
        eps = _per_object(eps_normal, eps_color, chosen)
        latents = self._sample_latents(posterior, eps).flatten(0, 1)
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
