"""Render-folder layouts: detection, listing, validation of malformed objects, decoding."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from fixtures_stream import disc_images, make_render_root, write_render_script_object, write_wonder3d_object
from PIL import Image

from datapipes.cameras import reference_rig_array
from datapipes.render_folder import (
    LayoutError,
    ObjectRef,
    decode_raw_object,
    detect_layout,
    list_objects,
    parse_cameras_json,
    read_object,
    read_sample,
    split_of,
    stable_unit_hash,
)
from datapipes.sample import VIEW_NAMES, SampleError


@pytest.mark.parametrize("layout", ["render-script", "wonder3d"])
def test_detect_and_list(tmp_path, layout):
    ids = make_render_root(tmp_path, 3, layout=layout, res=16)
    objects = list_objects(tmp_path)
    assert [ref.object_id for ref in objects] == ids
    assert detect_layout(tmp_path) == layout


def test_detect_fails_on_unknown_layout(tmp_path):
    (tmp_path / "ab" / "abc").mkdir(parents=True)
    (tmp_path / "ab" / "abc" / "notes.txt").write_text("x")
    with pytest.raises(LayoutError, match="cannot detect"):
        detect_layout(tmp_path)


def test_read_object_keeps_bytes_and_decodes_render_script(tmp_path):
    folder = write_render_script_object(tmp_path, "aa01", seed=5, res=16)
    raw = read_object(ObjectRef("aa01", folder), "render-script")
    assert raw.files["rgb_back.png"] == (folder / "rgb_000_back.png").read_bytes()
    assert set(raw.files) == {f"{k}_{v}.png" for k in ("rgb", "normals") for v in VIEW_NAMES}
    sample = decode_raw_object(raw)
    color, normal = disc_images(5, VIEW_NAMES.index("right"), 16)
    np.testing.assert_array_equal(sample.color_rgba[2], color)
    np.testing.assert_array_equal(sample.normal_rgba[2], normal)
    np.testing.assert_array_equal(sample.cond_rgba, sample.color_rgba[0])
    np.testing.assert_allclose(sample.w2c, reference_rig_array(), atol=1e-15)


def test_wonder3d_mask_becomes_alpha_and_rig_is_reference(tmp_path):
    folder = write_wonder3d_object(tmp_path, "abc01", seed=2, res=16)
    sample = read_sample(ObjectRef("abc01", folder), "wonder3d")
    color, _ = disc_images(2, 4, 16)
    np.testing.assert_array_equal(sample.color_rgba[4], color)
    np.testing.assert_array_equal(sample.normal_rgba[4][..., 3], color[..., 3])
    np.testing.assert_array_equal(sample.w2c, reference_rig_array())


def _break(folder, how):
    if how == "missing view":
        (folder / "normals_000_left.png").unlink()
    elif how == "unreadable image":
        (folder / "rgb_000_back.png").write_bytes(b"not a png at all")
    elif how == "truncated image":
        data = (folder / "rgb_000_right.png").read_bytes()
        (folder / "rgb_000_right.png").write_bytes(data[: len(data) // 2])
    elif how == "size mismatch":
        Image.new("RGBA", (8, 8)).save(folder / "rgb_000_front_left.png")
    elif how == "bad RT shape":
        (folder / "000_front_RT.txt").write_text("1 0 0\n0 1 0\n")
    elif how == "RT not a rotation":
        np.savetxt(folder / "000_back_RT.txt", np.full((3, 4), 0.5))
    elif how == "RT with NaN":
        (folder / "000_left_RT.txt").write_text("nan 0 0 0\n0 1 0 0\n0 0 1 0\n")
    elif how == "missing RT":
        (folder / "000_right_RT.txt").unlink()
    elif how == "no alpha":
        Image.new("RGB", (16, 16)).save(folder / "rgb_000_front.png")


@pytest.mark.parametrize(
    ("how", "names"),
    [
        ("missing view", "normals_000_left"),
        ("unreadable image", "rgb_000_back.png"),
        ("truncated image", "rgb_000_right.png"),
        ("size mismatch", "rgb_000_front_left.png=8x8"),
        ("bad RT shape", "000_front_RT.txt"),
        ("RT not a rotation", "000_back_RT.txt"),
        ("RT with NaN", "000_left_RT.txt"),
        ("missing RT", "000_right_RT.txt"),
        ("no alpha", "rgb_000_front.png"),
    ],
)
def test_malformed_objects_raise_naming_object_and_file(tmp_path, how, names):
    folder = write_render_script_object(tmp_path, "bad01", seed=1, res=16)
    _break(folder, how)
    with pytest.raises(SampleError) as info:
        read_object(ObjectRef("bad01", folder), "render-script")
    message = str(info.value)
    assert "bad01" in message and names in message and str(folder) in message


def test_decode_rejects_corrupt_member(tmp_path):
    folder = write_render_script_object(tmp_path, "cc01", seed=1, res=16)
    raw = read_object(ObjectRef("cc01", folder), "render-script")
    raw.files["normals_back.png"] = raw.files["normals_back.png"][:40]
    with pytest.raises(SampleError, match=r"normals_back\.png"):
        decode_raw_object(raw)


def test_split_is_a_stable_hash_with_the_requested_share():
    ids = [f"{i:032x}" for i in range(4000)]
    share = sum(split_of(uid, 0.1) == "val" for uid in ids) / len(ids)
    assert 0.085 < share < 0.115
    expected = int.from_bytes(hashlib.sha256(b"object-7").digest()[:8], "big") / 2**64
    assert stable_unit_hash("object-7") == expected
    assert all(split_of(uid, 0.0) == "train" for uid in ids[:50])


def test_webp_sources_are_read(tmp_path):
    folder = write_render_script_object(tmp_path, "dd01", seed=3, res=16, ext="webp")
    raw = read_object(ObjectRef("dd01", folder), "render-script")
    assert "rgb_front.webp" in raw.files
    assert Image.open(io.BytesIO(raw.files["rgb_front.webp"])).format == "WEBP"
    assert decode_raw_object(raw).color_rgba.shape == (6, 16, 16, 4)


def test_cameras_json_must_be_strict_and_complete():
    with pytest.raises(SampleError, match="not strict JSON"):
        parse_cameras_json(b'{"w2c": NaN}', "obj", "shard.tar")
    with pytest.raises(SampleError, match="missing fields"):
        parse_cameras_json(b'{"format": "gnn3d-cameras/1"}', "obj", "shard.tar")
