"""Procedural renderer: exact normals, alpha = coverage, culling, determinism, layout and CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datapipes.cameras import reference_rig_array, reference_rt_text
from datapipes.sample import VIEW_NAMES
from datapipes.synth import (
    object_folder,
    object_id_for_seed,
    object_seed,
    random_object,
    render_object,
    write_object,
)
from datapipes.synth.primitives import Box, Cylinder, Sphere, Torus
from datapipes.synth.render import ORTHO_SCALE, render_buffers, trace, view_rays
from datapipes.synth.scene import Material, Part, SynthObject, random_rotation
from launcher import synth as synth_cli

REPO = Path(__file__).resolve().parents[2]


def _single(shape) -> SynthObject:
    material = Material(np.full(3, 0.8), np.full(3, 0.2))
    return SynthObject([Part(shape, material)], np.array([[0.0, 0.0, 1.0]]), np.array([0.7]), ambient=0.3)


def _covered(buffers):
    hit = buffers.alpha > 0
    return buffers.points[hit], buffers.normal[hit]


def test_sphere_normals_are_exact_and_unit():
    center, radius = np.array([0.05, -0.1, 0.02]), 0.3
    buffers = render_buffers(_single(Sphere(center, np.eye(3), radius=radius)), reference_rig_array(), 32)
    points, normals = _covered(buffers)
    assert len(points) > 6 * 100
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(points - center, axis=1), radius, atol=1e-9)
    np.testing.assert_allclose(normals, (points - center) / radius, atol=1e-9)


def test_box_normals_are_face_axes():
    half = np.array([0.3, 0.2, 0.1])
    buffers = render_buffers(
        _single(Box(np.zeros(3), np.eye(3), half_extents=half)), reference_rig_array(), 32
    )
    points, normals = _covered(buffers)
    axis = np.argmax(np.abs(normals), axis=1)
    # exactly one non-zero component, +-1, and the hit point lies on that face's plane
    np.testing.assert_array_equal(np.abs(normals).sum(axis=1), 1.0)
    rows = np.arange(len(points))
    np.testing.assert_allclose(points[rows, axis], normals[rows, axis] * half[axis], atol=1e-9)
    assert np.all(np.abs(points) <= half + 1e-9)
    assert len(np.unique(axis)) == 3  # the tilted rig sees all three face orientations


@pytest.mark.parametrize("kind", ["cylinder", "torus"])
def test_curved_surfaces_satisfy_implicit_equation_and_gradient(kind):
    rotation = random_rotation(np.random.default_rng(3))
    if kind == "cylinder":
        shape = Cylinder(np.zeros(3), rotation, radius=0.2, half_height=0.3)
    else:
        shape = Torus(np.zeros(3), rotation, major=0.3, minor=0.1)
    points, normals = _covered(render_buffers(_single(shape), reference_rig_array(), 24))
    local = shape.to_local(points)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-12)
    if kind == "cylinder":
        radial = np.hypot(local[:, 0], local[:, 1])
        on_side = np.abs(radial - 0.2) < 1e-9
        on_cap = np.abs(np.abs(local[:, 2]) - 0.3) < 1e-9
        assert np.all(on_side | on_cap) and on_side.any() and on_cap.any()
        expected = np.where(
            on_cap[:, None],
            [0, 0, 1] * np.sign(local[:, 2:3]),
            np.c_[local[:, :2] / 0.2, np.zeros(len(local))],
        )
    else:
        ring = np.hypot(local[:, 0], local[:, 1]) - 0.3
        np.testing.assert_allclose(np.hypot(ring, local[:, 2]), 0.1, atol=1e-7)
        ring_point = 0.3 * local[:, :2] / np.hypot(local[:, 0], local[:, 1])[:, None]
        expected = (local - np.c_[ring_point, np.zeros(len(local))]) / 0.1
    np.testing.assert_allclose(shape.to_local(normals + shape.center), expected, atol=1e-6)


def test_torus_tracing_misses_no_ray_that_enters_it():
    # Sphere tracing slows down on grazing rays; every ray with a sample point inside the torus must hit.
    shape = Torus(np.zeros(3), random_rotation(np.random.default_rng(0)), major=0.35, minor=0.12)
    origins, dirs = view_rays(reference_rig_array()[:3], 40)
    t = shape.hit_distance(origins, dirs)
    local_o, local_d = shape.to_local(origins), shape.dir_to_local(dirs)
    inside = np.zeros(len(origins), dtype=bool)
    for step in np.linspace(0.5, 2.2, 1500):
        p = local_o + step * local_d
        inside |= np.hypot(np.hypot(p[:, 0], p[:, 1]) - 0.35, p[:, 2]) < 0.12
    assert inside.sum() > 500
    assert not (inside & ~np.isfinite(t)).any()


def test_alpha_matches_analytic_coverage():
    radius, res = 0.35, 64
    disc_pixels = np.pi * radius**2 / (ORTHO_SCALE / res) ** 2
    obj = _single(Sphere(np.zeros(3), np.eye(3), radius=radius))
    hard = render_buffers(obj, reference_rig_array()[:2], res)
    assert set(np.unique(hard.alpha)) == {0.0, 1.0}
    np.testing.assert_allclose(hard.alpha.sum(axis=(1, 2)), disc_pixels, rtol=0.02)
    soft = render_buffers(obj, reference_rig_array()[:2], res, supersample=4)
    np.testing.assert_allclose(soft.alpha.sum(axis=(1, 2)), disc_pixels, rtol=0.005)
    assert ((soft.alpha > 0) & (soft.alpha < 1)).any(), "edge pixels get fractional coverage"


def test_culling_matches_brute_force_tracing():
    rig, res = reference_rig_array(), 24
    origins, dirs = view_rays(rig, res)
    for seed in range(4):
        obj = random_object(seed)
        t, part = trace(obj, origins, dirs, rig, res)
        brute = np.stack([p.shape.hit_distance(origins, dirs) for p in obj.parts])
        np.testing.assert_array_equal(t, brute.min(axis=0))
        hit = np.isfinite(t)
        np.testing.assert_array_equal(part[hit], brute.argmin(axis=0)[hit])


@pytest.mark.parametrize("seed", [object_seed(0, i) for i in range(6)])
def test_random_objects_fill_but_stay_inside_the_frame(seed):
    sample = render_object(seed, 32)
    sample.validate()
    alpha = sample.color_rgba[..., 3]
    coverage = (alpha > 0).mean(axis=(1, 2))
    assert np.all(coverage > 0.03) and np.all(coverage < 0.8), coverage
    border = np.concatenate([alpha[:, 0], alpha[:, -1], alpha[:, :, 0], alpha[:, :, -1]], axis=1)
    assert not border.any(), "object cut off by the frame"
    np.testing.assert_array_equal(sample.color_rgba[..., 3], sample.normal_rgba[..., 3])
    np.testing.assert_array_equal(sample.cond_rgba, sample.color_rgba[0])


def test_camera_frame_normals_are_world_normals_rotated_per_view():
    seed = object_seed(0, 2)
    camera = render_object(seed, 32, normal_space="camera").normal_rgba
    world = render_object(seed, 32, normal_space="world").normal_rgba
    rig = reference_rig_array()
    covered = world[..., 3] > 0
    decoded = world[..., :3].astype(np.float64) / 127.5 - 1.0
    rotated = np.einsum("vij,vhwj->vhwi", rig[:, :, :3], decoded)
    np.testing.assert_allclose((camera[..., :3] / 127.5 - 1.0)[covered], rotated[covered], atol=2.5 / 127.5)


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_written_folder_layout_is_lossless_and_deterministic(tmp_path, fmt):
    seed = object_seed(5, 0)
    sample = render_object(seed, 16)
    first = write_object(sample, tmp_path / "a", fmt)
    second = write_object(render_object(seed, 16), tmp_path / "b", fmt)
    uid = object_id_for_seed(seed)
    assert first == object_folder(tmp_path / "a", uid) and first.parent.name == uid[:2]
    names = sorted(path.name for path in first.iterdir())
    images = [f"{kind}_000_{view}.{fmt}" for kind in ("rgb", "normals") for view in VIEW_NAMES]
    assert names == sorted(images + [f"000_{view}_RT.txt" for view in VIEW_NAMES])
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    for index, view in enumerate(VIEW_NAMES):
        rt_text = (first / f"000_{view}_RT.txt").read_text()
        assert rt_text == reference_rt_text(view), "RT files must equal the reference rig files byte for byte"
        np.testing.assert_array_equal(np.loadtxt(io.StringIO(rt_text)), sample.w2c[index])
        with Image.open(io.BytesIO((first / f"rgb_000_{view}.{fmt}").read_bytes())) as image:
            assert image.mode == "RGBA"
            np.testing.assert_array_equal(np.asarray(image), sample.color_rgba[index])
        with Image.open(first / f"normals_000_{view}.{fmt}") as image:
            np.testing.assert_array_equal(np.asarray(image), sample.normal_rgba[index])


def test_different_seeds_give_different_objects():
    a, b = render_object(object_seed(0, 0), 16), render_object(object_seed(0, 1), 16)
    assert a.object_id != b.object_id
    assert not np.array_equal(a.color_rgba, b.color_rgba)


def test_cli_renders_resumes_and_lists_objects(tmp_path, capsys):
    out = tmp_path / "synth"
    summary = synth_cli.main(["--out", str(out), "--objects", "3", "--res", "16", "--workers", "1"])
    assert summary["rendered"] == 3
    listing = json.loads((out / "synth_objects.json").read_text())
    assert listing["object_ids"] == sorted(object_id_for_seed(object_seed(0, i)) for i in range(3))
    for uid in listing["object_ids"]:
        assert len(list(object_folder(out, uid).iterdir())) == 18
    stale = object_folder(out, listing["object_ids"][0]).parent / ".deadbeef.tmp"
    stale.mkdir()  # what a killed run leaves behind
    again = synth_cli.main(["--out", str(out), "--objects", "4", "--res", "16", "--workers", "2"])
    assert (again["rendered"], again["skipped"]) == (1, 3)
    assert len(list(out.glob("*/*"))) == 4
    assert not list(out.glob("*/.*")), "no staging folders left behind"


def test_cli_help_lists_every_option():
    result = subprocess.run(
        [sys.executable, "launcher/synth.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(REPO)},
    )
    for option in (
        "--out",
        "--objects",
        "--res",
        "--seed",
        "--workers",
        "--format",
        "--supersample",
        "--normal-space",
        "--overwrite",
    ):
        assert option in result.stdout
