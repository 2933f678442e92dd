"""Per-object render folders: detect the layout, list objects, validate and read one object.

Two layouts are read:
- ``wonder3d`` (the reference dataset): ``{root}/{uid[:3]}/{uid}/rgb_000_{view}.png``, ``normals_000_{view}.png``
  and ``mask_000_{view}.png``; no RT files, the cameras are the fixed reference rig.
- ``render-script`` (the reference Blender script and our synthetic renderer):
  ``{root}/{uid[:2]}/{uid}/rgb_000_{view}.webp|png`` and ``normals_000_{view}.webp|png`` (RGBA) plus
  ``000_{view}_RT.txt`` (3x4 world->camera).

Reading an object gives a `RawObject`: the encoded image files untouched (keyed like the shard members,
``rgb_front.png``) plus a strict-JSON camera record. The same `RawObject` comes out of a shard sample, so
the folder dataset and the shard reader share one decoder (`decode_raw_object`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from datapipes.cameras import reference_rig_array
from datapipes.sample import COND_VIEW, VIEW_NAMES, MultiViewSample, SampleError

LAYOUTS = ("wonder3d", "render-script")
IMAGE_EXTENSIONS = (".png", ".webp", ".jpg", ".jpeg")
CAMERAS_KEY = "cameras.json"
CAMERAS_FORMAT = "gnn3d-cameras/1"
# Decompression bombs are a real risk with untrusted image files; 8k x 8k is far above any render size.
MAX_IMAGE_PIXELS = 8192 * 8192
LAYOUT_PROBE = 64  # object folders sampled to detect a tree's layout
LAYOUT_MARGIN = 0.9  # share of the sampled folders' votes the detected layout needs


class LayoutError(ValueError):
    """The root folder does not look like any known render layout (message names the folder)."""


@dataclass
class ObjectRef:
    """One object folder found under a render root."""

    object_id: str
    path: Path


@dataclass
class RawObject:
    """One object as encoded files: what a shard sample stores.

    Attributes:
        object_id: the object id (folder name).
        layout: "wonder3d" or "render-script" (decides how masks are found when decoding).
        files: shard member name (e.g. ``rgb_front.png``) -> encoded bytes, byte-identical to the source.
        cameras: the strict-JSON camera/metadata record (see `cameras_record`).
        source: folder path or ``shard_url#key``, for error messages.
    """

    object_id: str
    layout: str
    files: dict[str, bytes]
    cameras: dict[str, Any]
    source: str = ""


def kinds_for(layout: str) -> tuple[str, ...]:
    """Image kinds stored per view in a layout."""
    return ("rgb", "normals", "mask") if layout == "wonder3d" else ("rgb", "normals")


# --------------------------------------------------------------------------------------------- listing


def list_objects(root: str | Path) -> list[ObjectRef]:
    """All two-level ``{prefix}/{uid}`` folders under root, sorted by object id.

    A folder is listed even when its files are broken, so that validation can report it.
    Raises LayoutError on a missing root or duplicate object ids.
    """
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"render root {root} is not a directory")
    found: dict[str, ObjectRef] = {}
    for prefix in sorted(p for p in root.iterdir() if p.is_dir()):
        for folder in sorted(p for p in prefix.iterdir() if p.is_dir()):
            if folder.name in found:
                raise LayoutError(
                    f"object id {folder.name!r} appears twice: {found[folder.name].path} and {folder}"
                )
            found[folder.name] = ObjectRef(folder.name, folder)
    return [found[key] for key in sorted(found)]


def _layout_evidence(folder: Path) -> str | None:
    """The layout one object folder points to: RT files only -> render-script, masks only -> wonder3d."""
    names = [p.name for p in folder.iterdir()]
    has_rt = any(name.endswith("_RT.txt") for name in names)
    has_mask = any(name.startswith("mask_000_") for name in names)
    if has_rt == has_mask:
        return None  # both or neither: this folder says nothing
    return "render-script" if has_rt else "wonder3d"


def _spread(objects: list[ObjectRef], count: int) -> list[ObjectRef]:
    """Up to `count` objects evenly spaced over the id-sorted list (not just its head)."""
    if len(objects) <= count:
        return objects
    return [objects[index * len(objects) // count] for index in range(count)]


def detect_layout(root: str | Path, objects: list[ObjectRef] | None = None, probe: int = LAYOUT_PROBE) -> str:
    """Decide the layout of a whole tree from up to `probe` object folders spread over it.

    Each sampled folder votes by its files (see `_layout_evidence`); a layout wins with at least
    `LAYOUT_MARGIN` of the votes, cast by at least half of the sampled folders. One stray RT file or mask
    cannot flip a tree; anything less clear raises LayoutError with the counts.
    """
    objects = list_objects(root) if objects is None else objects
    if not objects:
        raise LayoutError(f"no object folders under {root} (expected {{prefix}}/{{uid}}/ folders)")
    sampled = _spread(objects, probe)
    votes = Counter(_layout_evidence(ref.path) for ref in sampled)
    cast = votes["render-script"] + votes["wonder3d"]
    for layout in LAYOUTS:
        if cast * 2 >= len(sampled) and votes[layout] >= LAYOUT_MARGIN * cast:
            return layout
    raise LayoutError(
        f"cannot detect the layout of {root}: of {len(sampled)} sampled object folders "
        f"{votes['render-script']} have RT files (render-script), {votes['wonder3d']} have masks (wonder3d), "
        f"{votes[None]} have both or neither; pass --layout wonder3d|render-script"
    )


def resolve_layout(root: str | Path, layout: str, objects: list[ObjectRef] | None = None) -> str:
    """`layout` itself, or the detected one for "auto"; raises LayoutError on an unknown name."""
    if layout == "auto":
        return detect_layout(root, objects)
    if layout not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; choose auto, wonder3d or render-script")
    return layout


# --------------------------------------------------------------------------------------------- reading


def _find_image(folder: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTENSIONS:
        candidate = folder / f"{stem}{ext}"
        if candidate.is_file():
            return candidate
    return None


def probe_image(data: bytes, object_id: str, key: str, source: str, full: bool = True) -> Image.Image:
    """Open encoded bytes; `full` decodes every pixel (catches truncation). Raises SampleError naming the key."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise SampleError(object_id, key, f"image of {image.width}x{image.height} is too large", source)
        if full:
            image.load()
    except SampleError:
        raise
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError) for bad files
        raise SampleError(object_id, key, f"unreadable image: {error}", source) from error
    return image


def parse_rt(text: str, object_id: str, key: str, source: str) -> np.ndarray:
    """Parse a 3x4 (or 4x4 with a [0 0 0 1] last row) world->camera text matrix; float64 [3, 4]."""
    try:
        rows = [[float(v) for v in line.split()] for line in text.strip().splitlines() if line.strip()]
        matrix = np.array(rows, dtype=np.float64)
    except ValueError as error:
        raise SampleError(object_id, key, f"RT file is not a numeric matrix: {error}", source) from error
    if matrix.shape == (4, 4) and np.allclose(matrix[3], [0, 0, 0, 1]):
        matrix = matrix[:3]
    if matrix.shape != (3, 4):
        raise SampleError(object_id, key, f"RT matrix has shape {matrix.shape}, expected 3x4", source)
    check_pose(matrix, object_id, key, source)
    return matrix


def check_pose(matrix: np.ndarray, object_id: str, key: str, source: str) -> None:
    """Finite entries and an orthonormal rotation (tolerance 1e-3, the RT files carry ~7 digits)."""
    if not np.all(np.isfinite(matrix)):
        raise SampleError(object_id, key, "RT matrix contains NaN or inf", source)
    rotation = matrix[:, :3]
    with np.errstate(over="ignore", invalid="ignore"):  # huge finite entries: inf in R R^T, refused below
        orthonormal = np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-3)
    if not orthonormal:
        raise SampleError(object_id, key, "RT rotation is not orthonormal (R R^T != I)", source)


def read_object(
    ref: ObjectRef, layout: str, view_names: tuple[str, ...] = VIEW_NAMES, full_decode: bool = True
) -> RawObject:
    """Read and validate one object folder into a RawObject (bytes untouched).

    Checks: every view has every image kind; every image decodes fully (only headers with
    `full_decode=False`, when the caller decodes the pixels next anyway); all images share one size;
    render-script color/normal images carry alpha; RT files parse to a finite orthonormal 3x4 matrix.
    Raises SampleError naming the object, folder and the offending file.
    """
    source = str(ref.path)
    files: dict[str, bytes] = {}
    names: dict[str, str] = {}
    sizes: dict[str, list[int]] = {}
    for view in view_names:
        for kind in kinds_for(layout):
            stem = f"{kind}_000_{view}"
            path = _find_image(ref.path, stem)
            if path is None:
                raise SampleError(ref.object_id, stem, "missing image file (view not rendered?)", source)
            key = f"{kind}_{view}{path.suffix.lower()}"
            data = path.read_bytes()
            image = probe_image(data, ref.object_id, path.name, source, full=full_decode)
            if layout == "render-script" and image.mode not in ("RGBA", "LA", "PA"):
                raise SampleError(ref.object_id, path.name, f"mode {image.mode} has no alpha channel", source)
            files[key], names[key], sizes[key] = data, path.name, [image.width, image.height]
    distinct = {tuple(size) for size in sizes.values()}
    if len(distinct) != 1:
        detail = ", ".join(f"{names[k]}={w}x{h}" for k, (w, h) in sizes.items())
        raise SampleError(ref.object_id, "image size", f"images differ in size: {detail}", source)
    poses = _read_poses(ref, layout, view_names, names)
    cameras = cameras_record(ref.object_id, layout, view_names, poses, names, sizes)
    return RawObject(ref.object_id, layout, files, cameras, source)


def _read_poses(
    ref: ObjectRef, layout: str, view_names: tuple[str, ...], names: dict[str, str]
) -> np.ndarray:
    if layout == "wonder3d":
        return reference_rig_array(view_names)
    poses = []
    for view in view_names:
        path = ref.path / f"000_{view}_RT.txt"
        if not path.is_file():
            raise SampleError(ref.object_id, path.name, "missing RT file", str(ref.path))
        poses.append(parse_rt(path.read_text(errors="replace"), ref.object_id, path.name, str(ref.path)))
        names[f"rt_{view}"] = path.name
    return np.stack(poses)


def cameras_record(
    object_id: str,
    layout: str,
    view_names: tuple[str, ...],
    poses: np.ndarray,
    source_files: dict[str, str],
    image_sizes: dict[str, list[int]],
) -> dict[str, Any]:
    """The strict-JSON record stored as ``cameras.json`` in every shard sample.

    poses: float64 [V, 3, 4] world->camera per view; source_files: member key -> original file name;
    image_sizes: member key -> [width, height].
    """
    return {
        "format": CAMERAS_FORMAT,
        "object_id": object_id,
        "layout": layout,
        "view_names": list(view_names),
        "cond_view": COND_VIEW,
        "w2c": {view: poses[i].tolist() for i, view in enumerate(view_names)},
        "source_files": dict(sorted(source_files.items())),
        "image_sizes": dict(sorted(image_sizes.items())),
    }


def cameras_json_bytes(record: dict[str, Any]) -> bytes:
    """Serialise a camera record as strict JSON (NaN/inf refused), stable key order."""
    return json.dumps(record, allow_nan=False, sort_keys=True, indent=1).encode("utf-8")


def _refuse_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} is not strict JSON")


def parse_cameras_json(data: bytes, object_id: str, source: str) -> dict[str, Any]:
    """Parse and check a ``cameras.json`` member; raises SampleError on anything malformed."""
    try:
        record = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:  # RecursionError: "[[[[..." nesting
        raise SampleError(object_id, CAMERAS_KEY, f"not strict JSON: {error}", source) from error
    required = ("format", "object_id", "layout", "view_names", "cond_view", "w2c")
    missing = [key for key in required if not isinstance(record, dict) or key not in record]
    if missing:
        raise SampleError(object_id, CAMERAS_KEY, f"missing fields {missing}", source)
    if record["format"] != CAMERAS_FORMAT or record["layout"] not in LAYOUTS:
        raise SampleError(
            object_id, CAMERAS_KEY, f"unknown format/layout {record['format']!r}/{record['layout']!r}", source
        )
    problem = _record_field_problem(record)
    if problem:
        raise SampleError(object_id, CAMERAS_KEY, problem, source)
    return record


def _utf8_name(value: Any) -> bool:
    """A non-empty str that encodes to UTF-8 (JSON allows lone surrogates like "\\ud800"; ids are hashed)."""
    if not isinstance(value, str) or not value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _record_field_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with the types of a camera record's fields (the decoder indexes and hashes them)."""
    names = record["view_names"]
    if not _utf8_name(record["object_id"]):
        return f"object_id must be a non-empty UTF-8 string, got {record['object_id']!r}"
    if not isinstance(names, list) or not names or not all(_utf8_name(name) for name in names):
        return f"view_names must be a non-empty list of names, got {names!r}"
    if len(set(names)) != len(names):
        return f"view_names repeat a view: {names}"
    if not _utf8_name(record["cond_view"]):
        return f"cond_view must be a view name, got {record['cond_view']!r}"
    if not isinstance(record["w2c"], dict):
        return f"w2c must map view names to 3x4 matrices, got {type(record['w2c']).__name__}"
    return None


# --------------------------------------------------------------------------------------------- decoding


def _decode(files: dict[str, bytes], kind: str, view: str, raw: RawObject, mode: str) -> np.ndarray:
    matches = [key for key in files if key.rsplit(".", 1)[0] == f"{kind}_{view}"]
    if not matches:
        raise SampleError(raw.object_id, f"{kind}_{view}", "missing member", raw.source)
    image = probe_image(files[matches[0]], raw.object_id, matches[0], raw.source)
    try:
        return np.asarray(image.convert(mode))
    except (ValueError, OSError) as error:  # a mode PIL cannot convert (untrusted bytes pick the mode)
        raise SampleError(
            raw.object_id, matches[0], f"cannot convert {image.mode} to {mode}: {error}", raw.source
        ) from error


def _decode_view(raw: RawObject, view: str) -> tuple[np.ndarray, np.ndarray]:
    """(color RGBA, normal RGBA) uint8 [H, W, 4] of one stored view."""
    if raw.layout != "wonder3d":
        return _decode(raw.files, "rgb", view, raw, "RGBA"), _decode(raw.files, "normals", view, raw, "RGBA")
    alpha = _decode(raw.files, "mask", view, raw, "L")
    rgb = _decode(raw.files, "rgb", view, raw, "RGB")
    nrm = _decode(raw.files, "normals", view, raw, "RGB")
    if not (alpha.shape == rgb.shape[:2] == nrm.shape[:2]):
        raise SampleError(raw.object_id, f"mask_{view}", "mask size differs from its images", raw.source)
    return np.dstack([rgb, alpha]), np.dstack([nrm, alpha])


def decode_raw_object(raw: RawObject, views: tuple[str, ...] | None = None) -> MultiViewSample:
    """Decode a RawObject into a `MultiViewSample` (RGBA uint8 views, float64 poses) and validate it.

    views: the target views to decode, in this order (None: every stored view, stored order); the
    condition image is always the stored condition view, whether or not it is among them.
    wonder3d: the mask image becomes the alpha of both the color and the normal image of its view.
    render-script: alpha comes from the RGBA files. Raises SampleError naming object, source and key.
    """
    stored = tuple(raw.cameras["view_names"])
    views = stored if views is None else tuple(views)
    cond_view = raw.cameras.get("cond_view", COND_VIEW)
    absent = [view for view in (*views, cond_view) if view not in stored]
    if absent or not views:
        raise SampleError(raw.object_id, CAMERAS_KEY, f"views {absent} not among stored {stored}", raw.source)
    colors, normals = (list(images) for images in zip(*(_decode_view(raw, view) for view in views)))
    sizes = {image.shape for image in colors + normals}
    if len(sizes) != 1:
        raise SampleError(raw.object_id, "image size", f"views differ in size: {sorted(sizes)}", raw.source)
    w2c = _poses_from_record(raw, views)
    cond_rgba = colors[views.index(cond_view)] if cond_view in views else _decode_view(raw, cond_view)[0]
    sample = MultiViewSample(
        object_id=raw.object_id,
        cond_rgba=cond_rgba.copy(),
        color_rgba=np.stack(colors),
        normal_rgba=np.stack(normals),
        w2c=w2c,
        cond_w2c=_poses_from_record(raw, (cond_view,))[0],
        view_names=views,
        source=raw.source,
    )
    sample.validate()
    return sample


def _poses_from_record(raw: RawObject, views: tuple[str, ...]) -> np.ndarray:
    poses = []
    for view in views:
        try:
            matrix = np.asarray(raw.cameras["w2c"][view], dtype=np.float64)
        except (KeyError, TypeError, ValueError, OverflowError) as error:  # Overflow: ints beyond float64
            raise SampleError(raw.object_id, f"w2c.{view}", f"bad pose entry: {error}", raw.source) from error
        if matrix.shape != (3, 4):
            raise SampleError(
                raw.object_id, f"w2c.{view}", f"pose shape {matrix.shape} != (3, 4)", raw.source
            )
        check_pose(matrix, raw.object_id, f"w2c.{view}", raw.source)
        poses.append(matrix)
    return np.stack(poses)


def read_sample(ref: ObjectRef, layout: str, view_names: tuple[str, ...] = VIEW_NAMES) -> MultiViewSample:
    """Read, validate and decode one object folder into a MultiViewSample."""
    return decode_raw_object(read_object(ref, layout, view_names))


# --------------------------------------------------------------------------------------------- helpers


def tar_key(object_id: str) -> str:
    """A webdataset-safe sample key: webdataset splits member names at the first dot, so no dots/slashes."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", object_id)
    if key != object_id:
        warnings.warn(f"object id {object_id!r} stored under tar key {key!r}", stacklevel=2)
    return key


def stable_unit_hash(text: str) -> float:
    """A process-independent hash of text in [0, 1) (sha256; Python's hash() is salted per process)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / float(1 << 64)


def split_of(object_id: str, val_fraction: float) -> str:
    """Deterministic train/val split by object-id hash: "val" for a `val_fraction` share of ids."""
    if not 0.0 <= val_fraction < 1.0 or math.isnan(val_fraction):
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    return "val" if stable_unit_hash(object_id) < val_fraction else "train"
