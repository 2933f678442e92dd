"""Write rendered objects in the reference render-script layout (`datapipes.render_folder`).

`{root}/{uid[:2]}/{uid}/rgb_000_{view}.{png|webp}` (RGBA), `normals_000_{view}.{ext}` (RGBA, world-space
normals) and `000_{view}_RT.txt` (3x4 world->camera, written like the reference's `np.savetxt`).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from datapipes.sample import MultiViewSample

FORMATS = ("png", "webp")
STAGING_SUFFIX = ".tmp"  # half-written object folders are ".{uid}.tmp" next to the final one


def object_folder(root: str | Path, object_id: str) -> Path:
    """Folder of one object in the render-script layout: root/uid[:2]/uid."""
    return Path(root) / object_id[:2] / object_id


def encode_image(rgba: np.ndarray, fmt: str) -> bytes:
    """Encode uint8 RGBA [H,W,4] losslessly; PNG at a low zlib level (fast, deterministic bytes)."""
    buffer = io.BytesIO()
    if fmt == "png":
        Image.fromarray(rgba, "RGBA").save(buffer, format="PNG", compress_level=3)
    elif fmt == "webp":
        # lossless keeps normal maps exact; method 0 is the fastest encoder setting
        Image.fromarray(rgba, "RGBA").save(buffer, format="WEBP", lossless=True, method=0, exact=True)
    else:
        raise ValueError(f"image format must be one of {FORMATS}, got {fmt!r}")
    return buffer.getvalue()


def object_files(sample: MultiViewSample, fmt: str = "png") -> dict[str, bytes]:
    """{file name: bytes} of one object's render-script folder."""
    files: dict[str, bytes] = {}
    for index, view in enumerate(sample.view_names):
        files[f"rgb_000_{view}.{fmt}"] = encode_image(sample.color_rgba[index], fmt)
        files[f"normals_000_{view}.{fmt}"] = encode_image(sample.normal_rgba[index], fmt)
        text = io.StringIO()
        np.savetxt(text, sample.w2c[index])
        files[f"000_{view}_RT.txt"] = text.getvalue().encode()
    return files


def write_object(sample: MultiViewSample, root: str | Path, fmt: str = "png") -> Path:
    """Write one object folder atomically (temp folder + rename), replacing a stale copy. Returns it."""
    final = object_folder(root, sample.object_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{sample.object_id}{STAGING_SUFFIX}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name, data in object_files(sample, fmt).items():
        (staging / name).write_bytes(data)
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    return final


def remove_stale_staging(root: str | Path) -> int:
    """Delete half-written object folders an interrupted run left behind; returns how many."""
    stale = [path for path in Path(root).glob(f"*/.*{STAGING_SUFFIX}") if path.is_dir()]
    for path in stale:
        shutil.rmtree(path)
    return len(stale)


def is_complete(root: str | Path, object_id: str, view_names: tuple[str, ...], fmt: str = "png") -> bool:
    """True when every file of the object's folder exists (used to resume an interrupted render)."""
    folder = object_folder(root, object_id)
    names = [f"{kind}_000_{view}.{fmt}" for view in view_names for kind in ("rgb", "normals")]
    names += [f"000_{view}_RT.txt" for view in view_names]
    return all((folder / name).is_file() for name in names)
