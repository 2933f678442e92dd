"""Build the frozen components and the trainable UNet that a run config describes."""

from pathlib import Path

import torch

from engine.config import ConfigError, RunConfig
from modeling.components import Components, load_components, tiny_components
from modeling.convert_2d import load_from_2d_unet, read_config, read_weights, unet_folder
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


CROSS_DOMAIN_LAYERS = ("attn_joint_mid", "norm_joint_mid", "attn_joint_last", "norm_joint_last")


def read_unet_source(path: Path) -> tuple[dict, dict[str, torch.Tensor], str]:
    """(UNet config, weights, description) from a run directory (newest checkpoint, EMA weights when kept),
    an exported gnn3d folder / its unet/, or a Wonder3D UNet folder (legacy key names mapped)."""
    if (path / "checkpoints" / "latest").is_file():
        from engine.export import run_weights

        saved_cfg, weights, tag = run_weights(path)
        return dict(build_unet(saved_cfg).config), weights, f"run {path} ({tag})"
    folder = unet_folder(path)
    config = read_config(folder)
    if config.get("_class_name") == MVUNet.__name__:
        return config, read_weights(folder), f"gnn3d UNet {folder}"
    unet, _ = load_wonder3d_unet(folder, verbose=False)
    return dict(unet.config), unet.state_dict(), f"Wonder3D UNet {folder}"


def _load_unet_folder(path: Path, mv: dict) -> MVUNet:
    """Start from an existing UNet with the run's multi-view options; new cross-domain layers may be added
    (Wonder3D stage 2 adds cd_attention_mid to the stage-1 UNet). Anything else missing is an error."""
    if not path.exists():
        raise ConfigError(f"{path} does not exist", key="model.unet")
    config, weights, source = read_unet_source(path)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    unet = MVUNet.from_config({**config, **mv})
    result = unet.load_state_dict(weights, strict=False)
    not_new = [k for k in result.missing_keys if not any(layer in k for layer in CROSS_DOMAIN_LAYERS)]
    if result.unexpected_keys or not_new:
        raise ConfigError(
            f"{source} does not fit the configured UNet: missing {not_new[:6]}, unexpected "
            f"{result.unexpected_keys[:6]} (check model.cd_attention_mid / cd_attention_last / num_views)",
            key="model.unet",
        )
    added = sum(
        unet.get_parameter(k).numel() for k in result.missing_keys if k in dict(unet.named_parameters())
    )
    print(f"loaded UNet from {source}", flush=True)
    if result.missing_keys:
        print(f"  added {len(result.missing_keys)} new cross-domain tensors ({added:,} parameters, output "
              "projections zero-initialised so the loaded model's outputs are unchanged at step 0)", flush=True)  # fmt: skip
    return unet
