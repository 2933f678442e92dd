"""Build the frozen components and the trainable UNet that a run config describes."""

from pathlib import Path

import torch

from engine.config import ConfigError, RunConfig
from engine.recompute import checkpoint_keeping_attention
from engine.sources import is_run_dir, resolve_pretrained, run_weights
from modeling.components import Components, load_components, tiny_components
from modeling.convert_2d import load_from_2d_unet
from modeling.unet_loading import LoadReport, WeightsError, load_unet_folder, load_unet_weights
from modeling.unet_mv import MVUNet, tiny_unet_config


def multiview_options(cfg: RunConfig) -> dict:
    """The MVUNet config keys that the run config controls."""
    m = cfg.model
    return {
        "num_views": m.num_views,
        "multiview_attention": m.multiview_attention,
        "sparse_mv_attention": m.sparse_mv_attention,
        "rowwise_mv_attention": m.rowwise_mv_attention,
        "cd_attention_mid": m.cd_attention_mid,
        "cd_attention_last": m.cd_attention_last,
        "attention_backend": m.attention,
    }


def build_components(cfg: RunConfig, saved: Path | None = None) -> Components:
    """VAE, CLIP image encoder, DDPM scheduler: from a run's ``saved`` components folder (export), else
    ``model.pretrained`` (folder or hub id), else tiny from config; frozen.

    The scheduler always predicts ``train.prediction_type``: a pretrained folder's own setting is overridden,
    and export rebuilds the components here so the exported scheduler is the one the run trained with.
    """
    if saved is not None and saved.is_dir():
        components = load_components(saved)
    elif cfg.model.pretrained:
        components = load_components(resolve_pretrained(cfg.model.pretrained))
    else:
        components = tiny_components(cfg.data.resolution, cfg.model.cross_attention_dim, seed=cfg.run.seed)
    components.noise_scheduler.register_to_config(prediction_type=cfg.train.prediction_type)
    return components.freeze()


# train.precision -> the dtype the frozen encoders run in during training
TRAINING_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def in_training_precision(components: Components, cfg: RunConfig) -> Components:
    """The frozen VAE and CLIP image encoder cast in place to ``train.precision`` (fp32 stays fp32): they only
    run forward, and in fp32 they cost more than the UNet in small runs. Cast after the run saved its
    components and hashed them (export and the latents' encoder identity read fp32 weights). Measured on this
    2-core CPU (avx512_bf16), tiny VAE encode + CLIP: bf16 0.30 s vs fp32 0.60 s for 12 images of 256²."""
    dtype = TRAINING_DTYPES[cfg.train.precision]
    for model in (components.vae, components.image_encoder):
        # nn.Module.to: diffusers' own .to(dtype) warns about fp32-only modules, which these models lack
        torch.nn.Module.to(model, dtype=dtype)
    return components


def build_unet(cfg: RunConfig) -> MVUNet:
    """The trainable UNet: from model.unet (gnn3d/Wonder3D folder), a 2D pretrained UNet, or tiny config."""
    mv = multiview_options(cfg)
    torch.manual_seed(
        cfg.run.seed
    )  # new layers (cross-domain attention, tiny model) start identical everywhere
    if cfg.model.unet:
        unet = _load_unet_folder(cfg.model.unet, mv)
    elif cfg.model.pretrained:
        pretrained = resolve_pretrained(cfg.model.pretrained)
        try:
            unet, _ = load_from_2d_unet(pretrained, zero_init_conv_in=cfg.model.zero_init_conv_in, **mv)
        except WeightsError as error:
            raise ConfigError(str(error), key="model.pretrained") from None
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
        unet.enable_gradient_checkpointing(checkpoint_keeping_attention)
    return unet


def read_unet_source(source: str, mv: dict) -> tuple[MVUNet, LoadReport]:
    """``model.unet`` through the one strict loader, with the run's multi-view options as overrides: a run
    directory (newest checkpoint, EMA weights when kept), a gnn3d export / its unet/, a Wonder3D UNet folder
    (legacy key names mapped), or a hub id."""
    if is_run_dir(Path(source)):
        saved_cfg, weights, tag = run_weights(source)
        config = dict(build_unet(saved_cfg).config)
        return load_unet_weights(MVUNet, config, weights, f"run {source} ({tag})", mv)
    return load_unet_folder(MVUNet, resolve_pretrained(source, key="model.unet"), mv)


def _load_unet_folder(source: str, mv: dict) -> MVUNet:
    """Start from an existing UNet with the run's multi-view options; new cross-domain layers may be added
    (Wonder3D stage 2 adds cd_attention_mid to the stage-1 UNet). Anything else missing is an error."""
    try:
        unet, report = read_unet_source(source, mv)
    except WeightsError as error:
        hint = "check model.cd_attention_mid / cd_attention_last / num_views"
        raise ConfigError(f"{error} ({hint})", key="model.unet") from None
    print(f"loaded UNet from {report.source}", flush=True)
    if report.missing:
        params = dict(unet.named_parameters())
        added = sum(params[k].numel() for k in report.missing if k in params)
        print(f"  added {len(report.missing)} new cross-domain tensors ({added:,} parameters, output "
              "projections zero-initialised so the loaded model's outputs are unchanged at step 0)", flush=True)  # fmt: skip
    return unet
