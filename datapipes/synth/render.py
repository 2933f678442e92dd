"""Orthographic ray casting of a SynthObject from the reference rig: color, world normals and alpha.

Camera convention of the reference RT files (Blender camera): x_cam = R x_world + t, the camera looks
along its -z axis, +y is up in the image, +x is right. The orthographic frame spans `ortho_scale` world
units (1.25, the reference render script's default) across the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datapipes.synth.scene import SynthObject, albedo

ORTHO_SCALE = 1.25


@dataclass
class RenderBuffers:
    """Float render of V views at resolution R (after supersampling, if any).

    alpha [V,R,R] in [0,1] (pixel coverage); color [V,R,R,3] straight (not premultiplied) in [0,1];
    normal [V,R,R,3] world-space unit normals (zero where alpha == 0); points [V,R,R,3] world hit points
    (NaN where missed; only exact per pixel without supersampling).
    """

    alpha: np.ndarray
    color: np.ndarray
    normal: np.ndarray
    points: np.ndarray


def view_rays(w2c: np.ndarray, res: int, ortho_scale: float = ORTHO_SCALE) -> tuple[np.ndarray, np.ndarray]:
    """One ray per pixel centre for every view: origins and unit directions, each [V*res*res, 3] (world).

    Rows of the image go top to bottom (camera +y is up), columns left to right (camera +x).
    """
    coords = ((np.arange(res) + 0.5) / res - 0.5) * ortho_scale
    u, v = np.meshgrid(coords, -coords)
    cam_points = np.stack([u, v, np.zeros_like(u)], axis=-1).reshape(-1, 3)  # [P, 3] on the image plane
    rotation, translation = w2c[:, :, :3], w2c[:, :, 3:]
    # world = R^T (p_cam - t) for every view, with points as row vectors: (p - t^T) @ R.
    # One 2-D matmul per view: numpy's stacked 3-D matmul with a 3-wide inner dim is many times slower.
    origins = np.stack([(cam_points - t[:, 0]) @ r for r, t in zip(rotation, translation)])  # [V, P, 3]
    forward = -rotation[:, 2, :]  # R^T (0, 0, -1)
    # the stored rig is orthonormal only to ~1e-7; intersections assume exactly unit directions
    forward = forward / np.linalg.norm(forward, axis=1, keepdims=True)
    dirs = np.broadcast_to(forward[:, None, :], origins.shape)
    return origins.reshape(-1, 3), np.ascontiguousarray(dirs.reshape(-1, 3))


def candidate_rays(
    w2c: np.ndarray, res: int, center: np.ndarray, radius: float, ortho_scale: float = ORTHO_SCALE
) -> np.ndarray:
    """Flat indices (into `view_rays` order) of the pixels whose rays can pass within `radius` of `center`.

    Orthographic rays are parallel, so a bounding sphere projects to a disc in each image; we keep the
    pixel square around that disc. This culling is what makes pure-numpy rendering fast enough.
    """
    indices = []
    pixel = ortho_scale / res
    for view, pose in enumerate(w2c):
        cam_center = pose[:, :3] @ center + pose[:, 3]
        col = (cam_center[0] / ortho_scale + 0.5) * res - 0.5  # fractional pixel coordinates of the centre
        row = (0.5 - cam_center[1] / ortho_scale) * res - 0.5
        reach = radius / pixel + 1.0
        r0, r1 = max(int(np.floor(row - reach)), 0), min(int(np.ceil(row + reach)), res - 1)
        c0, c1 = max(int(np.floor(col - reach)), 0), min(int(np.ceil(col + reach)), res - 1)
        if r0 > r1 or c0 > c1:
            continue
        rows, cols = np.arange(r0, r1 + 1), np.arange(c0, c1 + 1)
        indices.append((view * res * res + rows[:, None] * res + cols[None, :]).ravel())
    return np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)


def trace(
    obj: SynthObject, origins: np.ndarray, dirs: np.ndarray, w2c: np.ndarray, res: int
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hit over the union of parts: (t [N] with inf for misses, part index [N], -1 for misses).

    origins/dirs must come from `view_rays(w2c, res)` (the culling relies on that pixel order).
    """
    best_t = np.full(len(origins), np.inf)
    best_part = np.full(len(origins), -1, dtype=np.int64)
    for index, part in enumerate(obj.parts):
        rays = candidate_rays(w2c, res, part.shape.center, part.shape.bounding_radius())
        t = part.shape.hit_distance(origins[rays], dirs[rays])
        closer = t < best_t[rays]
        best_t[rays[closer]] = t[closer]
        best_part[rays[closer]] = index
    return best_t, best_part


def shade(obj: SynthObject, points: np.ndarray, normals: np.ndarray, part_index: np.ndarray) -> np.ndarray:
    """Lambert shading with world-fixed lights: albedo * (ambient + sum_l k_l max(0, n . l)), in [0,1]."""
    base = np.empty_like(points)
    for index, part in enumerate(obj.parts):
        mask = part_index == index
        if mask.any():
            base[mask] = albedo(part.material, part.shape.to_local(points[mask]))
    facing = np.stack([normals @ light for light in obj.light_dirs], axis=1)  # [M, L] cosines
    diffuse = np.clip(facing, 0.0, None) @ obj.light_strengths
    return np.clip(base * (obj.ambient + diffuse)[:, None], 0.0, 1.0)


def _surface(obj: SynthObject, points: np.ndarray, part_index: np.ndarray) -> np.ndarray:
    normals = np.zeros_like(points)
    for index, part in enumerate(obj.parts):
        mask = part_index == index
        if mask.any():
            normals[mask] = part.shape.normal_at(points[mask])
    return normals


def render_buffers(obj: SynthObject, w2c: np.ndarray, res: int, supersample: int = 1) -> RenderBuffers:
    """Render every view of `w2c` [V,3,4] at res x res; `supersample` s casts s*s rays per pixel."""
    views, fine = len(w2c), res * supersample
    origins, dirs = view_rays(w2c, fine)
    t, part_index = trace(obj, origins, dirs, w2c, fine)
    hit = np.isfinite(t)
    points = np.full_like(origins, np.nan)
    points[hit] = origins[hit] + t[hit, None] * dirs[hit]
    normals = np.zeros_like(origins)
    colors = np.zeros_like(origins)
    normals[hit] = _surface(obj, points[hit], part_index[hit])
    colors[hit] = shade(obj, points[hit], normals[hit], part_index[hit])
    shape = (views, res, supersample, res, supersample)
    if supersample == 1:
        return RenderBuffers(
            hit.reshape(views, res, res).astype(np.float64),
            colors.reshape(views, res, res, 3),
            normals.reshape(views, res, res, 3),
            points.reshape(views, res, res, 3),
        )
    # Box filter: coverage -> alpha, colours averaged over covered sub-samples (straight alpha).
    coverage = hit.reshape(shape).sum(axis=(2, 4)).astype(np.float64)
    alpha = coverage / supersample**2
    color = colors.reshape(*shape, 3).sum(axis=(2, 4)) / np.maximum(coverage, 1)[..., None]
    normal = normals.reshape(*shape, 3).sum(axis=(2, 4))
    normal /= np.maximum(np.linalg.norm(normal, axis=-1, keepdims=True), 1e-12)
    return RenderBuffers(alpha, color, normal, np.full((views, res, res, 3), np.nan))


def world_to_view_normals(normals: np.ndarray, w2c: np.ndarray) -> np.ndarray:
    """Express world normals [V,R,R,3] in each view's camera frame: n_view = R_view n_world."""
    # row vectors: n_view^T = n_world^T R^T, per view
    flat = normals.reshape(len(w2c), -1, 3)
    return np.stack([view @ pose[:, :3].T for view, pose in zip(flat, w2c)]).reshape(normals.shape)


def encode_rgba(buffers: RenderBuffers) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGBA color and normal images [V,R,R,4]; normals encoded (n + 1) / 2 * 255, alpha = coverage.

    Uncovered pixels are transparent black in both images.
    """
    alpha = np.round(buffers.alpha * 255.0).astype(np.uint8)[..., None]
    covered = alpha > 0
    color = np.where(covered, np.round(buffers.color * 255.0), 0).astype(np.uint8)
    normal = np.where(covered, np.round((buffers.normal + 1.0) * 127.5), 0).astype(np.uint8)
    return np.concatenate([color, alpha], axis=-1), np.concatenate([normal, alpha], axis=-1)
