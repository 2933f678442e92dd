"""The multi-view, cross-domain transformer block (Wonder3D's block order on diffusers' parts).

Order: norm1 → attn1 (multi-view self-attention) + residual → [norm_joint_mid → attn_joint_mid + residual]
→ norm2 → attn2 (cross-attention on the CLIP image embedding) + residual → norm3 → ff + residual →
[norm_joint_last → attn_joint_last + residual].  Attribute names match Wonder3D's state-dict keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from modeling.attention import AttnProcessor, CrossDomainAttnProcessor, MultiViewAttnProcessor


@dataclass(frozen=True)
class MultiViewOptions:
    """The per-block switches (mirroring the UNet config keys of the same names)."""

    num_views: int = 1
    multiview_attention: bool = True
    sparse_mv_attention: bool = False
    rowwise_mv_attention: bool = False
    cd_attention_mid: bool = False
    cd_attention_last: bool = False

    def __post_init__(self) -> None:
        if self.rowwise_mv_attention and self.sparse_mv_attention:
            raise ValueError("rowwise_mv_attention and sparse_mv_attention cannot both be set; choose one")
        if self.rowwise_mv_attention and not self.multiview_attention:
            raise ValueError("rowwise_mv_attention needs multiview_attention=True")


def zero_init_output(attn: Attention) -> None:
    """Zero the output projection (weight and bias) so a new attention layer adds nothing at step 0."""
    nn.init.zeros_(attn.to_out[0].weight)
    if attn.to_out[0].bias is not None:
        nn.init.zeros_(attn.to_out[0].bias)


def _new_self_attention_like(attn1: Attention) -> Attention:
    """A fresh self-attention layer with ``attn1``'s shape (used for the cross-domain layers)."""
    return Attention(
        query_dim=attn1.query_dim,
        heads=attn1.heads,
        dim_head=attn1.inner_dim // attn1.heads,
        dropout=attn1.dropout,
        bias=attn1.to_q.bias is not None,
        upcast_attention=attn1.upcast_attention,
        out_bias=attn1.to_out[0].bias is not None,
    )


class MVTransformerBlock(nn.Module):
    """A diffusers ``BasicTransformerBlock`` (layer-norm variant) with multi-view + cross-domain attention.

    Built from an existing block, adopting its submodules (so its weights and key names are kept) and adding
    the zero-initialised cross-domain layers that the options ask for.
    """

    def __init__(
        self, block: BasicTransformerBlock, options: MultiViewOptions, backend: str = "auto"
    ) -> None:
        super().__init__()
        if block.norm_type != "layer_norm" or block.attn2 is None or block.only_cross_attention:
            raise ValueError(
                f"MVTransformerBlock supports layer-norm blocks with self- and cross-attention only, got "
                f"norm_type={block.norm_type!r}, attn2={block.attn2 is not None}, "
                f"only_cross_attention={block.only_cross_attention}"
            )
        self.options = options
        self.norm1, self.attn1 = block.norm1, block.attn1
        self.norm2, self.attn2 = block.norm2, block.attn2
        self.norm3, self.ff = block.norm3, block.ff
        dim = block.norm1.normalized_shape[0]
        if options.cd_attention_mid:
            self.attn_joint_mid = _new_self_attention_like(block.attn1)
            self.norm_joint_mid = nn.LayerNorm(dim)
            zero_init_output(self.attn_joint_mid)
        if options.cd_attention_last:
            self.attn_joint_last = _new_self_attention_like(block.attn1)
            self.norm_joint_last = nn.LayerNorm(dim)
            zero_init_output(self.attn_joint_last)
        self._chunk_size: int | None = None
        self._chunk_dim = 0
        self.set_backend(backend)

    def set_backend(self, backend: str) -> None:
        """Install processors for ``backend`` (``auto|xformers|sdpa|math``) on every attention layer."""
        opts = self.options
        if opts.multiview_attention:
            self_proc: AttnProcessor = MultiViewAttnProcessor(
                opts.num_views, opts.sparse_mv_attention, backend, rowwise=opts.rowwise_mv_attention
            )
        else:
            self_proc = AttnProcessor(backend)
        self.attn1.set_processor(self_proc)
        self.attn2.set_processor(AttnProcessor(backend))
        for name in ("attn_joint_mid", "attn_joint_last"):
            if hasattr(self, name):
                getattr(self, name).set_processor(CrossDomainAttnProcessor(backend))

    def set_chunk_feed_forward(self, chunk_size: int | None, dim: int = 0) -> None:
        """Run the feed-forward in chunks of ``chunk_size`` along ``dim`` (diffusers' forward chunking)."""
        self._chunk_size, self._chunk_dim = chunk_size, dim

    def _feed_forward(self, x: Tensor) -> Tensor:
        if self._chunk_size is None:
            return self.ff(x)
        return chunked_apply(self.ff, x, self._chunk_size, self._chunk_dim)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        timestep: Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        """``hidden_states (N, n, C)`` in the batch layout, ``encoder_hidden_states (N, m, C_ctx)`` -> ``(N, n, C)``.

        The signature is diffusers' (positional order matters: Transformer2DModel's gradient checkpointing
        passes the arguments positionally); ``timestep``/``class_labels`` are unused by layer-norm blocks.
        ``cross_attention_kwargs["latent_size"]`` (set by MVUNet) tells row-wise attention the grid.
        """
        x = hidden_states
        # only the row-wise processor takes latent_size (diffusers warns about kwargs a processor lacks)
        grid: dict[str, Any] = {}
        if self.options.rowwise_mv_attention:
            grid["latent_size"] = (cross_attention_kwargs or {}).get("latent_size")
        x = self.attn1(self.norm1(x), attention_mask=attention_mask, **grid) + x
        if self.options.cd_attention_mid:
            x = self.attn_joint_mid(self.norm_joint_mid(x)) + x
        x = self.attn2(self.norm2(x), encoder_hidden_states, attention_mask=encoder_attention_mask) + x
        x = self._feed_forward(self.norm3(x)) + x
        if self.options.cd_attention_last:
            x = self.attn_joint_last(self.norm_joint_last(x)) + x
        return x


def chunked_apply(fn: nn.Module, x: Tensor, chunk_size: int, dim: int) -> Tensor:
    """Apply ``fn`` to chunks of ``x`` along ``dim`` and concatenate (bounded activation memory)."""
    if x.shape[dim] % chunk_size != 0:
        raise ValueError(
            f"feed-forward chunk size {chunk_size} does not divide dimension {dim} of size {x.shape[dim]}"
        )
    return torch.cat([fn(part) for part in x.split(chunk_size, dim=dim)], dim=dim)
