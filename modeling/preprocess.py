"""Inference input preparation: crop an RGBA image to its object, centre it, composite it on white.

As the reference's single-image loader does: crop to the alpha bounding box, resize so the longer side is
`object_size` (192), centre on a `canvas_size`² (256²) canvas, composite with the alpha on white.
Two deliberate differences from the reference, both at most one pixel: the box includes its last row and
column (the reference's PIL crop drops them), and the shorter side is rounded instead of truncated.
Resizing is done on alpha-premultiplied float channels so transparent pixels' colours never bleed in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

WHITE = (1.0, 1.0, 1.0)


class PreprocessError(ValueError):
    """The input image cannot be prepared (empty alpha, bad size); the message names the image."""


def load_rgba(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 RGBA [H, W, 4]; images without alpha become fully opaque."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGBA")).copy()
    except OSError as error:
        raise PreprocessError(f"cannot read image {path}: {error}") from error


def alpha_box(alpha: np.ndarray, name: str = "image") -> tuple[int, int, int, int]:
    """Bounding box (top, left, bottom, right) of the non-zero alpha pixels; bottom/right exclusive.

    Raises PreprocessError naming `name` when the alpha channel is empty.
    """
    rows = np.flatnonzero(alpha.any(axis=1))
    cols = np.flatnonzero(alpha.any(axis=0))
    if rows.size == 0:
        raise PreprocessError(f"{name}: alpha channel is empty, there is no object to crop")
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _resize_channels(channels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bicubic-resize float32 [h, w, C] channel by channel (PIL 'F' mode keeps full precision)."""
    resized = [
        np.asarray(
            Image.fromarray(channels[..., c], mode="F").resize((width, height), Image.Resampling.BICUBIC)
        )
        for c in range(channels.shape[-1])
    ]
    return np.stack(resized, axis=-1)


def center_object(
    rgba: np.ndarray, object_size: int = 192, canvas_size: int = 256, name: str = "image"
) -> tuple[np.ndarray, np.ndarray]:
    """Crop to the alpha box, scale the longer side to `object_size`, centre on an empty canvas.

    Args:
        rgba: uint8 [H, W, 4], straight (not premultiplied) alpha.
    Returns:
        (rgb, alpha): float32 [S, S, 3] alpha-premultiplied colour and float32 [S, S] alpha, in [0, 1],
        S = canvas_size; everything outside the placed object is 0.
    """
    if not 0 < object_size <= canvas_size:
        raise PreprocessError(f"{name}: need 0 < object_size ({object_size}) <= canvas_size ({canvas_size})")
    if rgba.ndim != 3 or rgba.shape[-1] != 4:
        raise PreprocessError(f"{name}: expected RGBA [H, W, 4], got shape {rgba.shape}")
    top, left, bottom, right = alpha_box(rgba[..., 3], name)
    crop = rgba[top:bottom, left:right].astype(np.float32) / 255.0
    crop[..., :3] *= crop[..., 3:]  # premultiply
    height, width = crop.shape[:2]
    scale = object_size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = np.clip(_resize_channels(crop, new_w, new_h), 0.0, 1.0)
    resized[..., :3] = np.minimum(resized[..., :3], resized[..., 3:])  # bicubic overshoot: keep rgb <= alpha
    canvas = np.zeros((canvas_size, canvas_size, 4), dtype=np.float32)
    y0, x0 = (canvas_size - new_h) // 2, (canvas_size - new_w) // 2
    canvas[y0 : y0 + new_h, x0 : x0 + new_w] = resized
    return canvas[..., :3], canvas[..., 3]


def preprocess_image(
    image: np.ndarray | Image.Image,
    object_size: int = 192,
    canvas_size: int = 256,
    background: tuple[float, float, float] = WHITE,
    name: str = "image",
) -> torch.Tensor:
    """The pipeline's condition image from an RGBA input (see module docstring).

    Args:
        image: uint8 RGBA [H, W, 4] array or a PIL image (converted to RGBA; no alpha = fully opaque).
        object_size: longer side of the object after resizing, pixels.
        canvas_size: output side, pixels.
        background: RGB in [0, 1] composited under the object.
    Returns:
        float32 [3, canvas_size, canvas_size] in [0, 1].
    """
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGBA"))
    rgb, alpha = center_object(np.asarray(image), object_size, canvas_size, name)
    composite = rgb + (1.0 - alpha[..., None]) * np.asarray(background, dtype=np.float32)
    return torch.from_numpy(np.clip(composite, 0.0, 1.0)).permute(2, 0, 1).contiguous()
