"""The reference rig and camera embedding against the values of Wonder3D's released RT files."""

from __future__ import annotations

import numpy as np
import pytest

from datapipes.cameras import (
    camera_center,
    camera_embedding,
    elevation_azimuth,
    reference_rig,
    reference_rig_array,
    relative_angles,
    rotate_normals_to_cond,
)
from datapipes.sample import VIEW_NAMES

# (d_theta, d_phi) in radians per view, as read from Wonder3D's RT files for the tilted reference ring.
REFERENCE_DELTAS = {
    "front": (0.0, 0.0),
    "front_right": (-0.2362, 0.8124),
    "right": (-0.1686, 1.6935),
    "back": (0.5220, 3.1416),
    "left": (0.6907, 4.8351),
    "front_left": (0.3733, 5.5860),
}


def _rot_z(degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])


def test_reference_rig_is_six_rotations_at_reference_radii():
    rig = reference_rig()
    assert tuple(rig) == VIEW_NAMES
    for view, pose in rig.items():
        assert pose.shape == (3, 4) and pose.dtype == np.float64
        rotation = pose[:, :3]
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-6)
        assert np.linalg.det(rotation) == pytest.approx(1.0, abs=1e-6)
        radius = np.linalg.norm(camera_center(pose))
        expected = 1.838 if view in ("front_right", "front_left") else 1.3
        assert radius == pytest.approx(expected, abs=1e-3), view
    # the file value, spot-checked (the front camera's first row)
    np.testing.assert_allclose(
        rig["front"][0], [0.5266583561897278, -0.7410295009613037, 0.4165407419204712, 0.0]
    )


def test_relative_angles_match_reference_values():
    rig = reference_rig_array()
    d_theta, d_phi = relative_angles(rig[0], rig)
    expected = np.array([REFERENCE_DELTAS[view] for view in VIEW_NAMES])
    np.testing.assert_allclose(d_theta, expected[:, 0], atol=1e-4)
    np.testing.assert_allclose(d_phi, expected[:, 1], atol=1e-4)


@pytest.mark.parametrize(("domain", "one_hot"), [("normal", (1.0, 0.0)), ("color", (0.0, 1.0))])
def test_camera_embedding_matches_reference(domain, one_hot):
    rig = reference_rig_array()
    embedding = camera_embedding(rig[0], rig, domain)
    assert embedding.shape == (6, 10)
    for row, view in zip(embedding, VIEW_NAMES):
        x = np.array([0.0, *REFERENCE_DELTAS[view], *one_hot])  # the reference feeds elevation_cond = 0
        np.testing.assert_allclose(row, np.concatenate([np.sin(x), np.cos(x)]), atol=1e-4, err_msg=view)


def test_camera_embedding_rejects_unknown_domain():
    rig = reference_rig_array()
    with pytest.raises(ValueError, match="domain"):
        camera_embedding(rig[0], rig, "depth")


def test_elevation_azimuth_of_a_constructed_camera():
    # A camera at polar angle 60 deg from +Z and azimuth 30 deg, distance 2; rotation irrelevant to angles.
    theta, phi = np.radians(60.0), np.radians(30.0)
    center = 2.0 * np.array([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)])
    rotation = _rot_z(17.0)
    w2c = np.concatenate([rotation, (-rotation @ center)[:, None]], axis=1)
    got_theta, got_phi = elevation_azimuth(w2c)
    assert got_theta == pytest.approx(theta, abs=1e-12)
    assert got_phi == pytest.approx(phi, abs=1e-12)


def test_rotation_is_identity_for_the_condition_view():
    rig = reference_rig_array()
    normals = np.random.default_rng(0).uniform(-1, 1, size=(5, 7, 3)).astype(np.float32)
    rotated = rotate_normals_to_cond(normals, rig[0], rig[0])
    np.testing.assert_allclose(rotated, normals, atol=1e-6)


def test_rotation_known_case():
    # cond camera = world axes; target rotated 90 deg about z. A view-frame normal n_view = R_t n_world
    # must come back as n_world (the cond frame equals the world frame here).
    cond = np.concatenate([np.eye(3), np.zeros((3, 1))], axis=1)
    target = np.concatenate([_rot_z(90.0), np.zeros((3, 1))], axis=1)
    n_view = np.array([[[0.0, 1.0, 0.0]]])  # = Rz(90) (1, 0, 0)
    np.testing.assert_allclose(rotate_normals_to_cond(n_view, cond, target), [[[1.0, 0.0, 0.0]]], atol=1e-7)


def test_normal_facing_each_camera_lands_on_its_direction_in_cond_frame():
    # A normal facing target camera t is +z in t's (Blender) frame; in the cond frame it must be the
    # direction from the origin to t's centre, an independent quantity (camera centres, not rotations).
    rig = reference_rig_array()
    facing = np.zeros((6, 1, 1, 3), dtype=np.float32)
    facing[..., 2] = 1.0
    rotated = rotate_normals_to_cond(facing, rig[0], rig)[:, 0, 0]
    centers = camera_center(rig)
    expected = (rig[0][:, :3] @ (centers / np.linalg.norm(centers, axis=1, keepdims=True)).T).T
    np.testing.assert_allclose(rotated, expected, atol=1e-5)
