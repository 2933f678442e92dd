"""A tiny Wonder3D UNet checkpoint as released (its config format, legacy weight names, ``.bin``), for tests.

The key shapes are derived from Wonder3D's module structure, written independently of MVUNet, so a loader
bug cannot hide in the fixture. ``reference_unet`` is what a correct load must equal: MVUNet built from the
mapped config with the renamed weights loaded strictly, by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from modeling.components import Components, save_components
from modeling.unet_mv import MVUNet
from modeling.wonder3d_keys import normalize_config, rename_legacy_key

WIDTHS, CTX, HEADS = (32, 64), 32, 4
TINY_2D = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": list(WIDTHS),
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "norm_num_groups": 8,
    "attention_head_dim": HEADS,
    "cross_attention_dim": CTX,
}


def wonder3d_reference_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Key -> shape of Wonder3D's UNetMV2DConditionModel, derived from its module structure.

    Written independently of MVUNet: SD-style UNet (conv projections, GEGLU feed-forward, no attention
    biases), projection class embedding, and the legacy stage-2 names ``attn_joint_twice``/``norm_joint_twice``.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    c0, temb, ctx = (
        config["block_out_channels"][0],
        4 * config["block_out_channels"][0],
        config["cross_attention_dim"],
    )

    def linear(name: str, n_in: int, n_out: int, bias: bool = True) -> None:
        shapes[f"{name}.weight"] = (n_out, n_in)
        if bias:
            shapes[f"{name}.bias"] = (n_out,)

    def conv(name: str, n_in: int, n_out: int, k: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (n_out, n_in, k, k), (n_out,)

    def norm(name: str, c: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resnet(name: str, n_in: int, n_out: int) -> None:
        (
            norm(f"{name}.norm1", n_in),
            conv(f"{name}.conv1", n_in, n_out, 3),
            linear(f"{name}.time_emb_proj", temb, n_out),
        )
        norm(f"{name}.norm2", n_out), conv(f"{name}.conv2", n_out, n_out, 3)
        if n_in != n_out:
            conv(f"{name}.conv_shortcut", n_in, n_out, 1)

    def attention(name: str, c: int, kv_dim: int) -> None:
        linear(f"{name}.to_q", c, c, False), linear(f"{name}.to_k", kv_dim, c, False)
        linear(f"{name}.to_v", kv_dim, c, False), linear(f"{name}.to_out.0", c, c)

    def transformer(name: str, c: int) -> None:
        norm(f"{name}.norm", c), conv(f"{name}.proj_in", c, c, 1), conv(f"{name}.proj_out", c, c, 1)
        b = f"{name}.transformer_blocks.0"
        (
            norm(f"{b}.norm1", c),
            attention(f"{b}.attn1", c, c),
            norm(f"{b}.norm2", c),
            attention(f"{b}.attn2", c, ctx),
        )
        norm(f"{b}.norm3", c), linear(f"{b}.ff.net.0.proj", c, 8 * c), linear(f"{b}.ff.net.2", 4 * c, c)
        if config.get("joint_attention_twice"):
            attention(f"{b}.attn_joint_twice", c, c), norm(f"{b}.norm_joint_twice", c)

    conv("conv_in", config["in_channels"], c0, 3)
    linear("time_embedding.linear_1", c0, temb), linear("time_embedding.linear_2", temb, temb)
    linear("class_embedding.linear_1", 10, temb), linear("class_embedding.linear_2", temb, temb)
    widths, layers = config["block_out_channels"], config["layers_per_block"]
    for i, kind in enumerate(config["down_block_types"]):
        n_in = widths[max(i - 1, 0)]
        for j in range(layers):
            resnet(f"down_blocks.{i}.resnets.{j}", n_in if j == 0 else widths[i], widths[i])
            if kind.startswith("CrossAttn"):
                transformer(f"down_blocks.{i}.attentions.{j}", widths[i])
        if i < len(widths) - 1:
            conv(f"down_blocks.{i}.downsamplers.0.conv", widths[i], widths[i], 3)
    resnet("mid_block.resnets.0", widths[-1], widths[-1]), transformer("mid_block.attentions.0", widths[-1])
    resnet("mid_block.resnets.1", widths[-1], widths[-1])
    rev = list(reversed(widths))
    for i, kind in enumerate(config["up_block_types"]):
        prev, out, skip_in = rev[max(i - 1, 0)], rev[i], rev[min(i + 1, len(rev) - 1)]
        for j in range(layers + 1):
            skip = skip_in if j == layers else out
            resnet(f"up_blocks.{i}.resnets.{j}", (prev if j == 0 else out) + skip, out)
            if kind.startswith("CrossAttn"):
                transformer(f"up_blocks.{i}.attentions.{j}", out)
        if i < len(rev) - 1:
            conv(f"up_blocks.{i}.upsamplers.0.conv", out, out, 3)
    norm("conv_norm_out", c0), conv("conv_out", c0, config["out_channels"], 3)
    return shapes


def wonder3d_config() -> dict:
    """A tiny config.json in Wonder3D's released format (legacy key, MV block names, diffusers 0.19 keys)."""
    return {
        "_class_name": "UNetMV2DConditionModel",
        "_diffusers_version": "0.19.3",
        **{k: v for k, v in TINY_2D.items() if k not in ("down_block_types", "up_block_types")},
        "in_channels": 8,
        "down_block_types": ["CrossAttnDownBlockMV2D", "DownBlock2D"],
        "mid_block_type": "UNetMidBlockMV2DCrossAttn",
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlockMV2D"],
        "class_embed_type": "projection",
        "projection_class_embeddings_input_dim": 10,
        "num_views": 2,
        "joint_attention": False,
        "joint_attention_twice": True,
        "multiview_attention": True,
        "sparse_mv_attention": False,
        "mvcd_attention": False,
        "resnet_out_scale_factor": 1.0,
        "addition_embed_type_num_heads": 64,
        "class_embeddings_concat": False,
        "mid_block_only_cross_attention": None,
        "cross_attention_norm": None,
        "time_embedding_type": "positional",
    }


def write_wonder3d_unet(folder: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write ``config.json`` + ``diffusion_pytorch_model.bin`` (legacy names) into ``folder``; return the weights."""
    config = wonder3d_config()
    g = torch.Generator().manual_seed(seed)
    weights = {k: torch.randn(s, generator=g) * 0.05 for k, s in wonder3d_reference_shapes(config).items()}
    assert any(".attn_joint_twice." in k for k in weights)  # the legacy names are really there
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(weights, folder / "diffusion_pytorch_model.bin")  # the released checkpoint format
    return weights


def reference_unet(weights: dict[str, torch.Tensor], **overrides: object) -> MVUNet:
    """The Wonder3D checkpoint loaded by hand: mapped config, renamed keys, ``strict=True``; in eval mode."""
    unet = MVUNet.from_config({**normalize_config(wonder3d_config()), **overrides})
    unet.load_state_dict({rename_legacy_key(k): v for k, v in weights.items()}, strict=True)
    return unet.eval()


def write_wonder3d_model_folder(folder: Path, components: Components) -> dict[str, torch.Tensor]:
    """A model folder whose ``unet/`` is the Wonder3D checkpoint (the components next to it); its weights."""
    save_components(components, folder)
    return write_wonder3d_unet(folder / "unet")
