"""Streaming reader: exact resume, rank/worker coverage, determinism, URL specs, bad samples, validation.

The global order under other world sizes / workers / micro-batches: test_elastic_stream.py.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from itertools import islice
from pathlib import Path

import pytest
import torch
from fixtures_stream import make_shards

from datapipes.manifest import load_manifest
from datapipes.sample import SampleError
from datapipes.shard_io import resolve_shards
from datapipes.shards import StreamError, build_train_loader, build_val_loader, tensor_bytes
from datapipes.stream_state import StreamStateError
from datapipes.transform import TransformOptions

OPTS = TransformOptions(resolution=16, clip_size=16)
OBJECTS, PER_SHARD = 16, 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("stream"), OBJECTS, PER_SHARD, res=16)


@pytest.fixture(scope="module")
def all_ids(shards) -> list[str]:
    return sorted(oid for s in load_manifest(shards)["shards"] for oid in s["objects"])


def _loader(urls, **overrides):
    kwargs = dict(batch_size=2, rank=0, world_size=1, seed=7, transform=OPTS, workers=2, shuffle_buffer=3)
    kwargs.update(overrides)
    return build_train_loader(urls, **kwargs)


def _take(loader, count: int) -> list[bytes]:
    return [tensor_bytes(batch) for batch in islice(loader, count)]


@pytest.mark.parametrize("first", [40, 41])
def test_resume_equals_uninterrupted_run(shards, first):
    straight = _take(_loader(str(shards)), 100)
    interrupted = _loader(str(shards))
    head = _take(interrupted, first)
    state = json.loads(json.dumps(interrupted.state_dict()))  # must survive a JSON checkpoint
    assert state["position"] == first * 2  # one rank, micro-batch 2
    restarted = _loader(str(shards))
    restarted.load_state_dict(state)
    tail = _take(restarted, 100 - first)
    assert head + tail == straight
    assert len(set(straight[:8])) == 8  # real, differing batches


def test_iterating_again_continues_the_stream(shards):
    straight = _take(_loader(str(shards)), 30)
    loader = _loader(str(shards))
    assert _take(loader, 13) + _take(loader, 17) == straight


def test_two_ranks_two_workers_cover_every_sample_once_per_epoch(shards, all_ids):
    for epoch_count in (1, 2):
        seen: list[str] = []
        for rank in range(2):
            loader = _loader(str(shards), rank=rank, world_size=2, max_epochs=epoch_count)
            seen += [oid for batch in loader for oid in batch["object_id"]]
        assert sorted(seen) == sorted(all_ids * epoch_count)


def test_order_depends_on_seed_epoch_and_rank(shards):
    def ids(**kw):
        return [oid for batch in _loader(str(shards), max_epochs=1, **kw) for oid in batch["object_id"]]

    assert ids(seed=1) == ids(seed=1)
    assert ids(seed=1) != ids(seed=2)
    rank0, rank1 = ids(rank=0, world_size=2), ids(rank=1, world_size=2)
    assert not set(rank0) & set(rank1)


def test_epochs_reshuffle(shards, all_ids):
    loader = _loader(str(shards), workers=0, max_epochs=2)
    order = [oid for batch in loader for oid in batch["object_id"]]
    first, second = order[: len(all_ids)], order[len(all_ids) :]
    assert sorted(first) == sorted(second) == all_ids and first != second


def test_url_specs_and_pipe_urls_give_the_same_stream(shards, tmp_path):
    urls = [info.url for info in resolve_shards(str(shards))]
    assert len(urls) == OBJECTS // PER_SHARD
    listing = tmp_path / "shards.txt"
    listing.write_text("# train shards\n" + "\n".join(f"pipe:cat {u}" for u in urls) + "\n")
    brace = str(shards / "train" / f"shard-{{000000..{len(urls) - 1:06d}}}.tar")
    expected = _take(_loader(str(shards)), 12)
    assert _take(_loader(brace), 12) == expected
    assert _take(_loader(str(listing)), 12) == expected
    assert _take(_loader(str(shards / "manifest.json")), 12) == expected


def test_state_is_tiny_and_refused_where_the_steps_would_not_line_up(shards):
    loader = _loader(str(shards))
    _take(loader, 3)
    assert len(json.dumps(loader.state_dict())) < 600  # one position and counters, whatever was read
    other = _loader(str(shards), batch_size=4)  # position 6 is not a multiple of 1 x 4
    with pytest.raises(StreamStateError, match="world size x micro-batch"):
        other.load_state_dict(loader.state_dict())


def test_more_ranks_times_workers_than_shards_feed_every_rank(shards):
    loader = _loader(str(shards), world_size=8, rank=7, workers=2)  # 16 readers, 8 shards
    assert [len(batch["object_id"]) for batch in islice(loader, 3)] == [2, 2, 2]


def test_batches_follow_the_contract(shards):
    loader = _loader(str(shards))
    batch = next(iter(loader))
    assert batch["image_target"].shape == (2, 6, 3, 16, 16) and batch["image_cond_CLIP"].shape == (
        2,
        3,
        16,
        16,
    )
    assert batch["camera_embed_normal"].shape == (2, 6, 10) and batch["image_cond"].dtype == torch.float32
    assert loader.batches_per_epoch == OBJECTS // 2
    assert batch["window_slot"] == [0, 1]  # each object's index in the rank's window (keys its noise)


# --------------------------------------------------------------------------------------------- bad shards


def _rewrite_member(src: Path, dst: Path, victim: str) -> None:
    """Copy a shard, replacing the bytes of the first member ending with `victim` by garbage."""
    done = False
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for info in tin.getmembers():
            data = tin.extractfile(info).read()
            if info.name.endswith(victim) and not done:
                data, done = b"garbage, not an image", True
                info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def _bad_shard_urls(shards: Path, tmp_path: Path, kind: str) -> tuple[list[str], str]:
    urls = [info.url for info in resolve_shards(str(shards))]
    broken = tmp_path / "broken.tar"
    if kind == "corrupt":
        _rewrite_member(Path(urls[1]), broken, "normals_left.png")
    else:
        data = Path(urls[1]).read_bytes()
        broken.write_bytes(data[: int(len(data) * 0.7)])
    return [*urls[:1], str(broken), *urls[2:]], str(broken)


@pytest.mark.parametrize("kind", ["corrupt", "truncated"])
def test_bad_shards_skip_policy(shards, tmp_path, all_ids, kind):
    urls, _ = _bad_shard_urls(shards, tmp_path, kind)
    loader = _loader(urls, max_epochs=1)  # 2 workers: the count reaches the main process with the batches
    seen = [oid for batch in loader for oid in batch["object_id"]]
    assert loader.bad_samples == 1
    assert len(seen) == len(set(seen)) == OBJECTS - 1  # exactly the damaged sample is lost
    assert set(seen) < set(all_ids)
    in_process = _loader(urls, max_epochs=1, workers=0)  # warnings of worker processes are not capturable
    with pytest.warns(UserWarning, match="skipping bad sample"):
        assert [oid for batch in in_process for oid in batch["object_id"]]


@pytest.mark.parametrize("kind", ["corrupt", "truncated"])
def test_bad_shards_raise_policy_names_shard_object_and_key(shards, tmp_path, kind):
    urls, broken = _bad_shard_urls(shards, tmp_path, kind)
    loader = _loader(urls, max_epochs=1, workers=0, bad_sample="raise")
    with pytest.raises(SampleError) as info:
        list(loader)
    message = str(info.value)
    assert broken in message
    assert ("normals_left.png" in message) if kind == "corrupt" else ("tar" in message)
    assert info.value.object_id in load_manifest(shards)["shards"][1]["objects"]


# --------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_validation_is_single_pass_with_equal_batches_per_rank(shards, all_ids, world_size):
    loaders = [
        build_val_loader(str(shards), batch_size=2, rank=r, world_size=world_size, transform=OPTS, workers=2, split="train")
        for r in range(world_size)
    ]  # fmt: skip
    per_rank = [[oid for batch in loader for oid in batch["object_id"]] for loader in loaders]
    assert len({len(loader) for loader in loaders}) == 1
    assert all(len(ids) == len(per_rank[0]) for ids in per_rank)
    seen = [oid for ids in per_rank for oid in ids]
    assert set(seen) == set(all_ids) and len(seen) - len(all_ids) < world_size
    again = [oid for batch in loaders[0] for oid in batch["object_id"]]
    assert again == per_rank[0]


@pytest.mark.parametrize("use_manifest_counts", [True, False])
def test_validation_survives_a_truncated_shard_under_skip(shards, tmp_path, all_ids, use_manifest_counts):
    urls, broken = _bad_shard_urls(shards, tmp_path, "truncated")
    spec = urls
    if use_manifest_counts:  # a copy whose manifest still promises 2 samples for the damaged shard
        copy = tmp_path / "copy"
        shutil.copytree(shards, copy)
        shutil.copy(broken, copy / "train" / "shard-000001.tar")
        spec = str(copy)
    kwargs = dict(batch_size=2, world_size=2, transform=OPTS, workers=0, split="train")
    loaders = [build_val_loader(spec, rank=r, **kwargs) for r in range(2)]
    with pytest.warns(UserWarning, match="skipping bad sample"):
        seen = [oid for loader in loaders for batch in loader for oid in batch["object_id"]]
    assert len(set(seen)) == OBJECTS - 1 and set(seen) < set(all_ids)
    with pytest.raises(SampleError, match=r"broken\.tar|shard-000001\.tar"):
        list(build_val_loader(spec, rank=0, bad_sample="raise", **kwargs))


def test_infinite_stream_without_good_samples_fails_loudly(tmp_path):
    empty = []
    for index in range(2):
        path = tmp_path / f"empty-{index}.tar"
        tarfile.open(path, "w").close()
        empty.append(str(path))
    with pytest.raises(StreamError, match="no good sample"):
        next(iter(_loader(empty, workers=0)))
