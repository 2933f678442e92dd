"""Attention backends behind one interface, and the multi-view / cross-domain attention processors.

Backends (``attention_backend`` in the UNet config, or ``MVUNet.set_attention``):

* ``"math"``: plain ``softmax(q kᵀ · scale) v`` computed in fp32 (the reference; materialises scores),
* ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels),
* ``"xformers"``: ``xformers.ops.memory_efficient_attention`` (CUDA tensors only),
* ``"auto"``: xformers for CUDA tensors when it is installed, else SDPA.

Asking explicitly for a backend that is not available raises :class:`AttentionBackendError`; there is
no silent fallback.

Token groupings (all without materialising V-times-repeated keys/values): queries are regrouped together
with keys/values, so one attention call covers a whole group:

* multi-view: ``(b·V, n, c) -> (b, V·n, c)`` (every view's queries see all V·n tokens of its object);
* sparse multi-view: each view sees the first view's tokens plus its own (``2n`` keys per view);
* row-wise multi-view (Era3D's efficient attention, for large latents): ``(b·V, h·w, c) -> (b·h, V·w, c)``,
  each image row attends to the same row of all V views (for the reference rig's orthographic cameras at
  one elevation, a pixel's epipolar line in every other view is that same row). Scores are ``(V·w)²`` per
  row instead of ``(V·h·w)²`` per object. A level's grid ``(h, w)`` comes from the UNet's input latent size
  (:func:`token_grid`), so non-square latents work;
* cross-domain: row ``i`` of the first batch half and row ``i`` of the second half form one group of
  ``2n`` tokens (layout in ``modeling/layout.py``).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import Tensor

from modeling.layout import NUM_DOMAINS

BACKENDS = ("auto", "xformers", "sdpa", "math")

# Probed once at import (cheap: no import of xformers itself) so the forward path has no import
# machinery in it, which would break torch.compile graphs.
_XFORMERS_INSTALLED = importlib.util.find_spec("xformers") is not None


class AttentionBackendError(RuntimeError):
    """An attention backend name is unknown, or was requested explicitly but cannot run here."""


def xformers_available() -> bool:
    """True when the xformers package is installed (it still needs CUDA tensors to run)."""
    return _XFORMERS_INSTALLED


def check_backend(name: str) -> str:
    """Validate a backend name; raise :class:`AttentionBackendError` if it is unknown or unavailable."""
    if name not in BACKENDS:
        raise AttentionBackendError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    if name == "xformers" and not _XFORMERS_INSTALLED:
        raise AttentionBackendError(
            "attention backend 'xformers' was requested but xformers is not installed; "
            "install it or set attention_backend to 'auto', 'sdpa' or 'math' "
            "(a saved config can be overridden: MVUNet.from_pretrained(folder, attention_backend='sdpa'))"
        )
    return name


def resolve_backend(name: str, device: torch.device) -> str:
    """The concrete backend ("xformers", "sdpa" or "math") used for tensors on ``device``."""
    if name == "auto":
        return "xformers" if _XFORMERS_INSTALLED and device.type == "cuda" else "sdpa"
    if name == "xformers" and device.type != "cuda":
        raise AttentionBackendError(
            f"attention backend 'xformers' needs CUDA tensors, got tensors on {device}; use 'auto' or 'sdpa'"
        )
    return name


def math_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Reference attention on ``(B, H, L, d)`` tensors, computed in fp32; returns ``(B, H, Lq, d)``."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    return torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """PyTorch fused attention on ``(B, H, L, d)`` tensors."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def xformers_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """xformers memory-efficient attention; takes and returns ``(B, H, L, d)`` like the others."""
    import xformers.ops as xops  # optional dependency, only imported when this backend runs

    out = xops.memory_efficient_attention(
        q.transpose(1, 2).contiguous(),
        k.transpose(1, 2).contiguous(),
        v.transpose(1, 2).contiguous(),
        scale=scale,
    )  # xformers wants (B, L, H, d)
    return out.transpose(1, 2)


_KERNELS = {"math": math_attention, "sdpa": sdpa_attention, "xformers": xformers_attention}


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str = "auto") -> Tensor:
    """Scaled dot-product attention on ``(B, H, L, d)`` tensors with the chosen backend."""
    return _KERNELS[resolve_backend(backend, q.device)](q, k, v, scale)


def group_views(x: Tensor, num_views: int) -> Tensor:
    """``(b·V, n, c) -> (b, V·n, c)``: the V views of one object become one token sequence (no copy)."""
    rows, n, c = x.shape
    return x.reshape(rows // num_views, num_views * n, c)


def ungroup_views(x: Tensor, num_views: int) -> Tensor:
    """Inverse of :func:`group_views`: ``(b, V·n, c) -> (b·V, n, c)``."""
    b, vn, c = x.shape
    return x.reshape(b * num_views, vn // num_views, c)


def sparse_view_context(x: Tensor, num_views: int) -> Tensor:
    """Keys/values for sparse multi-view attention: ``(b·V, n, c) -> (b·V, 2n, c)`` = [first view, own view]."""
    rows, n, c = x.shape
    first = x.reshape(rows // num_views, num_views, n, c)[:, :1].expand(-1, num_views, -1, -1)
    return torch.cat([first.reshape(rows, n, c), x], dim=1)


def token_grid(tokens: int, latent_size: tuple[int, int] | None) -> tuple[int, int]:
    """The ``(h, w)`` feature-map grid of a UNet level holding ``tokens`` pixels per image.

    ``latent_size`` is the UNet input's ``(h, w)``; each level halves it, rounding up (diffusers' stride-2,
    padding-1 downsamplers; the up path matches the skip sizes). Without it, only a square grid can be
    inferred. Raises ``ValueError`` when no level of ``latent_size`` (or no square) holds ``tokens`` pixels.
    """
    if latent_size is None:
        side = round(tokens**0.5)
        if side * side != tokens:
            raise ValueError(
                f"row-wise multi-view attention cannot tell the grid of {tokens} tokens (not a square): "
                "call it through MVUNet, which passes the latent size, or pass latent_size=(h, w)"
            )
        return side, side
    h, w = latent_size
    while h * w > tokens and (h, w) != (1, 1):
        h, w = -(-h // 2), -(-w // 2)
    if h * w != tokens:
        raise ValueError(
            f"row-wise multi-view attention: {tokens} tokens per image is no UNet level of a "
            f"{latent_size[0]}x{latent_size[1]} latent"
        )
    return h, w


def group_view_rows(x: Tensor, num_views: int, height: int) -> Tensor:
    """``(b·V, h·w, c) -> (b·h, V·w, c)``: row r of every view of an object becomes one sequence (copy)."""
    rows, n, c = x.shape
    x = x.reshape(rows // num_views, num_views, height, n // height, c).transpose(1, 2)  # (b, h, V, w, c)
    return x.reshape(-1, num_views * (n // height), c)


def ungroup_view_rows(x: Tensor, num_views: int, height: int) -> Tensor:
    """Inverse of :func:`group_view_rows`: ``(b·h, V·w, c) -> (b·V, h·w, c)``."""
    bh, vw, c = x.shape
    width = vw // num_views
    x = x.reshape(bh // height, height, num_views, width, c).transpose(1, 2)  # (b, V, h, w, c)
    return x.reshape(-1, height * width, c)


def group_domains(x: Tensor) -> Tensor:
    """``(2·M, n, c) -> (M, 2n, c)``: row i of each domain half joined into one sequence."""
    rows, n, c = x.shape
    return (
        x.reshape(NUM_DOMAINS, rows // NUM_DOMAINS, n, c).transpose(0, 1).reshape(rows // NUM_DOMAINS, -1, c)
    )


def ungroup_domains(x: Tensor) -> Tensor:
    """Inverse of :func:`group_domains`: ``(M, 2n, c) -> (2·M, n, c)``."""
    m, two_n, c = x.shape
    return x.reshape(m, NUM_DOMAINS, two_n // NUM_DOMAINS, c).transpose(0, 1).reshape(NUM_DOMAINS * m, -1, c)


class AttnProcessor:
    """Plain attention (self- or cross-) through the chosen backend; base of the grouped processors."""

    def __init__(self, backend: str = "auto") -> None:
        self.backend = check_backend(backend)

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        latent_size: tuple[int, int] | None = None,
    ) -> Tensor:
        """``hidden_states (N, n, C)`` -> ``(N, n, C)``; masks are not supported (the model never uses them).

        ``latent_size``: the UNet input latent's ``(h, w)``, from which row-wise grouping finds this level's
        grid (MVUNet passes it); the other groupings ignore it.
        """
        if attention_mask is not None:
            raise ValueError(f"{type(self).__name__} does not support attention masks")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        out = self.grouped_attention(attn, q, k, v, latent_size)
        out = attn.to_out[1](attn.to_out[0](out))  # linear, dropout
        return out / attn.rescale_output_factor

    def grouped_attention(
        self, attn: Attention, q: Tensor, k: Tensor, v: Tensor, latent_size: tuple[int, int] | None = None
    ) -> Tensor:
        """Attention of ``q (N, n, C)`` over ``k, v (N, m, C)``; subclasses regroup rows first."""
        return self.heads_attention(attn, q, k, v)

    def heads_attention(self, attn: Attention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Split heads, run the backend, merge heads: ``(B, L, H·d) -> (B, L, H·d)``."""
        b, heads = q.shape[0], attn.heads
        q, k, v = (t.reshape(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        out = attention(q, k, v, scale=attn.scale, backend=self.backend)  # (B, H, L, d)
        return out.transpose(1, 2).reshape(b, out.shape[2], -1)


class MultiViewAttnProcessor(AttnProcessor):
    """Self-attention across the V views of each object: dense, sparse (first view + own view) or row-wise."""

    def __init__(
        self, num_views: int, sparse: bool = False, backend: str = "auto", rowwise: bool = False
    ) -> None:
        super().__init__(backend)
        if sparse and rowwise:
            raise ValueError("sparse and row-wise multi-view attention cannot be combined")
        self.num_views = num_views
        self.sparse = sparse
        self.rowwise = rowwise

    def grouped_attention(
        self, attn: Attention, q: Tensor, k: Tensor, v: Tensor, latent_size: tuple[int, int] | None = None
    ) -> Tensor:
        """``(b·V, n, C)`` tensors; queries of each view attend to their object's (selected) view tokens."""
        if self.sparse:
            # 2n keys per view: the first view's tokens are shared, so they are copied once per view (2x, not Vx)
            k, v = sparse_view_context(k, self.num_views), sparse_view_context(v, self.num_views)
            return self.heads_attention(attn, q, k, v)
        if self.rowwise:
            height, _ = token_grid(q.shape[1], latent_size)
            q, k, v = (group_view_rows(t, self.num_views, height) for t in (q, k, v))  # (b·h, V·w, C)
            return ungroup_view_rows(self.heads_attention(attn, q, k, v), self.num_views, height)
        q, k, v = (group_views(t, self.num_views) for t in (q, k, v))  # (b, V·n, C)
        return ungroup_views(self.heads_attention(attn, q, k, v), self.num_views)


class CrossDomainAttnProcessor(AttnProcessor):
    """Joint attention between the normal and color tokens of the same (object, view)."""

    def grouped_attention(
        self, attn: Attention, q: Tensor, k: Tensor, v: Tensor, latent_size: tuple[int, int] | None = None
    ) -> Tensor:
        """``(2·M, n, C)`` tensors in the (domain, object, view) layout -> ``(2·M, n, C)``."""
        q, k, v = (group_domains(t) for t in (q, k, v))  # (M, 2n, C)
        return ungroup_domains(self.heads_attention(attn, q, k, v))
