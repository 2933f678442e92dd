"""Build the frozen components and the trainable UNet that a run config describes."""

import json
from pathlib import Path

import torch

from engine.config import ConfigError, RunConfig
from modeling.components import Components, load_components, tiny_components
from modeling.convert_2d import load_from_2d_unet
from modeling.unet_mv import MVUNet, tiny_unet_config
from modeling.wonder3d_keys import load_wonder3d_unet


def multiview_options(cfg: RunConfig) -> dict:
    """The MVUNet config keys that the run config controls."""
    m = cfg.model
    return {
        "num_views": m.num_views,
        "multiview_attention": m.multiview_attention,
        "sparse_mv_attention": m.sparse_mv_attention,
        "cd_attention_mid": m.cd_attention_mid,
        "cd_attention_last": m.cd_attention_last,
        "attention_backend": m.attention,
    }


def build_components(cfg: RunConfig) -> Components:
    """VAE, CLIP image encoder, DDPM scheduler: from ``model.pretrained`` or tiny from config; frozen."""
    if cfg.model.pretrained:
        components = load_components(cfg.model.pretrained)
    else:
        components = tiny_components(cfg.data.resolution, cfg.model.cross_attention_dim, seed=cfg.run.seed)
    components.noise_scheduler.register_to_config(prediction_type=cfg.train.prediction_type)
    return components.freeze()


def build_unet(cfg: RunConfig) -> MVUNet:
    """The trainable UNet: from model.unet (gnn3d/Wonder3D folder), a 2D pretrained UNet, or tiny config."""
    mv = multiview_options(cfg)
    torch.manual_seed(
        cfg.run.seed
    )  # new layers (cross-domain attention, tiny model) start identical everywhere
    if cfg.model.unet:
        unet = _load_unet_folder(Path(cfg.model.unet), mv)
    elif cfg.model.pretrained:
        unet, _ = load_from_2d_unet(cfg.model.pretrained, zero_init_conv_in=cfg.model.zero_init_conv_in, **mv)
    else:
        m = cfg.model
        config = tiny_unet_config(
            block_out_channels=tuple(m.block_out_channels),
            layers_per_block=m.layers_per_block,
            attention_head_dim=m.attention_head_dim,
            sample_size=cfg.data.resolution // 8,
            down_block_types=("CrossAttnDownBlock2D",) * (len(m.block_out_channels) - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(m.block_out_channels) - 1),
            cross_attention_dim=m.cross_attention_dim,
            **{k: v for k, v in mv.items() if k != "attention_backend"},
            attention_backend=mv["attention_backend"],
        )
        unet = MVUNet.from_config(config)
    if cfg.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


def _load_unet_folder(folder: Path, mv: dict) -> MVUNet:
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    config_path = unet_dir / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"no config.json in {unet_dir}", key="model.unet")
    config = json.loads(config_path.read_text())
    if config.get("_class_name") == MVUNet.__name__:
        unet = MVUNet.from_pretrained(unet_dir)
    else:
        unet, _ = load_wonder3d_unet(unet_dir, attention_backend=mv["attention_backend"])
    loaded = {k: unet.config[k] for k in mv if k != "attention_backend"}
    wanted = {k: v for k, v in mv.items() if k != "attention_backend"}
    if loaded != wanted:
        diff = {k: (loaded[k], wanted[k]) for k in wanted if loaded[k] != wanted[k]}
        raise ConfigError(
            f"UNet at {unet_dir} differs from the run config (loaded, wanted): {diff}", key="model.unet"
        )
    unet.set_attention(mv["attention_backend"])
    return unet
