"""The frozen parts around the trainable UNet: VAE, CLIP image encoder, noise scheduler, feature extractor.

Two ways to get them:
- `tiny_components(...)`: random-init tiny models built from config, for tests and smoke runs;
- `load_components(folder)`: a diffusers-layout folder in the sd-image-variations layout
  (`vae/ image_encoder/ scheduler/ feature_extractor/`), or an exported gnn3d model folder (which adds
  `unet/` and `model_index.json`; `load_model_folder` returns the UNet too). A hub id ("org/name") is
  resolved to its folder in the Hugging Face cache first (`modeling/hub.py`).

The feature extractor is transformers' `CLIPImageProcessorPil`: the plain `CLIPImageProcessor` of
transformers 5.x wants torchvision (not available here) and warns on every construction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

from modeling.hub import resolve_model_folder
from modeling.unet_loading import WeightsError
from modeling.unet_mv import MVUNet

# Subfolder names of the diffusers layout (sd-image-variations and our exported model folders).
VAE_DIR, IMAGE_ENCODER_DIR, SCHEDULER_DIR, FEATURE_EXTRACTOR_DIR, UNET_DIR = (
    "vae",
    "image_encoder",
    "scheduler",
    "feature_extractor",
    "unet",
)
MODEL_INDEX = "model_index.json"

# CLIP ViT normalisation (openai/clip-vit-large-patch14, as in sd-image-variations' feature extractor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Stable Diffusion 1.x noise schedule (the schedule sd-image-variations and Wonder3D train with).
SD1_SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
}


class ModelFolderError(OSError):
    """A model folder is missing a part or has an unreadable one; the message names folder and part."""


@dataclass
class Components:
    """Everything around the trainable UNet (all frozen during training).

    Attributes:
        vae: 8x-downsampling AutoencoderKL with 4 latent channels.
        image_encoder: CLIP vision tower whose `image_embeds` [B, cross_attention_dim] is the UNet context.
        noise_scheduler: the training (DDPM) scheduler; inference schedulers are built from its config.
        feature_extractor: CLIP preprocessing config (resize, mean/std); None when not needed.
    """

    vae: AutoencoderKL
    image_encoder: CLIPVisionModelWithProjection
    noise_scheduler: DDPMScheduler
    feature_extractor: CLIPImageProcessorPil | None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Components:
        """Move the VAE and the image encoder in place (schedulers hold no tensors); returns self."""
        # diffusers warns whenever `dtype` is passed, even as None: pass only what is set
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        self.vae.to(**kwargs)
        self.image_encoder.to(**kwargs)
        return self

    def freeze(self) -> Components:
        """Eval mode and no gradients for the VAE and the image encoder; returns self."""
        for model in (self.vae, self.image_encoder):
            model.eval()
            model.requires_grad_(False)
        return self


def tiny_vae(resolution: int = 64) -> AutoencoderKL:
    """A tiny AutoencoderKL: 4 blocks (three 2x downsamplings = 8x), 4 latent channels, widths <= 16."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=resolution,
        scaling_factor=0.18215,
    )


def tiny_image_encoder(cross_attention_dim: int = 32) -> CLIPVisionModelWithProjection:
    """A tiny CLIP vision tower: 224² input, 32-px patches (49 tokens), width 32, 2 layers.

    `projection_dim = cross_attention_dim` so `image_embeds` can be the UNet's cross-attention context.
    """
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=224,
        patch_size=32,
        projection_dim=cross_attention_dim,
    )
    return CLIPVisionModelWithProjection(config)


def clip_feature_extractor(size: int = 224) -> CLIPImageProcessorPil:
    """CLIP preprocessing as in sd-image-variations: bicubic resize of the short side, centre crop, mean/std."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        resample=3,  # PIL bicubic
    )


def tiny_components(resolution: int = 64, cross_attention_dim: int = 32, seed: int = 0) -> Components:
    """Random-init tiny components, identical for the same arguments (global RNG left untouched).

    Args:
        resolution: image side in pixels (the VAE's `sample_size`; latents are resolution / 8).
        cross_attention_dim: CLIP projection width = the UNet's `cross_attention_dim`.
        seed: weight-init seed.
    """
    # fork_rng keeps the caller's RNG stream unchanged: building tiny models must not shift a test's noise.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = tiny_vae(resolution)
        image_encoder = tiny_image_encoder(cross_attention_dim)
    components = Components(
        vae=vae,
        image_encoder=image_encoder,
        noise_scheduler=DDPMScheduler(**SD1_SCHEDULER_CONFIG),
        feature_extractor=clip_feature_extractor(),
    )
    return components.freeze()


def save_components(components: Components, folder: str | Path) -> None:
    """Write the components in the diffusers layout: `vae/ image_encoder/ scheduler/ [feature_extractor/]`.

    Weights as safetensors, configs as JSON. A None feature extractor writes no `feature_extractor/`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    components.vae.save_pretrained(folder / VAE_DIR, safe_serialization=True)
    components.image_encoder.save_pretrained(folder / IMAGE_ENCODER_DIR, safe_serialization=True)
    components.noise_scheduler.save_pretrained(folder / SCHEDULER_DIR)
    if components.feature_extractor is not None:
        components.feature_extractor.save_pretrained(folder / FEATURE_EXTRACTOR_DIR)


def _model_folder(name: str | Path) -> Path:
    """A local folder, or a hub id resolved through the hub cache; ModelFolderError if neither."""
    try:
        folder = resolve_model_folder(name)
    except FileNotFoundError as error:
        raise ModelFolderError(f"model folder {error}") from error
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} is not a folder")
    return folder


def _require_subfolder(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_dir():
        raise ModelFolderError(
            f"model folder {folder} has no '{name}/' subfolder (expected the diffusers layout: "
            f"{VAE_DIR}/ {IMAGE_ENCODER_DIR}/ {SCHEDULER_DIR}/ {FEATURE_EXTRACTOR_DIR}/)"
        )
    return path


def load_components(folder: str | Path, require_feature_extractor: bool = True) -> Components:
    """Load VAE, CLIP image encoder, DDPM scheduler and feature extractor from a diffusers folder or hub id.

    The scheduler subfolder may hold any diffusers scheduler config (sd-image-variations ships a PNDM one);
    it is read as a DDPMScheduler, the training scheduler. Returns frozen components on the CPU.

    Raises:
        ModelFolderError: the folder (or hub id) or one of its subfolders is missing (the message names it),
            or a part fails to load.
    """
    folder = _model_folder(folder)
    parts = {name: _require_subfolder(folder, name) for name in (VAE_DIR, IMAGE_ENCODER_DIR, SCHEDULER_DIR)}
    fe_path = folder / FEATURE_EXTRACTOR_DIR
    if require_feature_extractor:
        fe_path = _require_subfolder(folder, FEATURE_EXTRACTOR_DIR)
    try:
        # low_cpu_mem_usage=False: the plain path (no `accelerate` here; it also warns when missing)
        vae = AutoencoderKL.from_pretrained(parts[VAE_DIR], low_cpu_mem_usage=False)
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(parts[IMAGE_ENCODER_DIR])
        scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(parts[SCHEDULER_DIR]))
        feature_extractor = CLIPImageProcessorPil.from_pretrained(fe_path) if fe_path.is_dir() else None
    except (OSError, ValueError, json.JSONDecodeError) as error:
        raise ModelFolderError(f"model folder {folder}: failed to load a component: {error}") from error
    return Components(vae, image_encoder, scheduler, feature_extractor).freeze()


def save_model_folder(components: Components, unet: MVUNet, folder: str | Path) -> None:
    """Export a full gnn3d model folder: the components, `unet/` and a diffusers-style `model_index.json`."""
    folder = Path(folder)
    save_components(components, folder)
    unet.save_pretrained(folder / UNET_DIR, safe_serialization=True)
    index = {
        "_class_name": "MVDiffusionPipeline",
        "unet": ["modeling.unet_mv", type(unet).__name__],
        "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "scheduler": ["diffusers", type(components.noise_scheduler).__name__],
        "feature_extractor": ["transformers", "CLIPImageProcessorPil"]
        if components.feature_extractor is not None
        else [None, None],
    }
    (folder / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def load_model_folder(folder: str | Path) -> tuple[Components, MVUNet]:
    """Load a gnn3d model folder or hub id (`unet/` + the components). Returns (components, unet in eval).

    The UNet goes through the one strict loader (`MVUNet.from_pretrained`): a Wonder3D `unet/` with legacy
    weight names loads; a missing or unexpected weight is a ModelFolderError naming the folder and keys.
    """
    folder = _model_folder(folder)
    components = load_components(folder)
    unet_path = _require_subfolder(folder, UNET_DIR)
    try:
        unet = MVUNet.from_pretrained(unet_path)
    except (OSError, ValueError, WeightsError) as error:
        raise ModelFolderError(f"model folder {folder}: failed to load '{UNET_DIR}/': {error}") from error
    return components, unet
