"""A tiny model folder in the sd-image-variations layout (vae/ image_encoder/ scheduler/ feature_extractor/ unet/),
and the same folder inside a Hugging Face hub cache, for runs that start from ``model.pretrained``."""

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from modeling.components import save_components, tiny_components

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_tiny_pretrained(folder: Path, resolution: int = 32) -> Path:
    """Tiny frozen components (scheduler: SD 1.x, epsilon) and a tiny 2D UNet (unet/); returns ``folder``."""
    save_components(tiny_components(resolution=resolution, cross_attention_dim=32, seed=0), folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=resolution // 8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=8,
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        )  # fmt: skip
    unet.save_pretrained(folder / "unet")
    return folder


def hub_snapshot(hf_home: Path, repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` in the hub cache under ``hf_home`` (HF_HOME), with refs/main
    pointing at it, as ``huggingface_hub`` lays out a download; fill it with the repo's files."""
    storage = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(HUB_COMMIT)
    snapshot = storage / "snapshots" / HUB_COMMIT
    snapshot.mkdir(parents=True)
    return snapshot
