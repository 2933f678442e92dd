"""Tiny render folders for the converter / reader tests, written with numpy + PIL (no renderer needed).

Each object is a coloured disc with a sphere-like normal map; colour and radius come from the seed, so
objects differ and any mix-up between them shows in the pixels.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from datapipes.cameras import reference_rig_array
from datapipes.convert import ConvertOptions, convert
from datapipes.sample import VIEW_NAMES


def disc_images(seed: int, view: int, res: int) -> tuple[np.ndarray, np.ndarray]:
    """(color RGBA, world-normal RGBA) uint8 [res, res, 4] of one object seen from one view."""
    rng = np.random.default_rng([seed, view])
    ys, xs = np.mgrid[0:res, 0:res].astype(np.float64)
    u, v = (xs + 0.5) / res * 2 - 1, (ys + 0.5) / res * 2 - 1
    radius = 0.5 + 0.4 * rng.random()
    inside = u**2 + v**2 < radius**2
    alpha = np.where(inside, 255, 0).astype(np.uint8)
    color = np.zeros((res, res, 4), np.uint8)
    color[..., :3] = rng.integers(0, 256, 3, dtype=np.uint8)
    color[..., 0] = (color[..., 0].astype(int) + (xs * 7).astype(int)) % 256  # a gradient: not flat
    color[..., 3] = alpha
    z = np.sqrt(np.clip(radius**2 - u**2 - v**2, 0, None)) / radius
    normal = np.stack([u / radius, -v / radius, z], -1)
    normal = np.where(inside[..., None], normal / np.linalg.norm(normal, axis=-1, keepdims=True), 0)
    normal_rgba = np.dstack([np.round((normal + 1) / 2 * 255).astype(np.uint8), alpha])
    return color, normal_rgba


def object_id(index: int) -> str:
    """Hex-like ids, like Objaverse uids."""
    return f"{index * 2654435761 % (1 << 32):08x}obj{index:03d}"


def write_render_script_object(root: Path, uid: str, seed: int, res: int = 32, ext: str = "png") -> Path:
    """One object in the render-script layout: RGBA rgb/normals + 000_{view}_RT.txt."""
    folder = root / uid[:2] / uid
    folder.mkdir(parents=True, exist_ok=True)
    rig = reference_rig_array()
    for index, view in enumerate(VIEW_NAMES):
        color, normal = disc_images(seed, index, res)
        Image.fromarray(color, "RGBA").save(folder / f"rgb_000_{view}.{ext}")
        Image.fromarray(normal, "RGBA").save(folder / f"normals_000_{view}.{ext}")
        np.savetxt(folder / f"000_{view}_RT.txt", rig[index], fmt="%.18e")
    return folder


def write_wonder3d_object(root: Path, uid: str, seed: int, res: int = 32) -> Path:
    """One object in the reference dataset layout: RGB rgb/normals + separate L masks, no RT files."""
    folder = root / uid[:3] / uid
    folder.mkdir(parents=True, exist_ok=True)
    for index, view in enumerate(VIEW_NAMES):
        color, normal = disc_images(seed, index, res)
        Image.fromarray(color[..., :3], "RGB").save(folder / f"rgb_000_{view}.png")
        Image.fromarray(normal[..., :3], "RGB").save(folder / f"normals_000_{view}.png")
        Image.fromarray(color[..., 3], "L").save(folder / f"mask_000_{view}.png")
    return folder


def make_render_root(root: Path, count: int, layout: str = "render-script", res: int = 32) -> list[str]:
    """Write `count` objects; returns their ids (sorted)."""
    ids = [object_id(i) for i in range(count)]
    for index, uid in enumerate(ids):
        if layout == "wonder3d":
            write_wonder3d_object(root, uid, index, res)
        else:
            write_render_script_object(root, uid, index, res)
    return sorted(ids)


def make_shards(tmp: Path, count: int, per_shard: int, res: int = 32, val_fraction: float = 0.0) -> Path:
    """Render `count` objects and convert them into shards of `per_shard` samples; returns the out dir."""
    src, out = tmp / "src", tmp / "shards"
    make_render_root(src, count, res=res)
    convert(src, out, ConvertOptions(samples_per_shard=per_shard, val_fraction=val_fraction))
    return out


def corrupt_member(path: Path, member: str) -> str:
    """Replace the bytes of the first sample's `member` (e.g. normals_left.png) with garbage; its object key."""
    with tarfile.open(path) as tar:
        items = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    victim = next(info for info, _ in items if info.name.endswith(f".{member}"))
    with tarfile.open(path, "w") as tar:
        for info, data in items:
            if info is victim:
                data = b"\x89PNG\r\n\x1a\n but the rest is garbage"
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return victim.name.split(".", 1)[0]
