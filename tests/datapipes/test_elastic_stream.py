"""The training stream's global order: the same sample sequence under any world size, DataLoader workers and
micro-batch; a state saved under one of them continues under another with no sample repeated or skipped;
bad data counted exactly without breaking lockstep.

The expected order is written out here from the contract (stream_state's docstring), independently of the
reader: shards permuted with default_rng([seed, epoch]), cut into blocks of >= shuffle_buffer samples, each
block's samples permuted with default_rng([seed, epoch, block]). The manifest lists each shard's objects in
tar order, which is what makes that computable without reading a shard.
"""

from __future__ import annotations

import json
import shutil
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from fixtures_stream import corrupt_member, make_shards
from hypothesis import given, settings
from hypothesis import strategies as st

import datapipes.shards as shards_module
from datapipes.manifest import load_manifest
from datapipes.shard_io import ShardInfo, index_shard, resolve_shards
from datapipes.shards import ResumableLoader, ShardStream, build_train_loader
from datapipes.stream_state import LEGACY_FORMAT, StreamStateError, merge_stream_states, window_start
from datapipes.transform import TransformOptions

OPTS = TransformOptions(resolution=16, clip_size=16)
SEED, BUFFER = 3, 4
OBJECTS, PER_SHARD = 19, 3  # 7 shards, the last one short: blocks of 2 shards (6 samples) and 1 of 1


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("elastic"), OBJECTS, PER_SHARD, res=16)


def shard_objects(shards: Path) -> list[list[str]]:
    return [s["objects"] for s in load_manifest(shards)["shards"] if s["split"] == "train"]


def reference_order(shards: Path, epochs: int, seed: int = SEED, buffer: int = BUFFER) -> list[str]:
    """Object ids of the global order, epochs concatenated (see the module docstring)."""
    objects, ids = shard_objects(shards), []
    for epoch in range(epochs):
        blocks, current = [], []
        for shard in np.random.default_rng([seed, epoch]).permutation(len(objects)):
            current += objects[shard]
            if len(current) >= buffer:
                blocks.append(current)
                current = []
        blocks += [current] if current else []
        for index, block in enumerate(blocks):
            ids += [block[j] for j in np.random.default_rng([seed, epoch, index]).permutation(len(block))]
    return ids


def loader(urls, world: int, rank: int, workers: int, micro: int, **overrides):
    kwargs = dict(batch_size=micro, rank=rank, world_size=world, seed=SEED, transform=OPTS, workers=workers)
    kwargs.update({"shuffle_buffer": BUFFER, **overrides})
    return build_train_loader(urls, **kwargs)


def interleave(per_rank: list[list[list[str]]]) -> list[str]:
    """Batch n of rank 0, batch n of rank 1, ...: the windows in stream order (the assignment)."""
    out = []
    for n in range(max(len(batches) for batches in per_rank)):
        for batches in per_rank:
            out += batches[n] if n < len(batches) else []
    return out


def read_epochs(urls, world: int, workers: int, micro: int, epochs: int) -> list[str]:
    per_rank = [
        [batch["object_id"] for batch in loader(urls, world, rank, workers, micro, max_epochs=epochs)]
        for rank in range(world)
    ]
    return interleave(per_rank)


# ----------------------------------------------------------------------------------- one order for all


@pytest.mark.parametrize("micro", [1, 2, 4])
@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_one_epoch_is_the_same_sequence_for_every_world_workers_and_micro_batch(
    shards, world, workers, micro
):
    expected = reference_order(shards, 1)
    assert sorted(expected) == sorted(oid for objects in shard_objects(shards) for oid in objects)
    assert len(set(expected)) == OBJECTS
    assert read_epochs(str(shards), world, workers, micro, 1) == expected


def test_epochs_follow_one_another_in_the_order(shards):
    got = read_epochs(str(shards), 2, 1, 2, 2)
    assert got == reference_order(shards, 2)
    assert got[:OBJECTS] != got[OBJECTS:]  # reshuffled


def test_streamed_shards_read_the_same_windows(shards, tmp_path):
    """pipe: URLs cannot be indexed: each worker streams the block's shards and keeps its own samples."""
    listing = tmp_path / "shards.txt"
    listing.write_text("\n".join(f"pipe:cat {info.url}" for info in resolve_shards(str(shards))) + "\n")
    assert read_epochs(str(listing), 2, 2, 2, 1) == reference_order(shards, 1)


def test_a_rank_reads_only_the_samples_of_its_windows(shards, monkeypatch):
    reads = []
    real = shards_module.read_indexed
    monkeypatch.setattr(shards_module, "read_indexed", lambda index, i: reads.append(i) or real(index, i))
    batches = list(loader(str(shards), 4, 1, 0, 2, max_epochs=1))
    assert len(reads) == sum(len(batch["object_id"]) for batch in batches) < OBJECTS / 2


# ----------------------------------------------------------------------------------- elastic resume


def take(loaders, count: int) -> list[list[list[str]]]:
    return [[batch["object_id"] for batch in islice(each, count)] for each in loaders]


def continue_from(states: list[dict], urls, world: int, workers: int, micro: int, **overrides) -> list:
    states = json.loads(json.dumps(states))  # through a JSON checkpoint
    loaders = [loader(urls, world, rank, workers, micro, **overrides) for rank in range(world)]
    for rank, each in enumerate(loaders):
        each.load_state_dict(merge_stream_states(states, rank))
    return loaders


def test_resume_on_other_world_size_workers_and_micro_batch_continues_the_order(shards):
    """2 ranks x 1 worker x m=1 -> 1 rank x 2 workers x m=2 -> 4 ranks x 0 workers x m=1, over 2 epochs."""
    urls = str(shards)
    first = [loader(urls, 2, rank, 1, 1) for rank in range(2)]
    seen = interleave(take(first, 5))  # positions 0..9
    second = continue_from([each.state_dict() for each in first], urls, 1, 2, 2)
    seen += interleave(take(second, 3))  # 10..15
    assert second[0].position == 16
    third = continue_from([each.state_dict() for each in second], urls, 4, 0, 1, max_epochs=2)
    seen += interleave([[batch["object_id"] for batch in each] for each in third])
    expected = reference_order(shards, 2)
    assert seen == expected
    for epoch in range(2):
        assert sorted(seen[epoch * OBJECTS : (epoch + 1) * OBJECTS]) == sorted(expected[:OBJECTS])
    states = [each.state_dict() for each in third]
    assert sum(state["samples"] for state in states) == len(seen) == 2 * OBJECTS  # cumulative over resumes


def test_counters_are_summed_onto_new_rank_zero(shards):
    urls = str(shards)
    first = [loader(urls, 2, rank, 0, 2) for rank in range(2)]
    take(first, 2)
    states = [each.state_dict() for each in first]
    assert [s["samples"] for s in states] == [4, 4] and {s["position"] for s in states} == {8}
    merged = [merge_stream_states(states, rank) for rank in range(4)]
    assert [m["samples"] for m in merged] == [8, 0, 0, 0] and {m["position"] for m in merged} == {8}


def test_refusals(shards, tmp_path):
    urls = str(shards)
    saved = loader(urls, 2, 0, 0, 1)
    take([saved], 1)  # position 2
    state = saved.state_dict()
    with pytest.raises(StreamStateError, match="seed"):
        loader(urls, 2, 0, 0, 1, seed=SEED + 1).load_state_dict(state)
    with pytest.raises(StreamStateError, match="shuffle_buffer"):
        loader(urls, 2, 0, 0, 1, shuffle_buffer=BUFFER + 3).load_state_dict(state)
    fewer = [info.url for info in resolve_shards(urls)][:-1]
    with pytest.raises(StreamStateError, match=r"shards.*6 shards, 18 samples"):
        loader(fewer, 2, 0, 0, 1).load_state_dict(state)
    with pytest.raises(StreamStateError, match=r"not a multiple of world size x micro-batch = 4 x 1"):
        loader(urls, 4, 0, 0, 1).load_state_dict(merge_stream_states([state, state], 0))
    with pytest.raises(StreamStateError, match=r"v0\.1.*model\.unet="):
        loader(urls, 1, 0, 0, 2).load_state_dict({"format": LEGACY_FORMAT, "positions": {}})
    later = dict(state, position=4)
    with pytest.raises(StreamStateError, match="disagree on position"):
        merge_stream_states([state, later], 0)
    moved = tmp_path / "moved"  # the same shards at another path: the same stream
    shutil.copytree(shards, moved)
    other = loader(str(moved), 2, 0, 0, 1)
    other.load_state_dict(state)
    assert take([other], 2) == take([continue_from([state], urls, 2, 0, 1)[0]], 2)


# ----------------------------------------------------------------------------------- bad data


@pytest.fixture
def damaged(shards, tmp_path) -> tuple[Path, set[str]]:
    """A copy with a corrupt sample, a tar cut inside a member, one cut at a header (tarfile reads it as a
    shorter valid tar: only the manifest's count shows the loss) and a deleted shard; the ids that cannot be read."""
    copy = Path(shutil.copytree(shards, tmp_path / "damaged"))
    objects, train = shard_objects(copy), copy / "train"
    bad = {corrupt_member(train / "shard-000001.tar", "rgb_front.png")}
    truncated = train / "shard-000003.tar"
    truncated.write_bytes(truncated.read_bytes()[: int(truncated.stat().st_size * 0.5)])
    bad |= set(objects[3][len(index_shard(str(truncated)).samples) :])
    cut = train / "shard-000000.tar"
    second = min(offset for offset, _ in index_shard(str(cut)).samples[1][1].values()) - 512  # its header
    cut.write_bytes(cut.read_bytes()[:second])
    (train / "shard-000005.tar").unlink()
    return copy, bad | set(objects[0][1:]) | set(objects[5])


def expected_batches(order: list[str], bad: set[str], first: int, micro: int) -> tuple[list[str], list[int]]:
    """(ids, window slots) of the window at `first`: its good samples, or the next good one as a filler."""
    good = [(order[first + i], i) for i in range(micro) if order[first + i] not in bad]
    if not good:
        filler = next(oid for oid in order[first + micro :] if oid not in bad)
        good = [(filler, 0)]
    return [oid for oid, _ in good], [i for _, i in good]


def pipe_loader(shards: Path, world: int, rank: int, workers: int, micro: int) -> ResumableLoader:
    """The manifest's shards (and counts) as pipe: URLs, which are streamed, not indexed."""
    infos = [ShardInfo(f"pipe:cat {info.url}", info.samples) for info in resolve_shards(str(shards))]
    stream = ShardStream(
        infos, batch_size=micro, rank=rank, world_size=world, seed=SEED, transform=OPTS, shuffle_buffer=BUFFER
    )
    return ResumableLoader(stream, workers)


@pytest.mark.parametrize(("workers", "micro", "make"), [(0, 1, loader), (2, 2, loader), (1, 2, pipe_loader)])
def test_bad_slots_shorten_batches_keep_lockstep_and_are_counted_exactly(damaged, workers, micro, make):
    copy, bad = damaged
    epochs, world = 3, 2
    batches = 48 // (world * micro)  # 2 data epochs of 19 slots and a part of the third
    order = reference_order(copy, epochs)
    loaders = [
        make(copy if make is pipe_loader else str(copy), world, rank, workers, micro) for rank in range(world)
    ]
    with pytest.warns(UserWarning, match="skipping bad sample"):
        got = [list(islice(each, batches)) for each in loaders]
    slots = batches * world * micro
    for rank, rank_batches in enumerate(got):
        assert len(rank_batches) == batches  # lockstep: one batch per call, never empty
        for n, batch in enumerate(rank_batches):
            first = window_start(0, n, world, rank, micro)
            assert (batch["object_id"], batch["window_slot"]) == expected_batches(order, bad, first, micro)
    bad_slots = sum(oid in bad for oid in order[:slots])
    assert sum(each.bad_samples for each in loaders) == bad_slots
    assert sum(each.samples for each in loaders) == slots - bad_slots
    fillers = sum(each.fillers for each in loaders)
    assert sum(len(b["object_id"]) for r in got for b in r) == slots - bad_slots + fillers
    if micro == 1:
        assert fillers == bad_slots
    records = [r for each in loaders for r in each.skipped]
    assert sum(r["lost"] for r in records) == bad_slots
    failures = {(Path(r["shard"]).name, r["epoch"]) for r in records if r["kind"] == "shard"}
    assert sum(r["kind"] == "shard" for r in records) == sum(each.bad_shards for each in loaders)
    assert sum(each.bad_shards for each in loaders) == len(failures)  # once per shard and epoch
    lost = {
        name: set(shard_objects(copy)[index]) & bad
        for name, index in (("shard-000000.tar", 0), ("shard-000003.tar", 3), ("shard-000005.tar", 5))
    }
    reached = {  # a failure is counted in an epoch iff the slot of its first lost sample was handed out
        (name, epoch)
        for name, ids in lost.items()
        for epoch in range(epochs)
        if min(p for p in range(epoch * OBJECTS, (epoch + 1) * OBJECTS) if order[p] in ids) < slots
    }
    assert failures == reached and len(reached) >= 4
    samples = [r for r in records if r["kind"] == "sample"]
    assert {(Path(r["shard"]).name, r["key"]) for r in samples} == {("shard-000001.tar", "rgb_front.png")}
    assert all(r["exact"] for r in records)
    cut = {r["reason"] for r in records if Path(r["shard"]).name == "shard-000000.tar"}
    assert cut == {"cannot read shard: it ends after 1 of 3 samples (truncated?)"}


# ----------------------------------------------------------------------------------- the assignment


@settings(max_examples=60, deadline=None, database=None)
@given(
    world=st.integers(1, 5),
    micro=st.integers(1, 4),
    workers=st.integers(1, 3),
    start=st.integers(0, 50),
    batches=st.integers(1, 12),
    block=st.tuples(st.integers(0, 120), st.integers(0, 40)),
)
def test_windows_partition_the_stream_and_each_worker_lists_its_own(
    world, micro, workers, start, batches, block
):
    """The windows of all ranks tile [P0, P0 + n*W*m) once; a worker's `positions` = exactly its windows'."""
    owner = {}
    for rank in range(world):
        for n in range(batches):
            for p in range(micro):
                position = window_start(start, n, world, rank, micro) + p
                assert position not in owner
                owner[position] = (rank, n % workers, n)
    assert sorted(owner) == list(range(start, start + batches * world * micro))
    first, stop = start + block[0], start + block[0] + block[1]
    for rank in range(world):
        for worker in range(workers):
            windows = shards_module._Windows(start, world, rank, micro, worker, workers, batch=worker)
            listed = [p for p in windows.positions(first, stop) if p < start + batches * world * micro]
            mine = [
                p for p, (r, w, _) in sorted(owner.items()) if r == rank and w == worker and first <= p < stop
            ]
            assert listed == mine
