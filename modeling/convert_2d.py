"""Initialise an MVUNet from a 2D diffusers UNet (the sd-image-variations layout).

What happens (Wonder3D's stage-1 init): every 2D weight is copied; ``conv_in`` is widened from 4 to
``in_channels`` (8) input channels, the extra ones zeroed by default so the condition latent starts with
no effect; the camera class embedding and any cross-domain layers are new (missing from the 2D weights)
and listed in the returned :class:`LoadReport`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from modeling.unet_loading import LoadReport, WeightsError, read_config, read_weights, unet_folder
from modeling.unet_mv import MVUNet

NEW_IN_MV = "class_embedding."  # the camera embedding; cross-domain layers ("_joint_") are new as well


def widen_conv_in(model_weight: Tensor, weight_2d: Tensor, zero_extra: bool) -> Tensor:
    """``conv_in`` weight ``[C, 4, k, k]`` -> the model's ``[C, in_channels, k, k]``.

    The 2D weights fill the first input channels; the extra ones are zeros (``zero_extra``) or keep the
    model's own random init.
    """
    if model_weight.shape[0] != weight_2d.shape[0] or model_weight.shape[2:] != weight_2d.shape[2:]:
        raise WeightsError(
            f"conv_in.weight {tuple(weight_2d.shape)} does not fit {tuple(model_weight.shape)}"
        )
    widened = model_weight.detach().clone()
    if zero_extra:
        widened.zero_()
    widened[:, : weight_2d.shape[1]] = weight_2d
    return widened


def mv_config_from_2d(config_2d: dict[str, Any], **mv_options: Any) -> dict[str, Any]:
    """An MVUNet config from a 2D UNet config: 8 input channels, projection camera embedding + MV keys."""
    config = {k: v for k, v in config_2d.items() if not k.startswith("_")}
    config.update(in_channels=8, class_embed_type="projection", projection_class_embeddings_input_dim=10)
    config.update(mv_options)
    return config


def load_from_2d_unet(
    folder: str | Path,
    zero_init_conv_in: bool = True,
    zero_init_class_embedding: bool = False,
    verbose: bool = True,
    **mv_options: Any,
) -> tuple[MVUNet, LoadReport]:
    """Build an MVUNet from a 2D UNet folder (or a pipeline folder with ``unet/``).

    Args:
        folder: diffusers UNet2DConditionModel folder (config.json + weights) or its pipeline folder.
        zero_init_conv_in: zero the condition-latent input channels of ``conv_in`` (Wonder3D stage 1).
        zero_init_class_embedding: zero the class embedding's last layer (camera embedding starts at 0).
        verbose: print the load report.
        mv_options: MVUNet config keys, e.g. ``num_views=6, cd_attention_mid=True``.

    Returns:
        ``(unet, report)``; the report lists the new (missing) and ignored (unexpected) keys.
    """
    folder = unet_folder(folder)
    model = MVUNet.from_config(mv_config_from_2d(read_config(folder), **mv_options))
    weights = read_weights(folder)
    report = LoadReport(source=str(folder))
    own = model.state_dict()
    weight_2d = weights.get("conv_in.weight")
    if weight_2d is not None and weight_2d.shape != own["conv_in.weight"].shape:
        weights["conv_in.weight"] = widen_conv_in(own["conv_in.weight"], weight_2d, zero_init_conv_in)
        init = "zero" if zero_init_conv_in else "random"
        report.notes.append(
            f"conv_in widened {weight_2d.shape[1]}->{own['conv_in.weight'].shape[1]} input channels ({init} extra)"
        )
    result = model.load_state_dict(weights, strict=False)
    report.missing, report.unexpected = sorted(result.missing_keys), sorted(result.unexpected_keys)
    not_new = [k for k in report.missing if not k.startswith(NEW_IN_MV) and "_joint_" not in k]
    if not_new or report.unexpected:
        raise WeightsError(
            f"{folder} is not a 2D UNet of this config: missing {not_new[:6]}, unexpected {report.unexpected[:6]}"
        )
    if zero_init_class_embedding and model.class_embedding is not None:
        torch.nn.init.zeros_(model.class_embedding.linear_2.weight)
        torch.nn.init.zeros_(model.class_embedding.linear_2.bias)
        report.notes.append("class_embedding.linear_2 zero-initialised")
    if verbose:
        print(report.summary())
    return model, report
