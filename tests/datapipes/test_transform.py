"""Example transform + collate (the batch contract): shapes, ranges, backgrounds, normal rotation, errors."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch

from datapipes.cameras import reference_rig_array
from datapipes.sample import VIEW_NAMES, MultiViewSample, SampleError
from datapipes.synth import object_seed, random_object
from datapipes.synth.render import render_buffers
from datapipes.transform import (
    BACKGROUNDS,
    CLIP_MEAN,
    CLIP_STD,
    TransformOptions,
    check_example,
    collate,
    make_example,
)


def _flat_sample(rgba: tuple[int, int, int, int], res: int = 8, object_id: str = "flat") -> MultiViewSample:
    """Every image one constant RGBA value; reference rig cameras."""
    rig = reference_rig_array()
    color = np.broadcast_to(np.array(rgba, dtype=np.uint8), (6, res, res, 4)).copy()
    return MultiViewSample(
        object_id, color[0].copy(), color, color.copy(), rig, rig[0].copy(), VIEW_NAMES, "mem"
    )


def test_batch_contract_shapes_dtypes_ranges(synth_samples):
    opts = TransformOptions(resolution=16, background="random", clip_size=24)
    rng = np.random.default_rng(0)
    batch = collate([make_example(sample, opts, rng) for sample in synth_samples[:2]])
    expected = {
        "image_cond": (2, 3, 16, 16),
        "image_target": (2, 6, 3, 16, 16),
        "normal_target": (2, 6, 3, 16, 16),
        "image_cond_vae": (2, 3, 16, 16),
        "image_target_vae": (2, 6, 3, 16, 16),
        "normal_target_vae": (2, 6, 3, 16, 16),
        "image_cond_CLIP": (2, 3, 24, 24),
        "camera_embed_image": (2, 6, 10),
        "camera_embed_normal": (2, 6, 10),
    }
    assert set(batch) == {*expected, "object_id"}
    assert batch["object_id"] == [sample.object_id for sample in synth_samples[:2]]
    for key, shape in expected.items():
        assert batch[key].dtype == torch.float32 and tuple(batch[key].shape) == shape, key
    for key in ("image_cond", "image_target", "normal_target"):
        assert batch[key].min() >= 0.0 and batch[key].max() <= 1.0
        torch.testing.assert_close(batch[f"{key}_vae"], batch[key] * 2 - 1)
    # domain one-hot sits at x[3:5]: sin(1) where hot, sin(0) where not
    assert torch.allclose(
        batch["camera_embed_normal"][..., 3], torch.tensor(np.sin(1.0), dtype=torch.float32)
    )
    assert torch.allclose(batch["camera_embed_image"][..., 4], torch.tensor(np.sin(1.0), dtype=torch.float32))
    torch.testing.assert_close(batch["camera_embed_image"][..., :3], batch["camera_embed_normal"][..., :3])


@pytest.mark.parametrize("background", ["white", "black", "gray"])
def test_fixed_backgrounds_fill_transparent_pixels(background):
    sample = _flat_sample((10, 200, 30, 0))  # colour present but fully transparent
    example = make_example(sample, TransformOptions(resolution=8, background=background, clip_size=8), None)
    value = BACKGROUNDS[background][0]
    for key in ("image_cond", "image_target", "normal_target"):
        torch.testing.assert_close(example[key], torch.full_like(example[key], value))


def test_random_background_is_one_of_three_and_shared_by_all_views():
    sample = _flat_sample((0, 0, 0, 0))
    opts = TransformOptions(resolution=8, background="random", clip_size=8)
    seen = set()
    for seed in range(30):
        example = make_example(sample, opts, np.random.default_rng(seed))
        values = {
            round(float(v), 4)
            for key in ("image_cond", "image_target", "normal_target")
            for v in example[key].unique()
        }
        assert len(values) == 1, "one background per object, for every view and both domains"
        seen |= values
    assert seen == {0.0, 0.5, 1.0}


def test_random_background_is_deterministic_given_rng(synth_samples):
    opts = TransformOptions(resolution=16, background="random", clip_size=16)
    first = make_example(synth_samples[0], opts, np.random.default_rng(7))
    second = make_example(synth_samples[0], opts, np.random.default_rng(7))
    for key, value in first.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, second[key]), key


def test_alpha_compositing_of_partial_alpha():
    sample = _flat_sample((200, 100, 0, 51))  # alpha 0.2
    example = make_example(sample, TransformOptions(resolution=8, background="black", clip_size=8), None)
    expected = torch.tensor([200, 100, 0], dtype=torch.float32) / 255 * 0.2
    torch.testing.assert_close(example["image_cond"][:, 0, 0], expected)


def test_resize_does_not_bleed_transparent_colour():
    # opaque red left half, transparent *green* right half: after an antialiased resize on white, a pixel
    # may only mix red and white, so G == B everywhere (a non-premultiplied resize would leak green).
    image = np.zeros((64, 64, 4), dtype=np.uint8)
    image[:, :32] = (255, 0, 0, 255)
    image[:, 32:] = (0, 255, 0, 0)
    sample = _flat_sample((0, 0, 0, 0), res=64)
    sample.cond_rgba = image
    sample.color_rgba = np.stack([image] * 6)
    example = make_example(sample, TransformOptions(resolution=16, background="white", clip_size=8), None)
    target = example["image_target"]
    assert target.shape == (6, 3, 16, 16)
    torch.testing.assert_close(target[:, 1], target[:, 2], atol=2 / 255, rtol=0)
    assert target[:, 1, :, :6].max() < 0.01 and target[:, 1, :, -6:].min() > 0.99


def test_clip_input_is_normalised_with_clip_mean_std():
    sample = _flat_sample((0, 0, 0, 0))
    example = make_example(sample, TransformOptions(resolution=8, background="white", clip_size=12), None)
    expected = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    clip = example["image_cond_CLIP"]
    assert clip.shape == (3, 12, 12)
    torch.testing.assert_close(clip, expected.view(3, 1, 1).expand_as(clip))


def test_front_view_normals_are_unrotated(synth_samples, tiny_transform_options):
    sample = synth_samples[0]
    example = make_example(sample, tiny_transform_options, None)
    alpha = sample.normal_rgba[0, ..., 3] == 255
    stored = torch.from_numpy(sample.normal_rgba[0, ..., :3].astype(np.float32) / 255).permute(2, 0, 1)
    got = example["normal_target"][0]
    torch.testing.assert_close(got[:, alpha], stored[:, alpha], atol=1e-5, rtol=0)


def test_all_views_normals_end_in_condition_camera_frame(synth_samples, tiny_transform_options):
    # Ground truth from the renderer's exact world normals: in the condition frame n = R_front n_world.
    seed = object_seed(0, 1)
    rig = reference_rig_array()
    world = render_buffers(random_object(seed), rig, 32).normal  # [V,32,32,3]
    expected = np.einsum("ij,vhwj->vhwi", rig[0][:, :3], world) * 0.5 + 0.5
    sample = synth_samples[1]
    got = make_example(sample, tiny_transform_options, None)["normal_target"].permute(0, 2, 3, 1).numpy()
    covered = sample.normal_rgba[..., 3] == 255
    assert covered.sum() > 100
    np.testing.assert_allclose(got[covered], expected[covered], atol=2.5 / 255)


def _corrupt(sample: MultiViewSample, key: str) -> MultiViewSample:
    bad = dataclasses.replace(sample, source="shard-000007.tar")
    if key == "color_rgba":
        bad.color_rgba = bad.color_rgba.astype(np.float32)
    elif key == "normal_rgba":
        bad.normal_rgba = bad.normal_rgba[:, :-1]
    elif key == "cond_rgba":
        bad.cond_rgba = bad.cond_rgba[..., :3]
    elif key == "w2c":
        bad.w2c = bad.w2c.copy()
        bad.w2c[2, 1, 1] = np.nan
    elif key == "cond_w2c":
        bad.cond_w2c = bad.cond_w2c * 2.0  # not a rotation any more
    elif key == "view_names":
        bad.view_names, bad.w2c = VIEW_NAMES[:5], bad.w2c[:5]
        bad.color_rgba, bad.normal_rgba = bad.color_rgba[:5], bad.normal_rgba[:5]
    return bad


@pytest.mark.parametrize("key", ["color_rgba", "normal_rgba", "cond_rgba", "w2c", "cond_w2c", "view_names"])
def test_bad_sample_raises_sample_error_naming_object_source_and_key(
    synth_samples, tiny_transform_options, key
):
    sample = synth_samples[0]
    with pytest.raises(SampleError) as info:
        make_example(_corrupt(sample, key), tiny_transform_options, None)
    message = str(info.value)
    assert info.value.key == key
    assert sample.object_id in message and "shard-000007.tar" in message and repr(key) in message


def test_sample_error_survives_pickling_between_processes():
    error = SampleError("abc", "normal_rgba", "bad shape", "shard-000001.tar")
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is SampleError and str(clone) == str(error)
    assert (clone.object_id, clone.key, clone.source) == ("abc", "normal_rgba", "shard-000001.tar")


def test_check_example_rejects_out_of_range_values(synth_samples, tiny_transform_options):
    example = make_example(synth_samples[0], tiny_transform_options, None)
    example["normal_target"] = example["normal_target"] + 0.5
    with pytest.raises(SampleError, match=r"'normal_target'.*outside"):
        check_example(example, tiny_transform_options, "obj", "shard-1.tar")
    example["normal_target"] = example["normal_target"] - 0.5
    check_example(example, tiny_transform_options, "obj")  # back in range: passes
    example["image_cond_CLIP"][0, 0, 0] = float("nan")
    with pytest.raises(SampleError, match="'image_cond_CLIP'"):
        check_example(example, tiny_transform_options, "obj")
    del example["image_cond_CLIP"]
    with pytest.raises(SampleError, match=r"image_cond_CLIP.*missing"):
        check_example(example, tiny_transform_options, "obj")


def test_collate_rejects_mismatched_examples(synth_samples, tiny_transform_options):
    first = make_example(synth_samples[0], tiny_transform_options, None)
    second = make_example(synth_samples[1], tiny_transform_options, None)
    del second["camera_embed_image"]
    with pytest.raises(SampleError, match="camera_embed_image"):
        collate([first, second])
    with pytest.raises(ValueError):
        collate([])


def test_options_reject_unknown_background():
    with pytest.raises(ValueError, match="background"):
        TransformOptions(background="pink")
