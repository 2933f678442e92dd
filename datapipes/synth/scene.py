"""Random procedural objects: unions of spheres, boxes, cylinders and tori with simple textures.

An object is generated deterministically from a seed, then normalised much like the reference Blender
script (`normalize_scene`): centred on its bounding box and scaled to fill the reference orthographic
frame (ortho scale 1.25) from every view (see `normalize_parts`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from datapipes.synth.primitives import Box, Cylinder, Primitive, Sphere, Torus

PRIMITIVE_KINDS = ("sphere", "box", "cylinder", "torus")
TEXTURES = ("solid", "checker", "stripes")
FILL_SIDE = 0.9  # world units; the reference orthographic frame is 1.25 wide
MAX_DIAGONAL = 1.15
_SIZE_FIELDS = {
    Sphere: ("radius",),
    Box: ("half_extents",),
    Cylinder: ("radius", "half_height"),
    Torus: ("major", "minor"),
}


@dataclass
class Material:
    """Albedo in [0,1]: `base` everywhere, or alternating with `accent` in a local-space pattern."""

    base: np.ndarray  # [3]
    accent: np.ndarray  # [3]
    texture: str = "solid"
    frequency: float = 8.0  # pattern cells per unit length (in the primitive's local frame)
    axis: int = 2  # stripes run across this local axis


@dataclass
class Part:
    shape: Primitive
    material: Material


@dataclass
class SynthObject:
    """A union of parts plus its lighting (world-fixed, so every view sees the same lit object)."""

    parts: list[Part]
    light_dirs: np.ndarray  # [L, 3] unit vectors pointing towards the lights
    light_strengths: np.ndarray  # [L]
    ambient: float


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random 3x3 rotation (QR of a Gaussian matrix, signs fixed, det +1)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def random_shape(kind: str, rng: np.random.Generator, center: np.ndarray) -> Primitive:
    """One primitive of `kind` with random size and orientation, in arbitrary units (normalised later)."""
    rotation = random_rotation(rng)
    if kind == "sphere":
        return Sphere(center, rotation, radius=rng.uniform(0.2, 0.45))
    if kind == "box":
        return Box(center, rotation, half_extents=rng.uniform(0.12, 0.4, size=3))
    if kind == "cylinder":
        return Cylinder(center, rotation, radius=rng.uniform(0.1, 0.3), half_height=rng.uniform(0.15, 0.45))
    if kind == "torus":
        major = rng.uniform(0.2, 0.4)
        return Torus(center, rotation, major=major, minor=rng.uniform(0.25, 0.5) * major)
    raise ValueError(f"unknown primitive kind {kind!r}; expected one of {PRIMITIVE_KINDS}")


def random_material(rng: np.random.Generator) -> Material:
    base = rng.uniform(0.1, 0.95, size=3)
    accent = np.clip(base * rng.uniform(0.2, 0.6) + rng.uniform(0.0, 0.4, size=3), 0.0, 1.0)
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    return Material(base, accent, texture, frequency=float(rng.uniform(4.0, 14.0)), axis=int(rng.integers(3)))


def scale_shape(shape: Primitive, offset: np.ndarray, scale: float) -> Primitive:
    """The shape moved by `offset`, then scaled about the origin by `scale` (sizes scale too)."""
    sizes = {name: getattr(shape, name) * scale for name in _SIZE_FIELDS[type(shape)]}
    return dataclasses.replace(shape, center=(shape.center + offset) * scale, **sizes)


def normalize_parts(parts: list[Part]) -> list[Part]:
    """Centre the bounding box at the origin and scale it to fill the frame.

    The reference script scales the box diagonal to 1; our compact unions then look small, so the longest
    side is scaled to FILL_SIDE instead, capped so the diagonal stays <= MAX_DIAGONAL (< ortho scale 1.25:
    the object stays inside the frame from any direction).
    """
    centers = np.stack([part.shape.center for part in parts])
    half = np.stack([part.shape.aabb_half_extents() for part in parts])
    low, high = (centers - half).min(axis=0), (centers + half).max(axis=0)
    size = high - low
    scale = min(FILL_SIDE / float(size.max()), MAX_DIAGONAL / float(np.linalg.norm(size)))
    offset = -(low + high) / 2
    return [Part(scale_shape(part.shape, offset, scale), part.material) for part in parts]


def random_object(seed: int, max_parts: int = 4) -> SynthObject:
    """A deterministic random object: 1..max_parts primitives near each other, textures and lights."""
    rng = np.random.default_rng(seed)
    num_parts = int(rng.integers(1, max_parts + 1))
    parts = []
    for index in range(num_parts):
        center = np.zeros(3) if index == 0 else rng.normal(0.0, 0.25, size=3)
        kind = PRIMITIVE_KINDS[int(rng.integers(len(PRIMITIVE_KINDS)))]
        parts.append(Part(random_shape(kind, rng, center), random_material(rng)))
    light_dirs = np.stack([rng.normal(size=3) for _ in range(2)])
    light_dirs /= np.linalg.norm(light_dirs, axis=1, keepdims=True)
    strengths = np.array([rng.uniform(0.6, 0.9), rng.uniform(0.15, 0.35)])
    return SynthObject(normalize_parts(parts), light_dirs, strengths, ambient=float(rng.uniform(0.25, 0.4)))


def albedo(material: Material, local_points: np.ndarray) -> np.ndarray:
    """Albedo [M,3] at points given in the primitive's local frame."""
    if material.texture == "solid":
        return np.broadcast_to(material.base, local_points.shape).copy()
    cells = np.floor(local_points * material.frequency).astype(np.int64)
    if material.texture == "checker":
        odd = cells.sum(axis=1) % 2 == 1
    else:
        odd = cells[:, material.axis] % 2 == 1
    return np.where(odd[:, None], material.accent, material.base)
