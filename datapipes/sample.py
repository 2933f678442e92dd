"""One decoded multi-view sample: the schema every reader produces and the transform consumes.

A sample is one object: the condition image (the front color view), V target views with a color image and a
normal map each (RGBA, alpha = object mask), and the world->camera pose of every view.
Elevation/azimuth are derived from the poses in `datapipes.cameras`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

VIEW_NAMES: tuple[str, ...] = ("front", "front_right", "right", "back", "left", "front_left")
COND_VIEW = "front"  # the reference conditions on the front color view


class SampleError(ValueError):
    """A bad sample. The message names the object id, the source (shard url / folder) and the key."""

    def __init__(self, object_id: str, key: str, problem: str, source: str = "") -> None:
        self.object_id = object_id
        self.key = key
        self.source = source
        self.problem = problem
        where = f" in {source}" if source else ""
        super().__init__(f"object {object_id!r}{where}: key {key!r}: {problem}")

    def __reduce__(self) -> tuple[type, tuple[str, str, str, str]]:
        # Exceptions pickle as cls(*self.args) by default, which breaks our 4-argument constructor when a
        # worker process (multiprocessing pool, DataLoader) sends the error back.
        return (type(self), (self.object_id, self.key, self.problem, self.source))


@dataclass
class MultiViewSample:
    """One object seen from V views (see module docstring).

    Attributes:
        object_id: unique object id (e.g. an Objaverse uid).
        cond_rgba: uint8 [H, W, 4] condition image, alpha = mask.
        color_rgba: uint8 [V, H, W, 4] target color views in `view_names` order.
        normal_rgba: uint8 [V, H, W, 4] normals encoded as (n + 1) / 2 * 255, alpha = mask, as the
            reference render script stores them: each view's normals in that view's own camera frame
            (BlenderProc 2.5 writes camera-frame normals; the transform's n' = R_cond R_view^T n relies on it).
        w2c: float64 [V, 3, 4] world->camera [R|t] of each target view (the reference RT files use Blender
            camera axes: x right, y up, looking along -z).
        cond_w2c: float64 [3, 4] world->camera of the condition view.
        view_names: names of the V views.
        source: shard url or folder path, only for error messages.
    """

    object_id: str
    cond_rgba: np.ndarray
    color_rgba: np.ndarray
    normal_rgba: np.ndarray
    w2c: np.ndarray
    cond_w2c: np.ndarray
    view_names: tuple[str, ...] = VIEW_NAMES
    source: str = ""

    @property
    def num_views(self) -> int:
        return len(self.view_names)

    def select(self, views: tuple[str, ...]) -> MultiViewSample:
        """The same object with only `views` as targets, in that order; the condition view is kept.

        Raises SampleError naming the views this sample does not hold.
        """
        views = tuple(views)
        if views == self.view_names:
            return self
        absent = [view for view in views if view not in self.view_names]
        if absent or not views:
            raise self.error("view_names", f"views {absent or '[]'} not among stored {self.view_names}")
        index = [self.view_names.index(view) for view in views]
        return replace(
            self,
            color_rgba=self.color_rgba[index],
            normal_rgba=self.normal_rgba[index],
            w2c=self.w2c[index],
            view_names=views,
        )

    def error(self, key: str, problem: str) -> SampleError:
        """Build a SampleError for this sample (caller raises it)."""
        return SampleError(self.object_id, key, problem, self.source)

    def validate(self) -> None:
        """Check shapes, dtypes and finite rotations; raise SampleError naming object, source and key."""
        if not isinstance(self.object_id, str) or not self.object_id:
            raise self.error("object_id", f"must be a non-empty str, got {self.object_id!r}")
        self._check_image("cond_rgba", self.cond_rgba, ndim=3)
        height, width = self.cond_rgba.shape[:2]
        views = self.num_views
        for key in ("color_rgba", "normal_rgba"):
            image = self._check_image(key, getattr(self, key), ndim=4)
            if image.shape != (views, height, width, 4):
                raise self.error(key, f"shape {image.shape} != expected {(views, height, width, 4)}")
        self._check_pose("cond_w2c", self.cond_w2c, (3, 4))
        self._check_pose("w2c", self.w2c, (views, 3, 4))

    def _check_image(self, key: str, image: object, ndim: int) -> np.ndarray:
        if not isinstance(image, np.ndarray):
            raise self.error(key, f"must be a numpy array, got {type(image).__name__}")
        if image.dtype != np.uint8:
            raise self.error(key, f"dtype {image.dtype} != uint8")
        if image.ndim != ndim or image.shape[-1] != 4:
            raise self.error(key, f"shape {image.shape} is not {'[V, ' if ndim == 4 else '['}H, W, 4] RGBA")
        if image.shape[-2] < 1 or image.shape[-3] < 1:
            raise self.error(key, f"empty image of shape {image.shape}")
        return image

    def _check_pose(self, key: str, pose: object, shape: tuple[int, ...]) -> None:
        if not isinstance(pose, np.ndarray):
            raise self.error(key, f"must be a numpy array, got {type(pose).__name__}")
        if pose.shape != shape:
            raise self.error(key, f"shape {pose.shape} != expected {shape}")
        if not np.issubdtype(pose.dtype, np.floating):
            raise self.error(key, f"dtype {pose.dtype} is not floating point")
        if not np.all(np.isfinite(pose)):
            raise self.error(key, "contains NaN or inf")
        rotation = pose[..., :3]
        identity = np.eye(3)
        gram = rotation @ np.swapaxes(rotation, -1, -2)
        # Reference RT files are written with ~6 decimals, so allow a loose orthonormality tolerance.
        if not np.allclose(gram, identity, atol=1e-3):
            raise self.error(key, "rotation part is not orthonormal (R R^T != I)")
