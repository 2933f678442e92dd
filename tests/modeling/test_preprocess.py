"""Inference preprocessing: alpha-box crop, longer side -> object_size, centred, composited on white."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling.preprocess import PreprocessError, alpha_box, center_object, load_rgba, preprocess_image

RED = (1.0, 0.0, 0.0)
WHITE = (1.0, 1.0, 1.0)


def _rect_rgba(height: int = 80, width: int = 100, box=(10, 30, 30, 70), color=(255, 0, 0)) -> np.ndarray:
    """Transparent (green, to catch colour bleeding) image with an opaque rectangle rows/cols [t, b) x [l, r)."""
    rgba = np.zeros((height, width, 4), dtype=np.uint8)
    rgba[..., 1] = 255  # hidden colour under alpha 0 must never show up
    top, left, bottom, right = box
    rgba[top:bottom, left:right, :3] = color
    rgba[top:bottom, left:right, 3] = 255
    return rgba


def test_alpha_box_is_inclusive_and_empty_alpha_fails() -> None:
    rgba = _rect_rgba()
    assert alpha_box(rgba[..., 3]) == (10, 30, 30, 70)
    with pytest.raises(PreprocessError, match=r"cat\.png: alpha channel is empty"):
        alpha_box(np.zeros((4, 4), dtype=np.uint8), name="cat.png")


def test_crop_scale_centre_numbers() -> None:
    # object 40 wide x 20 high -> scale 192 / 40 = 4.8 -> 192 x 96, centred: cols [32, 224), rows [80, 176)
    image = preprocess_image(_rect_rgba(), object_size=192, canvas_size=256)
    assert image.shape == (3, 256, 256) and image.dtype == torch.float32
    changed = (image != 1.0).any(dim=0)
    rows = torch.nonzero(changed.any(dim=1)).flatten()
    cols = torch.nonzero(changed.any(dim=0)).flatten()
    assert (rows.min().item(), rows.max().item() + 1) == (80, 176)
    assert (cols.min().item(), cols.max().item() + 1) == (32, 224)
    # the opaque object is exactly red everywhere inside (premultiplied resize: no green bleeding)
    assert torch.equal(image[:, 80:176, 32:224], torch.tensor(RED).view(3, 1, 1).expand(3, 96, 192))
    assert image[1].max().item() == 1.0 and image[1, 80:176, 32:224].max().item() == 0.0


def test_soft_alpha_composites_on_white_and_custom_sizes() -> None:
    rgba = _rect_rgba(height=20, width=20, box=(0, 0, 20, 10), color=(0, 0, 0))
    rgba[:, :10, 3] = 128  # half-transparent black -> grey on white
    image = preprocess_image(rgba, object_size=32, canvas_size=64)
    # 10 x 20 -> 16 x 32, centred at cols [24, 40), rows [16, 48)
    inside = image[:, 16:48, 24:40]
    assert torch.allclose(inside, torch.full_like(inside, 1.0 - 128 / 255), atol=1e-5)
    assert torch.equal(image[:, :16], torch.ones(3, 16, 64))
    rgb, alpha = center_object(rgba, object_size=32, canvas_size=64)
    assert rgb.shape == (64, 64, 3) and alpha.shape == (64, 64)
    assert alpha.sum() == pytest.approx(16 * 32 * 128 / 255, rel=1e-4)


def test_black_background_and_pil_input() -> None:
    pil = Image.fromarray(_rect_rgba(), "RGBA")
    image = preprocess_image(pil, object_size=96, canvas_size=128, background=(0.0, 0.0, 0.0))
    assert image[:, 0, 0].tolist() == [0.0, 0.0, 0.0]
    assert image[:, 64, 64].tolist() == [1.0, 0.0, 0.0]


def test_load_rgba_and_bad_inputs(tmp_path: Path) -> None:
    path = tmp_path / "in.png"
    Image.fromarray(_rect_rgba(), "RGBA").save(path)
    assert np.array_equal(load_rgba(path), _rect_rgba())
    Image.new("RGB", (8, 6), (5, 6, 7)).save(tmp_path / "rgb.png")
    assert load_rgba(tmp_path / "rgb.png")[..., 3].min() == 255  # no alpha = fully opaque
    with pytest.raises(PreprocessError, match=r"missing\.png"):
        load_rgba(tmp_path / "missing.png")
    with pytest.raises(PreprocessError, match="object_size"):
        preprocess_image(_rect_rgba(), object_size=300, canvas_size=256)
