"""One decoded sample -> the training example tensors, and collation to the training batch.

Per object (as the reference dataset does): resize every RGBA image to `resolution` (PIL, antialiased,
alpha-premultiplied), pick one background for the whole object, composite colors with alpha, map the
normals [0,1] -> [-1,1], rotate them into the condition camera frame (n' = R_cond R_t^-1 n; stored normals
are in each view's own camera frame, see `datapipes.sample`), map back to [0,1], composite like colors; add [-1,1] copies for the VAE, the CLIP input (bicubic to clip_size, CLIP
mean/std) and the camera embeddings of both domains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from datapipes.cameras import camera_embedding, relative_rotation
from datapipes.sample import MultiViewSample, SampleError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "gray": (0.5, 0.5, 0.5),
}
BACKGROUND_CHOICES = (*BACKGROUNDS, "random")
IMAGE_KEYS_01 = ("image_cond", "image_target", "normal_target")
VAE_KEYS = ("image_cond_vae", "image_target_vae", "normal_target_vae")
EMBED_KEYS = ("camera_embed_image", "camera_embed_normal")


@dataclass(frozen=True)
class TransformOptions:
    """How one sample becomes an example. `background="random"` draws white/black/gray once per object.

    views: the target views to take, in this order (a subset or reorder of the stored ones); None takes
    every stored view in stored order. Images, normals, poses and camera embeddings all follow it.
    """

    resolution: int = 256
    num_views: int = 6
    background: str = "random"
    clip_size: int = 224
    views: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.background not in BACKGROUND_CHOICES:
            raise ValueError(f"background must be one of {BACKGROUND_CHOICES}, got {self.background!r}")
        if self.resolution < 8 or self.clip_size < 8 or self.num_views < 1:
            raise ValueError(f"resolution/clip_size must be >= 8 and num_views >= 1: {self}")
        if self.views is not None:
            object.__setattr__(self, "views", tuple(self.views))  # a list from a config stays hashable
            if len(self.views) != self.num_views or len(set(self.views)) != len(self.views):
                raise ValueError(f"views {self.views} must be {self.num_views} distinct names (num_views)")


def pick_background(mode: str, rng: np.random.Generator | None) -> np.ndarray:
    """RGB background in [0,1], float32 [3]; "random" picks one of white/black/gray with equal odds."""
    if mode == "random":
        if rng is None:
            raise ValueError('background="random" needs a numpy Generator (rng=None given)')
        names = tuple(BACKGROUNDS)
        mode = names[int(rng.integers(len(names)))]
    return np.asarray(BACKGROUNDS[mode], dtype=np.float32)


def resize_rgba(images: np.ndarray, resolution: int) -> np.ndarray:
    """Resize uint8 RGBA images [..., H, W, 4] to [..., R, R, 4] with antialiased bicubic.

    PIL premultiplies RGBA by alpha while resampling, so background colours never bleed into the edge.
    Returns the input unchanged (no copy) when it already has the target size.
    """
    if images.shape[-3:-1] == (resolution, resolution):
        return images
    flat = images.reshape(-1, *images.shape[-3:])
    out = np.stack(
        [
            np.asarray(
                Image.fromarray(img, "RGBA").resize((resolution, resolution), Image.Resampling.BICUBIC)
            )
            for img in flat
        ]
    )
    return out.reshape(*images.shape[:-3], resolution, resolution, 4)


def composite(rgb01: np.ndarray, alpha01: np.ndarray, background: np.ndarray) -> np.ndarray:
    """rgb * a + bg * (1 - a). rgb01 [..., H, W, 3], alpha01 [..., H, W, 1] in [0,1] -> float32."""
    out = rgb01 - background  # written as (rgb - bg) * a + bg: two passes over the image instead of four
    out *= alpha01
    out += background
    return out


def clip_preprocess(image_cond: torch.Tensor, clip_size: int) -> torch.Tensor:
    """CLIP input: bicubic (antialiased) resize of [3,H,W] in [0,1] to clip_size², clamp, CLIP mean/std."""
    resized = F.interpolate(
        image_cond[None], size=(clip_size, clip_size), mode="bicubic", align_corners=False, antialias=True
    )[0].clamp_(0.0, 1.0)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return (resized - mean) / std


def _rgba01(rgba: np.ndarray) -> torch.Tensor:
    """uint8 RGBA [..., H, W, 4] -> float32 [..., 4, H, W] in [0,1], channels first and contiguous.

    De-interleaved while still uint8 (a quarter of the bytes to shuffle), so every float pass after it runs
    over contiguous planes; the channels-last float version strode over interleaved RGBA at ~2× the cost.
    """
    planes = torch.from_numpy(np.ascontiguousarray(rgba)).movedim(-1, -3).contiguous()
    return planes.float().mul_(1.0 / 255.0)


def _composite_chw(rgb01: torch.Tensor, alpha01: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """(rgb - bg) * a + bg, channels first; the same float32 operations, in the same order, as `composite`."""
    out = rgb01 - background
    out *= alpha01
    out += background
    return out


def _color_views(rgba: np.ndarray, background: torch.Tensor) -> torch.Tensor:
    """uint8 RGBA [..., H, W, 4] -> composited float32 RGB [..., 3, H, W] in [0,1]."""
    as_float = _rgba01(rgba)
    return _composite_chw(as_float[..., :3, :, :], as_float[..., 3:, :, :], background)


def _normal_views(sample: MultiViewSample, normal_rgba: np.ndarray, background: torch.Tensor) -> torch.Tensor:
    """View-frame normals RGBA [V,H,W,4] -> condition-frame normals composited, float32 [V,3,H,W] in [0,1]."""
    as_float = _rgba01(normal_rgba)
    normals = as_float[:, :3] * 2.0 - 1.0
    rotation = torch.from_numpy(relative_rotation(sample.cond_w2c, sample.w2c).astype(np.float32))
    rotation = rotation[..., None, None]  # [V, 3, 3, 1, 1]: broadcast over H, W
    # n'_i = sum_j R_ij n_j as three multiply-adds in the order of cameras.rotate_normals_to_cond
    rotated = normals[:, 0:1] * rotation[:, :, 0]
    rotated += normals[:, 1:2] * rotation[:, :, 1]
    rotated += normals[:, 2:3] * rotation[:, :, 2]
    # Rotating quantised / resampled normals can leave [-1,1] by a hair; the contract promises [0,1].
    encoded = rotated.mul_(0.5).add_(0.5).clamp_(0.0, 1.0)
    return _composite_chw(encoded, as_float[:, 3:], background)


def make_example(
    sample: MultiViewSample, opts: TransformOptions, rng: np.random.Generator | None
) -> dict[str, Any]:
    """One object -> unbatched example tensors (batch keys without the leading B). Deterministic given rng.

    rng is only drawn from for background="random" (one draw per object); None is fine otherwise.
    Shapes: image_cond [3,H,W]; image_target, normal_target [V,3,H,W] in [0,1]; *_vae the same in [-1,1];
    image_cond_CLIP [3,clip,clip]; camera_embed_image/normal [V,10]; object_id str. Raises SampleError.
    """
    sample.validate()
    if opts.views is not None:
        sample = sample.select(opts.views)  # a no-op when the reader already decoded just these views
    if sample.num_views != opts.num_views:
        raise sample.error("view_names", f"{sample.num_views} views, transform expects {opts.num_views}")
    background = torch.from_numpy(pick_background(opts.background, rng)).view(3, 1, 1)
    res = opts.resolution
    image_cond = _color_views(resize_rgba(sample.cond_rgba, res), background)
    image_target = _color_views(resize_rgba(sample.color_rgba, res), background)
    normal_target = _normal_views(sample, resize_rgba(sample.normal_rgba, res), background)
    example = {
        "object_id": sample.object_id,
        "image_cond": image_cond,
        "image_target": image_target,
        "normal_target": normal_target,
        "image_cond_vae": image_cond * 2.0 - 1.0,
        "image_target_vae": image_target * 2.0 - 1.0,
        "normal_target_vae": normal_target * 2.0 - 1.0,
        "image_cond_CLIP": clip_preprocess(image_cond, opts.clip_size),
        "camera_embed_image": _embedding(sample, "color"),
        "camera_embed_normal": _embedding(sample, "normal"),
    }
    check_example(example, opts, sample.object_id, sample.source)
    return example


def _embedding(sample: MultiViewSample, domain: str) -> torch.Tensor:
    return torch.from_numpy(camera_embedding(sample.cond_w2c, sample.w2c, domain).astype(np.float32))


def expected_shapes(opts: TransformOptions) -> dict[str, tuple[int, ...]]:
    """Unbatched shape of every tensor key of an example."""
    res, views, clip = opts.resolution, opts.num_views, opts.clip_size
    shapes = {
        "image_cond": (3, res, res),
        "image_cond_vae": (3, res, res),
        "image_cond_CLIP": (3, clip, clip),
    }
    for key in ("image_target", "normal_target", "image_target_vae", "normal_target_vae"):
        shapes[key] = (views, 3, res, res)
    for key in EMBED_KEYS:
        shapes[key] = (views, 10)
    return shapes


def check_example(example: dict[str, Any], opts: TransformOptions, object_id: str, source: str = "") -> None:
    """Check shapes, dtypes, finiteness and value ranges of an example; raise SampleError naming the key."""
    for key, shape in expected_shapes(opts).items():
        value = example.get(key)
        if not isinstance(value, torch.Tensor):
            raise SampleError(object_id, key, f"missing or not a tensor ({type(value).__name__})", source)
        if value.dtype != torch.float32 or tuple(value.shape) != shape:
            problem = f"got {value.dtype} {tuple(value.shape)}, expected float32 {shape}"
            raise SampleError(object_id, key, problem, source)
    ranges = {**dict.fromkeys(IMAGE_KEYS_01, (0.0, 1.0)), **dict.fromkeys(VAE_KEYS, (-1.0, 1.0))}
    ranges.update(dict.fromkeys(EMBED_KEYS, (-1.0, 1.0)))
    ranges["image_cond_CLIP"] = (-np.inf, np.inf)  # finite is all we can promise after normalisation
    for key, (low, high) in ranges.items():
        lo, hi = (float(v) for v in torch.aminmax(example[key]))
        # written so that NaN (all comparisons False) fails too; inf fails the finite check
        if not (lo >= low - 1e-5 and hi <= high + 1e-5 and np.isfinite(lo) and np.isfinite(hi)):
            raise SampleError(
                object_id, key, f"values in [{lo:.4g}, {hi:.4g}] outside [{low}, {high}]", source
            )


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack examples into the training batch: tensors gain a leading B, object_id becomes list[str]."""
    if not examples:
        raise ValueError("collate() got an empty list of examples")
    keys = set(examples[0])
    for example in examples[1:]:
        if set(example) != keys:
            raise SampleError(str(example.get("object_id")), "keys", f"{sorted(set(example) ^ keys)} differ")
    batch: dict[str, Any] = {"object_id": [str(example["object_id"]) for example in examples]}
    for key in sorted(keys - {"object_id"}):
        batch[key] = torch.stack([example[key] for example in examples])
    return batch
