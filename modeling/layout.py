"""The model batch layout: the one place that defines how images are ordered for the UNet.

The UNet sees ``N = 2·B·V`` images ordered (domain, object, view) and flattened:

    rows [0, B·V)        NORMAL domain: object 0 views 0..V-1, object 1 views 0..V-1, ...
    rows [B·V, 2·B·V)    COLOR domain, same (object, view) order

so that

* multi-view attention groups each consecutive run of ``V`` rows (one object, one domain), and
* cross-domain attention pairs row ``i`` of the first half with row ``i`` of the second half
  (same object, same view, the other domain).

This is Wonder3D's joint-trainer order (``torch.cat([normals, colors])`` then ``(B V) -> B·V``).
With cross-domain attention off (stage 1) the batch is simply ``B·V`` rows, views consecutive.

Classifier-free guidance: treat (guidance branch, object) as the object axis, i.e. call
``stack_domains`` on ``[2·B, V, ...]`` tensors so both branches stay aligned across the domain halves.
"""

from __future__ import annotations

import torch
from torch import Tensor

NUM_DOMAINS = 2  # normal, color (in this order)


class LayoutError(ValueError):
    """A batch does not fit the (domain, object, view) layout; the message says which size is wrong."""


def stack_domains(normal: Tensor, color: Tensor) -> Tensor:
    """Flatten two aligned domain tensors into the model layout.

    Args:
        normal: ``[B, V, ...]`` normal-domain tensors (latents, embeddings, ...).
        color: ``[B, V, ...]`` color-domain tensors, same shape.

    Returns:
        ``[2·B·V, ...]``: all normal rows (object-major, views consecutive), then all color rows.
    """
    if normal.shape != color.shape:
        raise LayoutError(
            f"normal {tuple(normal.shape)} and color {tuple(color.shape)} must have the same shape"
        )
    if normal.dim() < 2:
        raise LayoutError(f"expected [B, V, ...] tensors, got shape {tuple(normal.shape)}")
    rest = normal.shape[2:]
    return torch.cat([normal.reshape(-1, *rest), color.reshape(-1, *rest)], dim=0)


def split_domains(x: Tensor, num_objects: int, num_views: int) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`stack_domains`.

    Args:
        x: ``[2·B·V, ...]`` in the model layout.
        num_objects: ``B``.
        num_views: ``V``.

    Returns:
        ``(normal, color)``, each ``[B, V, ...]`` (views of the same tensor, no copy).
    """
    expected = NUM_DOMAINS * num_objects * num_views
    if x.shape[0] != expected:
        raise LayoutError(
            f"batch has {x.shape[0]} rows, expected 2·B·V = 2·{num_objects}·{num_views} = {expected}"
        )
    normal, color = x.reshape(NUM_DOMAINS, num_objects, num_views, *x.shape[1:]).unbind(0)
    return normal, color


def flatten_views(x: Tensor) -> Tensor:
    """``[B, V, ...] -> [B·V, ...]`` (single-domain layout, e.g. stage 1)."""
    return x.reshape(-1, *x.shape[2:])


def check_batch_size(num_rows: int, num_views: int, cross_domain: bool) -> None:
    """Raise :class:`LayoutError` unless ``num_rows`` fits the layout.

    Multi-view attention needs whole objects (a multiple of ``V``); cross-domain attention also needs the
    two domain halves, i.e. a multiple of ``2·V``.
    """
    unit = NUM_DOMAINS * num_views if cross_domain else num_views
    if num_views < 1 or num_rows % unit != 0:
        what = "2·num_views (cross-domain attention is on)" if cross_domain else "num_views"
        raise LayoutError(
            f"UNet batch of {num_rows} images is not a multiple of {what} = {unit}; "
            "order images as (domain, object, view), see modeling/layout.py"
        )
