"""View selection: a subset or reorder of the stored views through the real loader; shards of fewer views."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from datapipes.cameras import camera_embedding, reference_rig_array
from datapipes.convert import ConvertError, ConvertOptions, convert
from datapipes.folder import FolderDataset
from datapipes.manifest import load_manifest
from datapipes.sample import VIEW_NAMES, SampleError
from datapipes.shard_io import iter_raw_objects, stored_views
from datapipes.shards import build_train_loader, build_val_loader
from datapipes.transform import TransformOptions

SUBSET = ("front", "back", "left", "right")  # fewer views, and not in stored order
REORDER = ("front", "front_left", "left", "back", "right", "front_right")
PER_VIEW_KEYS = (
    "image_target",
    "normal_target",
    "image_target_vae",
    "normal_target_vae",
    "camera_embed_image",
    "camera_embed_normal",
)
SHARED_KEYS = ("image_cond", "image_cond_vae", "image_cond_CLIP")


@pytest.fixture(scope="module")
def synth_shards(synth_render_root, tmp_path_factory) -> Path:
    """The 4 synthetic objects (real renderer, camera-frame normals) as 4 one-object shards."""
    out = tmp_path_factory.mktemp("view_shards")
    convert(synth_render_root, out, ConvertOptions(samples_per_shard=1, val_fraction=0.0))
    return out


def _batches(shards: Path, views: tuple[str, ...] | None) -> list[dict]:
    opts = TransformOptions(
        resolution=16,
        clip_size=16,
        background="white",
        num_views=len(views or VIEW_NAMES),
        views=views,
    )
    loader = build_train_loader(
        str(shards), batch_size=2, rank=0, world_size=1, seed=0, transform=opts, workers=0,
        shuffle_shards=False, max_epochs=1, bad_sample="raise",
    )  # fmt: skip
    return list(loader)


@pytest.mark.parametrize("views", [SUBSET, REORDER], ids=["subset", "reorder"])
def test_selected_views_are_exactly_those_of_the_full_batch(synth_shards, views):
    full, chosen = _batches(synth_shards, None), _batches(synth_shards, views)
    index = [VIEW_NAMES.index(view) for view in views]
    assert len(full) == len(chosen) == 2
    for whole, part in zip(full, chosen):
        assert part["object_id"] == whole["object_id"]
        for key in PER_VIEW_KEYS:
            assert part[key].shape[1] == len(views), key
            assert torch.equal(part[key], whole[key][:, index]), f"{key} is not the selected views {views}"
        for key in SHARED_KEYS:  # the condition stays the stored front view
            assert torch.equal(part[key], whole[key]), key


def test_selected_camera_embedding_uses_the_selected_cameras(synth_shards):
    batch = _batches(synth_shards, SUBSET)[0]
    rig = reference_rig_array()
    expected = camera_embedding(rig[0], reference_rig_array(SUBSET), "normal").astype(np.float32)
    assert np.array_equal(batch["camera_embed_normal"][0].numpy(), expected)
    # and the selection differs from simply the first len(SUBSET) stored views
    assert not np.array_equal(expected, camera_embedding(rig[0], rig[: len(SUBSET)], "normal"))


def test_validation_loader_takes_the_same_views(synth_shards):
    opts = TransformOptions(resolution=16, clip_size=16, background="white", num_views=4, views=SUBSET)
    loader = build_val_loader(
        str(synth_shards), batch_size=2, rank=0, world_size=1, transform=opts, workers=0, split="train"
    )
    assert all(batch["image_target"].shape[1] == len(SUBSET) for batch in loader)


def test_folder_dataset_takes_the_same_views(synth_render_root):
    def example(views):
        opts = TransformOptions(
            resolution=16, clip_size=16, background="white", num_views=len(views), views=views
        )
        return FolderDataset(synth_render_root, opts)[0]

    whole, part = example(VIEW_NAMES), example(REORDER)
    index = [VIEW_NAMES.index(view) for view in REORDER]
    for key in PER_VIEW_KEYS:
        assert torch.equal(part[key], whole[key][index]), key


def test_views_the_shards_lack_are_named(synth_render_root, tmp_path):
    out = tmp_path / "four"
    convert(synth_render_root, out, ConvertOptions(samples_per_shard=1, val_fraction=0.0, views=SUBSET))
    with pytest.raises(SampleError, match=r"\['front_left'\] not among stored"):
        _batches(out, ("front", "front_left"))


def test_converter_stores_and_records_only_the_requested_views(synth_render_root, tmp_path):
    out = tmp_path / "four"
    manifest = convert(synth_render_root, out, ConvertOptions(samples_per_shard=2, views=SUBSET))
    assert manifest["views"] == list(SUBSET) and manifest["cond_view"] == "front"
    assert stored_views(str(out))[:2] == (SUBSET, "front")
    raw = next(iter_raw_objects(str(out / manifest["shards"][0]["name"])))
    assert sorted(raw.files) == sorted(f"{k}_{v}.png" for k in ("rgb", "normals") for v in SUBSET)
    assert stored_views(str(out / manifest["shards"][0]["name"]))[:2] == (SUBSET, "front")
    assert load_manifest(out)["options"]["views"] == list(SUBSET)  # a resume must ask for the same views


def test_converter_refuses_views_without_the_condition_view(synth_render_root, tmp_path):
    with pytest.raises(ConvertError, match="including 'front'"):
        convert(synth_render_root, tmp_path / "x", ConvertOptions(views=("back", "left")))
