"""Analytic ray-primitive intersections for the procedural renderer.

Every primitive answers two vectorised questions:
- `hit_distance(origins [N,3], dirs [N,3]) -> t [N]`: distance along the (unit) ray to the first surface hit
  in front of the origin, `inf` where the ray misses;
- `normal_at(points [M,3]) -> [M,3]`: the exact outward unit normal at points on the surface (world space).
Oriented primitives keep a local frame (`rotation` maps local -> world, columns are the local axes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_EPS = 1e-9


def _nearest_positive(*candidates: np.ndarray) -> np.ndarray:
    """Element-wise smallest candidate t > eps, inf where none is (NaN counts as a miss)."""
    best = np.full(candidates[0].shape, np.inf)
    for t in candidates:
        valid = t > 1e-7  # NaN compares False, so it never wins
        best = np.where(valid & (t < best), t, best)
    return best


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), _EPS)


@dataclass
class Primitive:
    """Base class: a local frame (centre, rotation local->world) shared by every shape."""

    center: np.ndarray  # [3] world
    rotation: np.ndarray  # [3,3] local -> world

    def to_local(self, points: np.ndarray) -> np.ndarray:
        """World points [N,3] -> local coordinates [N,3] (row vectors: (p - c) R)."""
        return (points - self.center) @ self.rotation

    def dir_to_local(self, dirs: np.ndarray) -> np.ndarray:
        return dirs @ self.rotation

    def normal_to_world(self, normals_local: np.ndarray) -> np.ndarray:
        return normals_local @ self.rotation.T

    def bounding_radius(self) -> float:  # pragma: no cover - overridden
        raise NotImplementedError

    def aabb_half_extents(self) -> np.ndarray:  # pragma: no cover - overridden
        """Half sizes [3] of the exact world axis-aligned bounding box around `center`."""
        raise NotImplementedError

    def hit_distance(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def normal_at(self, points: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


@dataclass
class Sphere(Primitive):
    radius: float = 0.3

    def bounding_radius(self) -> float:
        return self.radius

    def aabb_half_extents(self) -> np.ndarray:
        return np.full(3, self.radius)

    def hit_distance(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        offset = origins - self.center
        half_b = np.einsum("ij,ij->i", offset, dirs)
        c = np.einsum("ij,ij->i", offset, offset) - self.radius**2
        disc = half_b * half_b - c
        root = np.sqrt(np.where(disc >= 0, disc, np.nan))
        return _nearest_positive(-half_b - root, -half_b + root)

    def normal_at(self, points: np.ndarray) -> np.ndarray:
        return _unit(points - self.center)


@dataclass
class Box(Primitive):
    half_extents: np.ndarray = field(default_factory=lambda: np.full(3, 0.2))  # [3] local half sizes

    def bounding_radius(self) -> float:
        return float(np.linalg.norm(self.half_extents))

    def aabb_half_extents(self) -> np.ndarray:
        return np.abs(self.rotation) @ self.half_extents

    def hit_distance(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        # Slab method in the local frame; a zero direction component gives +-inf, which min/max handle.
        local_o, local_d = self.to_local(origins), self.dir_to_local(dirs)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / local_d
            t1 = (-self.half_extents - local_o) * inv
            t2 = (self.half_extents - local_o) * inv
        t_near = np.nanmax(np.minimum(t1, t2), axis=1)
        t_far = np.nanmin(np.maximum(t1, t2), axis=1)
        hit = (t_near <= t_far) & (t_far > 1e-7)
        t = np.where(t_near > 1e-7, t_near, t_far)  # origin inside the box: exit face
        return np.where(hit, t, np.inf)

    def normal_at(self, points: np.ndarray) -> np.ndarray:
        local = self.to_local(points) / self.half_extents
        axis = np.argmax(np.abs(local), axis=1)
        normals = np.zeros_like(local)
        rows = np.arange(len(local))
        normals[rows, axis] = np.sign(local[rows, axis])
        return self.normal_to_world(normals)


@dataclass
class Cylinder(Primitive):
    """Capped cylinder along the local z axis: x^2 + y^2 <= radius^2, |z| <= half_height."""

    radius: float = 0.2
    half_height: float = 0.3

    def bounding_radius(self) -> float:
        return float(np.hypot(self.radius, self.half_height))

    def aabb_half_extents(self) -> np.ndarray:
        axis = self.rotation[:, 2]  # world direction of the local z axis
        return self.half_height * np.abs(axis) + self.radius * np.sqrt(np.clip(1.0 - axis**2, 0.0, None))

    def hit_distance(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        o, d = self.to_local(origins), self.dir_to_local(dirs)
        a = d[:, 0] ** 2 + d[:, 1] ** 2
        half_b = o[:, 0] * d[:, 0] + o[:, 1] * d[:, 1]
        c = o[:, 0] ** 2 + o[:, 1] ** 2 - self.radius**2
        with np.errstate(divide="ignore", invalid="ignore"):
            disc = half_b * half_b - a * c
            root = np.sqrt(np.where((disc >= 0) & (a > _EPS), disc, np.nan))
            side = [(-half_b - root) / a, (-half_b + root) / a]
            caps = [(self.half_height - o[:, 2]) / d[:, 2], (-self.half_height - o[:, 2]) / d[:, 2]]
        side = [np.where(np.abs(o[:, 2] + t * d[:, 2]) <= self.half_height, t, np.nan) for t in side]
        radial = self.radius**2 + 1e-12
        caps = [
            np.where((o[:, 0] + t * d[:, 0]) ** 2 + (o[:, 1] + t * d[:, 1]) ** 2 <= radial, t, np.nan)
            for t in caps
        ]
        return _nearest_positive(*side, *caps)

    def normal_at(self, points: np.ndarray) -> np.ndarray:
        local = self.to_local(points)
        radial = np.hypot(local[:, 0], local[:, 1]) / self.radius
        on_cap = np.abs(local[:, 2]) / self.half_height >= radial
        side_normal = np.stack([local[:, 0], local[:, 1], np.zeros(len(local))], axis=1)
        cap_normal = np.zeros_like(local)
        cap_normal[:, 2] = np.sign(local[:, 2])
        normals = np.where(on_cap[:, None], cap_normal, _unit(side_normal))
        return self.normal_to_world(normals)


@dataclass
class Torus(Primitive):
    """Torus around the local z axis: (sqrt(x^2 + y^2) - major)^2 + z^2 = minor^2."""

    major: float = 0.3
    minor: float = 0.1
    march_steps: int = 512  # few rays need many steps (grazing ones); the live set is compacted

    def bounding_radius(self) -> float:
        return self.major + self.minor

    def aabb_half_extents(self) -> np.ndarray:
        axis = self.rotation[:, 2]
        return self.minor + self.major * np.sqrt(np.clip(1.0 - axis**2, 0.0, None))

    def _sdf(self, p: np.ndarray) -> np.ndarray:
        ring = np.hypot(p[:, 0], p[:, 1]) - self.major
        return np.hypot(ring, p[:, 2]) - self.minor

    def hit_distance(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        # The quartic has no cheap stable vectorised closed form, so: restrict to rays through the
        # bounding sphere, sphere-trace the exact torus SDF (never overshoots), then polish with Newton
        # steps on the quartic so hit points sit on the surface to ~1e-10.
        o, d = self.to_local(origins), self.dir_to_local(dirs)
        t_enter = Sphere(np.zeros(3), np.eye(3), self.bounding_radius() + 1e-4).hit_distance(o, d)
        result = np.full(len(o), np.inf)
        active = np.nonzero(np.isfinite(t_enter))[0]
        if active.size == 0:
            return result
        o_a, d_a = o[active], d[active]
        # start on the bounding sphere (or at the ray origin if already inside it)
        bound = self.bounding_radius() + 1e-4
        inside = np.einsum("ij,ij->i", o_a, o_a) < bound**2
        t = np.where(inside, 0.0, t_enter[active])
        t_exit = t + 2.0 * bound
        hit_t = self._march(o_a, d_a, t, t_exit)
        found = np.isfinite(hit_t)
        hit_t[found] = self._newton(o_a[found], d_a[found], hit_t[found])
        result[active] = hit_t
        return result

    def _march(self, o: np.ndarray, d: np.ndarray, t: np.ndarray, t_exit: np.ndarray) -> np.ndarray:
        """Sphere tracing, compacting the set of live rays every few steps. Returns t or inf (miss)."""
        hit_t = np.full(len(o), np.inf)
        live = np.arange(len(o))
        for _ in range(self.march_steps // 4):
            for _ in range(4):
                t = t + self._sdf(o[live] + t[:, None] * d[live])
            distance = self._sdf(o[live] + t[:, None] * d[live])
            done = distance < 1e-5
            hit_t[live[done]] = t[done]
            keep = ~done & (t < t_exit[live])
            live, t = live[keep], t[keep]
            if live.size == 0:
                break
        return hit_t

    def _newton(self, o: np.ndarray, d: np.ndarray, t: np.ndarray, steps: int = 3) -> np.ndarray:
        big, small = self.major**2, self.minor**2
        for _ in range(steps):
            p = o + t[:, None] * d
            sq = np.einsum("ij,ij->i", p, p)
            value = (sq + big - small) ** 2 - 4 * big * (p[:, 0] ** 2 + p[:, 1] ** 2)
            grad_sq = 2 * np.einsum("ij,ij->i", p, d)
            grad = 2 * (sq + big - small) * grad_sq - 8 * big * (p[:, 0] * d[:, 0] + p[:, 1] * d[:, 1])
            with np.errstate(divide="ignore", invalid="ignore"):
                step = np.where(np.abs(grad) > 1e-12, value / grad, 0.0)
            t = t - np.clip(step, -1e-3, 1e-3)  # marching already got within 1e-4; stay on this root
        return t

    def normal_at(self, points: np.ndarray) -> np.ndarray:
        local = self.to_local(points)
        ring_dir = _unit(np.stack([local[:, 0], local[:, 1], np.zeros(len(local))], axis=1))
        return self.normal_to_world(_unit(local - self.major * ring_dir))
