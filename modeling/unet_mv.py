"""MVUNet: the multi-view, cross-domain UNet (Wonder3D's UNetMV2DConditionModel on diffusers 0.42).

A diffusers ``UNet2DConditionModel`` whose transformer blocks are replaced by :class:`MVTransformerBlock`
(multi-view self-attention, optional cross-domain attention), with Wonder3D's extra config keys registered.
Inputs follow the batch layout in ``modeling/layout.py``::

    unet = MVUNet.from_config(tiny_unet_config(num_views=6))
    out = unet(sample, timestep, encoder_hidden_states, class_labels).sample
    # sample [N, 8, h, w] = concat(noisy latent, condition latent); timestep [N];
    # encoder_hidden_states [N, 1, C] (CLIP image embedding); class_labels [N, 10] (camera + domain)
    # N = 2·B·V with cross-domain attention on, B·V otherwise; out [N, 4, h, w]

Loading: ``modeling.convert_2d.load_from_2d_unet`` (a 2D UNet, e.g. sd-image-variations);
``MVUNet.from_pretrained`` (our folders and Wonder3D checkpoints, with config overrides, e.g. stage 2 adding
``cd_attention_mid``), strict, through the one loader in ``modeling/unet_loading.py``.
Attention modes: dense multi-view (default), ``sparse_mv_attention`` (first view + own view),
``rowwise_mv_attention`` (Era3D-style rows across views); backends in ``modeling/attention.py``.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel, UNet2DConditionOutput
from torch import Tensor

from modeling.attention import check_backend
from modeling.blocks import MultiViewOptions, MVTransformerBlock
from modeling.layout import check_batch_size
from modeling.unet_loading import load_unet_folder
from modeling.wonder3d_keys import normalize_config

# Our own keys, with defaults; the rest of the config is UNet2DConditionModel's.
MV_CONFIG_DEFAULTS: dict[str, Any] = {
    "num_views": 6,
    "multiview_attention": True,
    "sparse_mv_attention": False,
    "rowwise_mv_attention": False,  # Era3D-style row-wise multi-view attention (our extension)
    "mvcd_attention": False,  # accepted for Wonder3D configs; unused there and here
    "cd_attention_mid": False,
    "cd_attention_last": False,
    "attention_backend": "auto",
}
# Wonder3D's values where they differ from UNet2DConditionModel's defaults.
WONDER3D_DEFAULTS: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 8,
    "out_channels": 4,
    "cross_attention_dim": 768,
    "class_embed_type": "projection",
    "projection_class_embeddings_input_dim": 10,
}


def _init_signature() -> inspect.Signature:
    """UNet2DConditionModel's keyword parameters with Wonder3D defaults, plus our MV keys.

    diffusers' ConfigMixin reads the accepted config keys from ``__init__``'s signature, so MVUNet's
    ``__init__`` advertises all of them while forwarding the 2D ones to the parent.
    """
    base = inspect.signature(UNet2DConditionModel.__init__)
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for name, p in base.parameters.items():
        if name != "self":
            params.append(
                p.replace(kind=inspect.Parameter.KEYWORD_ONLY, default=WONDER3D_DEFAULTS.get(name, p.default))
            )
    params += [
        inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in MV_CONFIG_DEFAULTS.items()
    ]
    return inspect.Signature(params)


class MVUNet(UNet2DConditionModel):
    """Multi-view cross-domain UNet; ``ModelMixin``/``ConfigMixin`` (``save_pretrained``/``from_pretrained``)."""

    def __init__(self, **kwargs: Any) -> None:  # signature replaced below; see _init_signature
        mv = {k: kwargs.pop(k, v) for k, v in MV_CONFIG_DEFAULTS.items()}
        kwargs = normalize_config({**WONDER3D_DEFAULTS, **kwargs})
        super().__init__(**kwargs)
        check_backend(mv["attention_backend"])
        self.register_to_config(**mv)  # the parent registered its own keys (with mapped block names)
        options = MultiViewOptions(
            num_views=mv["num_views"],
            multiview_attention=mv["multiview_attention"],
            sparse_mv_attention=mv["sparse_mv_attention"],
            rowwise_mv_attention=mv["rowwise_mv_attention"],
            cd_attention_mid=mv["cd_attention_mid"],
            cd_attention_last=mv["cd_attention_last"],
        )
        self._num_views = options.num_views
        self._cross_domain = options.cd_attention_mid or options.cd_attention_last
        self._rowwise = options.rowwise_mv_attention
        self._swap_transformer_blocks(options, mv["attention_backend"])

    def _swap_transformer_blocks(self, options: MultiViewOptions, backend: str) -> None:
        """Replace every diffusers BasicTransformerBlock by an MVTransformerBlock adopting its weights."""
        for module in list(self.modules()):
            blocks = getattr(module, "transformer_blocks", None)
            if blocks is None:
                continue
            for i, block in enumerate(blocks):
                if isinstance(block, BasicTransformerBlock):
                    blocks[i] = MVTransformerBlock(block, options, backend)

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """diffusers' ``from_config`` after mapping Wonder3D / legacy keys (see :func:`normalize_config`)."""
        return super().from_config(normalize_config(dict(config or {})), return_unused_kwargs, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        **config_overrides: Any,
    ) -> MVUNet:
        """Load a UNet folder (ours, Wonder3D's with legacy names, a pipeline folder's ``unet/``, or a hub id)
        through the one strict loader, :func:`modeling.unet_loading.load_unet_folder`; in eval mode.

        Replaces diffusers' ``from_pretrained``, which would leave unmatched (e.g. legacy-named) layers
        uninitialised. ``config_overrides`` change config keys, e.g. ``attention_backend="sdpa"``; any missing
        or unexpected weight raises ``WeightsError``, except cross-domain layers the overrides switch on.
        """
        model, _ = load_unet_folder(cls, pretrained_model_name_or_path, config_overrides, subfolder=subfolder)
        return model.to(dtype=torch_dtype).eval() if torch_dtype is not None else model.eval()

    def set_attention(self, backend: str) -> None:
        """Switch every attention layer to ``backend`` (``auto|xformers|sdpa|math``); raises if unavailable."""
        check_backend(backend)
        for module in self.modules():
            if isinstance(module, MVTransformerBlock):
                module.set_backend(backend)
        self.register_to_config(attention_backend=backend)

    def set_default_attn_processor(self) -> None:
        """Reset processors to the math reference (diffusers' plain processors would drop multi-view)."""
        self.set_attention("math")

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        encoder_hidden_states: Tensor,
        class_labels: Tensor | None = None,
        **kwargs: Any,
    ) -> UNet2DConditionOutput | tuple:
        """Denoise ``sample [N, in_channels, h, w]``; N must follow the batch layout (checked here).

        ``timestep [N]``, ``encoder_hidden_states [N, 1, cross_attention_dim]``,
        ``class_labels [N, projection_class_embeddings_input_dim]`` -> ``.sample [N, out_channels, h, w]``.
        """
        check_batch_size(sample.shape[0], self._num_views, self._cross_domain)
        if self._rowwise:  # row-wise attention finds each level's (h, w) grid from the input's
            attn_kwargs = kwargs.get("cross_attention_kwargs") or {}
            kwargs["cross_attention_kwargs"] = {**attn_kwargs, "latent_size": tuple(sample.shape[-2:])}
        return super().forward(sample, timestep, encoder_hidden_states, class_labels=class_labels, **kwargs)


MVUNet.__init__.__signature__ = _init_signature()  # type: ignore[attr-defined]
MVUNet.__init__ = register_to_config(MVUNet.__init__)  # type: ignore[method-assign]


def tiny_unet_config(
    num_views: int = 6,
    cross_attention_dim: int = 32,
    cd_attention_mid: bool = True,
    cd_attention_last: bool = False,
    sparse_mv_attention: bool = False,
    rowwise_mv_attention: bool = False,
    attention_backend: str = "auto",
    **overrides: Any,
) -> dict[str, Any]:
    """A tiny MVUNet config for tests and smoke runs (two levels, widths 32/64, one layer per block).

    ``sample_size`` 8 = 64² images with an 8x VAE. ``overrides`` replace any other key.
    """
    config: dict[str, Any] = {
        "sample_size": 8,
        "in_channels": 8,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "norm_num_groups": 8,
        "attention_head_dim": 4,
        "cross_attention_dim": cross_attention_dim,
        "class_embed_type": "projection",
        "projection_class_embeddings_input_dim": 10,
        "num_views": num_views,
        "multiview_attention": True,
        "sparse_mv_attention": sparse_mv_attention,
        "rowwise_mv_attention": rowwise_mv_attention,
        "cd_attention_mid": cd_attention_mid,
        "cd_attention_last": cd_attention_last,
        "attention_backend": attention_backend,
    }
    config.update(overrides)
    return config


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
