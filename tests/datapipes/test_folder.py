"""Folder dataset: same examples as the shard reader, rank split, malformed objects."""

from __future__ import annotations

import pytest
import torch
from fixtures_stream import make_render_root, write_render_script_object

from datapipes.convert import ConvertOptions, convert
from datapipes.folder import FolderDataset, build_folder_loader
from datapipes.sample import SampleError
from datapipes.shard_io import iter_shard_entries, resolve_shards
from datapipes.shards import decode_entry
from datapipes.transform import TransformOptions

OPTS = TransformOptions(resolution=16, clip_size=16)


def test_folder_examples_equal_shard_examples(tmp_path):
    make_render_root(tmp_path / "src", 4, res=16)
    convert(tmp_path / "src", tmp_path / "out", ConvertOptions(samples_per_shard=3, val_fraction=0.0))
    folder = FolderDataset(tmp_path / "src", OPTS, seed=11)
    by_id = {folder.objects[i].object_id: folder[i] for i in range(len(folder))}
    entries = [e for s in resolve_shards(str(tmp_path / "out")) for e in iter_shard_entries(s.url)]
    assert len(entries) == 4
    for entry in entries:
        streamed = decode_entry(entry, OPTS, seed=11, epoch=0)
        expected = by_id[streamed["object_id"]]
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, streamed[key]), key


@pytest.mark.parametrize("layout", ["render-script", "wonder3d"])
def test_loader_splits_ranks_and_follows_contract(tmp_path, layout):
    ids = make_render_root(tmp_path, 6, layout=layout, res=16)
    seen, counts = [], []
    for rank in range(2):
        loader = build_folder_loader(
            tmp_path, batch_size=3, rank=rank, world_size=2, seed=0, transform=OPTS, workers=2
        )
        batches = list(loader)
        counts.append(len(batches))
        seen += [oid for batch in batches for oid in batch["object_id"]]
        assert batches[0]["normal_target"].shape == (3, 6, 3, 16, 16)
        assert batches[0]["camera_embed_image"].shape == (3, 6, 10)
    assert counts == [1, 1] and sorted(seen) == ids


def test_epochs_change_backgrounds_deterministically(tmp_path):
    make_render_root(tmp_path, 6, res=16)
    dataset = FolderDataset(tmp_path, OPTS, seed=3)
    first = [dataset[i]["image_cond"][:, 0, 0] for i in range(6)]  # corner pixel = background colour
    dataset.set_epoch(1)
    second = [dataset[i]["image_cond"][:, 0, 0] for i in range(6)]
    dataset.set_epoch(0)
    assert all(torch.equal(a, dataset[i]["image_cond"][:, 0, 0]) for i, a in enumerate(first))
    assert any(not torch.equal(a, b) for a, b in zip(first, second))


def test_malformed_objects(tmp_path):
    make_render_root(tmp_path, 2, res=16)
    broken = write_render_script_object(tmp_path, "zz_broken", seed=1, res=16)
    (broken / "000_back_RT.txt").write_text("0 0 0 0\n0 0 0 0\n0 0 0 0\n")
    lazy = FolderDataset(tmp_path, OPTS)
    with pytest.raises(SampleError, match=r"zz_broken.*000_back_RT\.txt"):
        lazy[lazy.objects.index(next(r for r in lazy.objects if r.object_id == "zz_broken"))]
    checked = FolderDataset(tmp_path, OPTS, validate=True)
    assert len(checked) == 2 and [oid for oid, _ in checked.skipped] == ["zz_broken"]
