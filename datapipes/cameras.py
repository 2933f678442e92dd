"""The reference camera rig and the camera embedding of Wonder3D (`e_de_da_sincos`).

Conventions (as in the reference dataset code):
- poses are world->camera [R|t] (3x4); the reference RT files use Blender camera axes (x right, y up,
  looking along -z, written without the OpenCV flip); the camera centre is C = -R^T t;
- polar angle theta is measured from the world +Z axis, azimuth phi = atan2(y, x) of the camera centre;
- per target view: d_theta = theta_t - theta_cond, d_phi = (phi_t - phi_cond) mod 2*pi;
- the reference feeds elevation_cond = 0 for every view (it never uses the real theta_cond);
- embedding = [sin(x), cos(x)] of x = [elev_cond, d_theta, d_phi, domain one-hot], domain normal = [1, 0],
  color = [0, 1] -> 10 values per view.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from datapipes.sample import VIEW_NAMES

Domain = Literal["normal", "color"]
DOMAIN_ONE_HOT: dict[str, tuple[float, float]] = {"normal": (1.0, 0.0), "color": (0.0, 1.0)}

# World->camera poses of Wonder3D's `mvdiffusion/data/fixed_poses/nine_views/000_{view}_RT.txt`
# (orthographic rig, radius 1.3, 1.838 for the diagonal views; the ring is tilted). Numbers transcribed
# as data: the released checkpoint was trained with exactly these, so keep them bit-for-bit.
_REFERENCE_RT_TEXT: dict[str, str] = {
    "front": """
5.266583561897277832e-01 -7.410295009613037109e-01 4.165407419204711914e-01 0.000000000000000000e+00
5.865638996738198330e-08 4.900035560131072998e-01 8.717204332351684570e-01 9.462351613365171943e-08
-8.500770330429077148e-01 -4.590988159179687500e-01 2.580645382404327393e-01 -1.300000071525573730e+00
""",
    "front_right": """
9.734989404678344727e-01 -1.993551850318908691e-01 1.120596975088119507e-01 -1.415610313415527344e-07
3.790224578636980368e-09 4.900034964084625244e-01 8.717204928398132324e-01 -1.772203575001185527e-07
-2.286916375160217285e-01 -8.486189246177673340e-01 4.770178794860839844e-01 -1.838477611541748047e+00
""",
    "right": """
8.500770330429077148e-01 4.590989053249359131e-01 -2.580644488334655762e-01 5.960464477539062500e-08
-4.257411134744870651e-08 4.900034964084625244e-01 8.717204928398132324e-01 -9.006067358541258727e-08
5.266583561897277832e-01 -7.410295605659484863e-01 4.165407419204711914e-01 -1.300000071525573730e+00
""",
    "back": """
-5.266582965850830078e-01 7.410295009613037109e-01 -4.165407419204711914e-01 -5.960464477539062500e-08
5.865638996738198330e-08 4.900035560131072998e-01 8.717204332351684570e-01 -9.462351613365171943e-08
8.500770330429077148e-01 4.590988159179687500e-01 -2.580644786357879639e-01 -1.300000071525573730e+00
""",
    "left": """
-8.500771522521972656e-01 -4.590989053249359131e-01 2.580644488334655762e-01 0.000000000000000000e+00
-4.257411134744870651e-08 4.900034964084625244e-01 8.717204928398132324e-01 9.006067358541258727e-08
-5.266583561897277832e-01 7.410295605659484863e-01 -4.165408313274383545e-01 -1.300000071525573730e+00
""",
    "front_left": """
-2.286916971206665039e-01 -8.486189842224121094e-01 4.770179092884063721e-01 -2.458691596984863281e-07
9.085837859856837895e-09 4.900034666061401367e-01 8.717205524444580078e-01 1.205695667749751010e-07
-9.734990000724792480e-01 1.993551701307296753e-01 -1.120597645640373230e-01 -1.838477969169616699e+00
""",
}


def reference_rig() -> dict[str, np.ndarray]:
    """World->camera poses of the 6 reference views, {view name: float64 [3, 4]} in VIEW_NAMES order."""
    return {view: _parse_rt(_REFERENCE_RT_TEXT[view]) for view in VIEW_NAMES}


def reference_rt_text(view: str) -> str:
    """The reference's `000_{view}_RT.txt` file content, byte for byte."""
    return _REFERENCE_RT_TEXT[view].lstrip("\n")


def _parse_rt(text: str) -> np.ndarray:
    """3 lines of 4 numbers (the reference's np.savetxt format) -> float64 [3, 4], parsed exactly."""
    return np.array(text.split(), dtype=np.float64).reshape(3, 4)


def reference_rig_array(view_names: tuple[str, ...] = VIEW_NAMES) -> np.ndarray:
    """The reference poses stacked in `view_names` order: float64 [V, 3, 4]."""
    rig = reference_rig()
    return np.stack([rig[view] for view in view_names])


def camera_center(w2c: np.ndarray) -> np.ndarray:
    """Camera centre C = -R^T t in world units. w2c [..., 3, 4] -> [..., 3]."""
    rotation, translation = w2c[..., :3], w2c[..., 3]
    return -np.einsum("...ji,...j->...i", rotation, translation)


def elevation_azimuth(w2c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Polar angle from +Z and azimuth atan2(y, x) of the camera centre, in radians.

    w2c: [..., 3, 4] world->camera. Returns (theta, phi), each [...]; theta in [0, pi], phi in (-pi, pi].
    """
    center = camera_center(np.asarray(w2c, dtype=np.float64))
    planar = np.hypot(center[..., 0], center[..., 1])
    theta = np.arctan2(planar, center[..., 2])
    phi = np.arctan2(center[..., 1], center[..., 0])
    return theta, phi


def relative_angles(cond_w2c: np.ndarray, target_w2c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(d_theta [V], d_phi [V]) of target views relative to the condition view, as the reference computes.

    cond_w2c [3, 4], target_w2c [V, 3, 4]; d_phi is wrapped to [0, 2*pi).
    """
    theta_cond, phi_cond = elevation_azimuth(cond_w2c)
    theta_target, phi_target = elevation_azimuth(target_w2c)
    return theta_target - theta_cond, np.mod(phi_target - phi_cond, 2 * np.pi)


def camera_embedding(
    cond_w2c: np.ndarray, target_w2c: np.ndarray, domain: Domain, cond_elevation: float = 0.0
) -> np.ndarray:
    """The reference `e_de_da_sincos` camera + domain embedding.

    Args:
        cond_w2c: float [3, 4] world->camera of the condition view.
        target_w2c: float [V, 3, 4] world->camera of the target views.
        domain: "normal" (one-hot [1, 0]) or "color" ([0, 1]).
        cond_elevation: the first entry of x; the reference always feeds 0 (radians).
    Returns:
        float64 [V, 10] = [sin(x), cos(x)] with x = [cond_elevation, d_theta, d_phi, one-hot(2)].
    """
    if domain not in DOMAIN_ONE_HOT:
        raise ValueError(f"domain must be 'normal' or 'color', got {domain!r}")
    target_w2c = np.asarray(target_w2c, dtype=np.float64)
    d_theta, d_phi = relative_angles(np.asarray(cond_w2c, dtype=np.float64), target_w2c)
    views = target_w2c.shape[0]
    x = np.empty((views, 5), dtype=np.float64)
    x[:, 0] = cond_elevation
    x[:, 1] = d_theta
    x[:, 2] = d_phi
    x[:, 3:] = DOMAIN_ONE_HOT[domain]
    return np.concatenate([np.sin(x), np.cos(x)], axis=-1)


def relative_rotation(cond_w2c: np.ndarray, target_w2c: np.ndarray) -> np.ndarray:
    """The rotation R_cond R_target^-1 the reference (`trans_normal`) applies to a target view's normals.

    For exact rotations this is R_cond R_target^T; the inverse is kept because the stored RT files are only
    orthonormal to ~1e-7 and the released checkpoint saw the reference's numbers.
    cond_w2c [3, 4], target_w2c [..., 3, 4] -> [..., 3, 3].
    """
    r_cond = np.asarray(cond_w2c, dtype=np.float64)[:3, :3]
    r_target = np.asarray(target_w2c, dtype=np.float64)[..., :3, :3]
    return r_cond @ np.linalg.inv(r_target)


def rotate_normals_to_cond(normals: np.ndarray, cond_w2c: np.ndarray, target_w2c: np.ndarray) -> np.ndarray:
    """Rotate normals (in [-1, 1]) of target views as the reference does: n' = R_cond R_target^-1 n.

    With normals stored in each target's own camera frame (what the reference render script writes),
    R_target^-1 takes them to world space and R_cond into the condition camera frame.

    normals: float [V, H, W, 3] (or [H, W, 3] with target_w2c [3, 4]).
    cond_w2c: [3, 4]; target_w2c: [V, 3, 4] (or [3, 4]). Returns float32 of the same shape as normals.
    """
    rotation = relative_rotation(cond_w2c, target_w2c).astype(np.float32)  # [V, 3, 3] or [3, 3]
    normals = np.asarray(normals, dtype=np.float32)
    if rotation.ndim == 3:
        rotation = rotation[:, None, None]  # broadcast over H, W
    # n'_i = sum_j R_ij n_j as three broadcast multiply-adds: far faster than matmul/einsum with 3x3 inner dims
    out = normals[..., 0:1] * rotation[..., :, 0]
    out += normals[..., 1:2] * rotation[..., :, 1]
    out += normals[..., 2:3] * rotation[..., :, 2]
    return out
