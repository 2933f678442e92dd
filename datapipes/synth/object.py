"""One synthetic object: its seed, its id, and its render from the reference rig as a MultiViewSample."""

from __future__ import annotations

import hashlib

import numpy as np

from datapipes.cameras import reference_rig_array
from datapipes.sample import VIEW_NAMES, MultiViewSample
from datapipes.synth.render import encode_rgba, render_buffers, world_to_view_normals
from datapipes.synth.scene import random_object

NORMAL_SPACES = ("camera", "world")


def object_seed(base_seed: int, index: int) -> int:
    """Seed of object `index` of a dataset generated with `base_seed` (64-bit, independent streams)."""
    state = np.random.SeedSequence([base_seed, index]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def object_id_for_seed(seed: int) -> str:
    """32 hex characters, like an Objaverse uid; a function of the seed only."""
    return hashlib.sha256(f"gnn3d-synth:{seed}".encode()).hexdigest()[:32]


def render_object(
    seed: int, res: int = 256, supersample: int = 1, normal_space: str = "camera"
) -> MultiViewSample:
    """Render the object of `seed` from the 6 reference views at res x res.

    Returns a MultiViewSample: color/normal RGBA uint8 [6,res,res,4] (normals encoded (n+1)/2*255, alpha =
    coverage), w2c = the reference rig [6,3,4], condition = the front color view.
    normal_space: "camera" (default) stores each view's normals in that view's own camera frame
    (n_view = R_view n_world, Blender axes: x right, y up, z towards the viewer), which is what the
    reference render script writes (BlenderProc 2.5 `enable_normals_output`) and what the reference
    loader's rotation n' = R_cond R_view^T n expects; "world" stores world-space normals.
    `supersample` s > 1 antialiases edges with s*s rays per pixel (alpha becomes fractional).
    """
    if normal_space not in NORMAL_SPACES:
        raise ValueError(f"normal_space must be one of {NORMAL_SPACES}, got {normal_space!r}")
    rig = reference_rig_array(VIEW_NAMES)
    buffers = render_buffers(random_object(seed), rig, res, supersample)
    if normal_space == "camera":
        buffers.normal = world_to_view_normals(buffers.normal, rig)
    color, normal = encode_rgba(buffers)
    return MultiViewSample(
        object_id=object_id_for_seed(seed),
        cond_rgba=color[0].copy(),
        color_rgba=color,
        normal_rgba=normal,
        w2c=rig,
        cond_w2c=rig[0].copy(),
        view_names=VIEW_NAMES,
        source=f"synth:seed={seed}",
    )
