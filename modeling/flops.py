"""Analytic FLOPs of the MVUNet (for MFU): matmul/conv FLOPs counted as 2·MACs, like FlopCounterMode.

Only convolutions, linear layers and attention products are counted (norms, activations, softmax and
resampling are a few percent at most and FlopCounterMode ignores them too). Backward costs twice the forward
(input and weight gradients), except where the input needs no gradient (``conv_in`` and the first layers of
the time / camera embeddings), which only pay the weight gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modeling.unet_mv import MV_CONFIG_DEFAULTS, WONDER3D_DEFAULTS, normalize_config


@dataclass
class _Counter:
    """Per-image forward FLOPs, split by whether the layer's input needs a gradient in backward."""

    forward: float = 0.0
    no_input_grad: float = 0.0  # forward FLOPs of layers whose input gradient is never computed


def _attention_core(queries: int, keys: int, dim: int) -> float:
    """q·kᵀ and weights·v for ``queries`` tokens over ``keys`` tokens, ``dim`` total channels (all heads)."""
    return 2 * 2 * queries * keys * dim


def _conv(c_in: int, c_out: int, k: int, pixels: int) -> float:
    return 2 * c_in * c_out * k * k * pixels


def _resnet(c_in: int, c_out: int, temb: int, pixels: int) -> float:
    flops = _conv(c_in, c_out, 3, pixels) + _conv(c_out, c_out, 3, pixels) + 2 * temb * c_out
    return flops + (_conv(c_in, c_out, 1, pixels) if c_in != c_out else 0)


def _transformer(c: int, tokens: int, cfg: dict[str, Any]) -> float:
    """One Transformer2DModel (proj_in/out + its MV transformer blocks) for one image with ``tokens`` pixels."""
    ctx, ctx_tokens = cfg["cross_attention_dim"], cfg.get("context_tokens", 1)
    if not cfg["multiview_attention"]:
        self_keys = tokens
    elif cfg["sparse_mv_attention"]:
        self_keys = 2 * tokens
    elif cfg["rowwise_mv_attention"]:
        self_keys = cfg["num_views"] * round(tokens**0.5)  # one image row of every view
    else:
        self_keys = cfg["num_views"] * tokens
    block = 4 * 2 * c * c * tokens + _attention_core(tokens, self_keys, c)  # attn1: q, k, v, out
    block += (
        2 * 2 * c * c * tokens + 2 * 2 * ctx * c * ctx_tokens + _attention_core(tokens, ctx_tokens, c)
    )  # attn2
    block += 2 * c * 8 * c * tokens + 2 * 4 * c * c * tokens  # GEGLU feed-forward
    joint = 4 * 2 * c * c * tokens + _attention_core(tokens, 2 * tokens, c)
    block += joint * (int(cfg["cd_attention_mid"]) + int(cfg["cd_attention_last"]))
    layers = cfg.get("transformer_layers_per_block", 1)
    layers = layers if isinstance(layers, int) else layers[0]  # per-level lists: not used by our configs
    linear_proj = 2 * 2 * c * c * tokens  # proj_in and proj_out (1x1 convs or linears: same FLOPs)
    return linear_proj + layers * block


def _down_up_flops(cfg: dict[str, Any], side: int, temb: int) -> float:
    widths, layers = list(cfg["block_out_channels"]), cfg["layers_per_block"]
    flops, px = 0.0, side * side
    for i, kind in enumerate(cfg["down_block_types"]):
        for j in range(layers):
            flops += _resnet(widths[max(i - 1, 0)] if j == 0 else widths[i], widths[i], temb, px)
            flops += _transformer(widths[i], px, cfg) if "CrossAttn" in kind else 0
        if i < len(widths) - 1:
            px //= 4
            flops += _conv(widths[i], widths[i], 3, px)  # stride-2 downsampler, output resolution
    flops += 2 * _resnet(widths[-1], widths[-1], temb, px) + _transformer(widths[-1], px, cfg)  # mid block
    rev = widths[::-1]
    for i, kind in enumerate(cfg["up_block_types"]):
        prev, out, skip_in = rev[max(i - 1, 0)], rev[i], rev[min(i + 1, len(rev) - 1)]
        for j in range(layers + 1):
            skip = skip_in if j == layers else out
            flops += _resnet((prev if j == 0 else out) + skip, out, temb, px)
            flops += _transformer(out, px, cfg) if "CrossAttn" in kind else 0
        if i < len(rev) - 1:
            px *= 4
            flops += _conv(out, out, 3, px)  # upsampler conv after nearest 2x
    return flops


def _per_image(config: dict[str, Any], latent_hw: int) -> _Counter:
    cfg = {**MV_CONFIG_DEFAULTS, **WONDER3D_DEFAULTS, **normalize_config(config)}
    c0 = cfg["block_out_channels"][0]
    temb = 4 * c0
    px = latent_hw * latent_hw
    counter = _Counter()
    counter.no_input_grad = _conv(cfg["in_channels"], c0, 3, px) + 2 * c0 * temb  # conv_in, time linear_1
    counter.forward = counter.no_input_grad + 2 * temb * temb  # time linear_2
    if cfg.get("class_embed_type") == "projection":
        first = 2 * cfg["projection_class_embeddings_input_dim"] * temb
        counter.no_input_grad += first
        counter.forward += first + 2 * temb * temb
    counter.forward += _down_up_flops(cfg, latent_hw, temb)
    counter.forward += _conv(c0, cfg["out_channels"], 3, px)  # conv_out
    return counter


def unet_forward_flops(config: dict[str, Any], num_images: int, latent_hw: int) -> float:
    """FLOPs of one forward pass over ``num_images`` latents of ``latent_hw``² pixels (config = UNet config)."""
    return num_images * _per_image(config, latent_hw).forward


def unet_train_flops(config: dict[str, Any], num_images: int, latent_hw: int) -> float:
    """FLOPs of one forward + backward pass over ``num_images`` latents of ``latent_hw``² pixels.

    Args:
        config: MVUNet (or Wonder3D) UNet config dict, e.g. ``dict(unet.config)``.
        num_images: images in the UNet batch (``2·B·V`` with cross-domain attention on).
        latent_hw: latent side (32 for 256² images).

    Returns:
        FLOPs (multiply-add = 2) — divide by step time and peak FLOP/s for MFU.
    """
    c = _per_image(config, latent_hw)
    return num_images * (3 * c.forward - c.no_input_grad)
