"""Streaming shard reader: deterministic, resumable training stream and single-pass validation.

Public entry points (what the engine calls)::

    loader = build_train_loader("shards/manifest.json", batch_size=4, rank=rank, world_size=world,
                                seed=0, transform=TransformOptions(), workers=2, shuffle_buffer=256)
    for step, batch in zip(range(max_steps), loader):   # infinite: batches (datapipes.transform)
        ...
        client_state["data"] = loader.state_dict()       # JSON-able; count is of batches consumed here
    loader.load_state_dict(client_state["data"])          # before iterating: continue exactly there

    val = build_val_loader("shards/manifest.json", batch_size=4, rank=rank, world_size=world,
                           transform=TransformOptions(background="white"), workers=2)
    for batch in val: ...                                  # single pass, len(val) batches on EVERY rank

`urls` is any spec of `shard_io.resolve_shards`: brace pattern, list file, manifest (``split`` picks
train/val), local paths or ``pipe:`` URLs.

Training stream (`ShardStream`): infinite -- every rank and worker runs through data epochs forever, so no
rank ever runs dry and collectives cannot hang; the engine counts steps (`batches_per_epoch` gives
``total_samples // (world_size * batch_size)`` when the counts are known). Order and state are described in
`datapipes.stream_state`. Decoding, `make_example` and `collate` run on the DataLoader workers; each worker
batch carries its position, which the main process records only when the batch is handed out, so prefetched
batches never count. Needs at least ``world_size * workers`` shards (convert with smaller shards otherwise).

We use webdataset's URL layer (`gopen`: files, ``pipe:``, http) and its member-grouping convention, but not
its pipeline: the exact resume needs control of shard assignment, shuffling and skipping, and this avoids
webdataset's implicit node splitting defaults.

Signatures::

    build_train_loader(urls, *, batch_size, rank, world_size, seed, transform: TransformOptions, workers=2,
                       shuffle_buffer=256, bad_sample="skip", shuffle_shards=True, max_epochs=None,
                       split="train", pin_memory=False) -> ResumableLoader
    build_val_loader(urls, *, batch_size, rank, world_size, transform, workers=2, seed=0, bad_sample="skip",
                     split="val") -> ValLoader

Resume needs the same world size, workers, batch size and seed (else `StreamStateError` says which differs);
the URL list must be the same too. Memory: each worker holds one shuffle block of encoded samples
(``shuffle_buffer`` samples, rounded up to whole shards).

Bad data: ``bad_sample="skip"`` counts, records and continues; ``"raise"`` raises SampleError naming
shard, object and key (in the main process, with its own type: a worker hands it over with its batches).
A shard that cannot be read (deleted, truncated, corrupt tar) is a bad shard: the rest of it is lost and
counted as that many bad samples when the manifest gives its count (else as one, "at least"), and the
stream goes on with the next shard. The counts reach the main process with each batch, so they cover
exactly the batches handed out (`ResumableLoader.bad_samples`, `.bad_shards`, `.samples` good ones) and
`ResumableLoader.skipped` lists every skip (shard, object, member key, reason, samples lost, data epoch);
all of it is part of `state_dict()`, so the numbers stay cumulative over resumes. The main process warns
once per skip. The engine sums the counts over ranks, logs them and stops above ``data.max_bad_fraction``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from copy import deepcopy
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datapipes.render_folder import decode_raw_object
from datapipes.sample import SampleError
from datapipes.shard_io import (
    ShardEntry,
    ShardInfo,
    count_samples,
    entries_of,
    iter_shard_entries,
    raw_from_entry,
    resolve_shards,
)
from datapipes.stream_state import (
    StreamState,
    WorkerPosition,
    block_permutation,
    epoch_shard_order,
    example_rng,
    worker_shards,
)
from datapipes.transform import TransformOptions, collate, make_example

BAD_SAMPLE_POLICIES = ("skip", "raise")
META_KEY = "_stream"


class StreamError(RuntimeError):
    """The stream cannot be built or cannot make progress (message says what to change)."""


def decode_entry(entry: ShardEntry, opts: TransformOptions, seed: int, epoch: int) -> dict[str, Any]:
    """Shard entry -> example dict (decode, validate, `make_example`); raises SampleError."""
    sample = decode_raw_object(raw_from_entry(entry), opts.views)  # decodes only the selected views
    return make_example(sample, opts, example_rng(seed, epoch, sample.object_id))


def skip_record(error: SampleError, entry: ShardEntry, epoch: int) -> dict[str, Any]:
    """What was skipped, where and why (JSON-able): one line of the run's data report."""
    unreadable = entry.error is not None
    return {
        "kind": "shard" if unreadable else "sample",  # shard: the tar could not be read on from here
        "shard": entry.url,
        "object": error.object_id,
        "key": error.key,
        "reason": error.problem,
        "lost": entry.lost if unreadable else 1,
        "exact": entry.lost_exact if unreadable else True,
        "epoch": epoch,
    }


def describe_skip(record: dict[str, Any]) -> str:
    """One line for a skip record (the warning the main process prints)."""
    if record["kind"] == "sample":
        where = f"object {record['object']!r} in {record['shard']}: key {record['key']!r}"
        return f"skipping bad sample: {where}: {record['reason']} (data epoch {record['epoch']})"
    lost = f"{record['lost']} samples lost" + ("" if record["exact"] else " (at least; shard count unknown)")
    return (
        f"skipping bad samples: shard {record['shard']} unreadable from {record['object']!r} on: "
        f"{record['reason']}; {lost} (data epoch {record['epoch']})"
    )


class _BadSamples:
    """Applies the bad-sample policy: raise, or count and record the skip (`skip_record`)."""

    def __init__(self, policy: str, warn: bool = False) -> None:
        if policy not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {policy!r}")
        self.policy, self.warn = policy, warn
        self.samples, self.shards, self.records = 0, 0, []

    def handle(self, error: SampleError, entry: ShardEntry, epoch: int = 0) -> None:
        if self.policy == "raise":
            raise error
        record = skip_record(error, entry, epoch)
        self.samples += record["lost"]
        self.shards += record["kind"] == "shard"
        self.records.append(record)
        if self.warn:
            warnings.warn(describe_skip(record), stacklevel=2)

    def take(self) -> dict[str, Any]:
        """The counts and records since the last take (they travel with the next batch)."""
        taken = {"bad": self.samples, "bad_shards": self.shards, "skipped": self.records}
        self.samples, self.shards, self.records = 0, 0, []
        return taken


class ShardStream(IterableDataset):
    """Infinite (or `max_epochs`) stream of collated batches for one rank; see module docstring."""

    def __init__(
        self,
        shards: list[ShardInfo],
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        transform: TransformOptions,
        num_workers: int,
        shuffle_buffer: int = 256,
        shuffle_shards: bool = True,
        bad_sample: str = "skip",
        max_epochs: int | None = None,
    ) -> None:
        super().__init__()
        slots = world_size * max(1, num_workers)
        if len(shards) < slots:
            raise StreamError(
                f"{len(shards)} shards cannot feed {world_size} ranks x {max(1, num_workers)} workers; "
                "convert with a smaller --samples-per-shard or use fewer workers"
            )
        if not 0 <= rank < world_size:
            raise StreamError(f"rank {rank} outside world size {world_size}")
        _BadSamples(bad_sample)  # validate the policy name early, in the main process
        self.shards, self.transform, self.bad_sample = shards, transform, bad_sample
        self.shuffle_buffer, self.shuffle_shards, self.max_epochs = shuffle_buffer, shuffle_shards, max_epochs
        self.state = StreamState(seed, rank, world_size, max(1, num_workers), batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker_id = info.id if info is not None else 0
        # After n consumed batches the DataLoader's first batch must come from logical worker n % W.
        logical = (worker_id + self.state.batches) % self.state.num_workers
        try:
            yield from self._worker_batches(logical, self.state.position(logical))
        except (SampleError, StreamError) as error:
            # The DataLoader re-raises a worker's exception as a RuntimeError holding a traceback's text;
            # handed over as data it reaches the main process with its own type and one-line message.
            yield {META_KEY: {"worker": logical, "fatal": error}}

    def _worker_batches(self, worker: int, start: WorkerPosition) -> Iterator[dict[str, Any]]:
        st, bad = self.state, _BadSamples(self.bad_sample)
        epoch, block_start, offset = start.epoch, start.block_start, start.offset
        examples: list[dict[str, Any]] = []
        while self.max_epochs is None or epoch < self.max_epochs:
            order = epoch_shard_order(len(self.shards), st.seed, epoch, self.shuffle_shards)
            mine = worker_shards(order, st.rank, st.world_size, worker, st.num_workers)
            whole_epoch, good = block_start == 0 and offset == 0, 0
            while block_start < len(mine):
                entries, used = self._read_block(mine, block_start)
                perm = block_permutation(len(entries), st.seed, epoch, st.rank, worker, block_start)
                for j in range(offset, len(entries)):
                    entry = entries[perm[j]]
                    try:
                        examples.append(self.example(entry, epoch))
                        good += 1
                    except SampleError as error:
                        bad.handle(error, entry, epoch)
                    if len(examples) == st.batch_size:
                        yield self._batch(examples, worker, WorkerPosition(epoch, block_start, j + 1), bad)
                        examples = []
                block_start, offset = block_start + used, 0
            if whole_epoch and good == 0 and self.max_epochs is None:  # an infinite loop would never yield
                first = describe_skip(bad.records[0]) if bad.records else "its shards hold no samples"
                raise StreamError(
                    f"worker {worker} of rank {st.rank}: no good sample in data epoch {epoch} "
                    f"({bad.samples} bad samples in {len(mine)} shards; first: {first})"
                )
            epoch, block_start = epoch + 1, 0
        if examples or bad.records:  # only reachable with max_epochs: the last, partial batch (or the skips)
            yield self._batch(examples, worker, WorkerPosition(epoch, 0, 0), bad)

    def example(self, entry: ShardEntry, epoch: int) -> dict[str, Any]:
        """One shard entry -> example dict (runs on the worker); a subclass may change what is produced."""
        return decode_entry(entry, self.transform, self.state.seed, epoch)

    def _read_block(self, mine: list[int], block_start: int) -> tuple[list[ShardEntry], int]:
        """Read consecutive shards from `block_start` until >= shuffle_buffer samples; (entries, shards used)."""
        entries: list[ShardEntry] = []
        used = 0
        while block_start + used < len(mine) and (used == 0 or len(entries) < self.shuffle_buffer):
            entries.extend(entries_of(self.shards[mine[block_start + used]]))
            used += 1
        return entries, used

    @staticmethod
    def _batch(
        examples: list[dict], worker: int, position: WorkerPosition, bad: _BadSamples
    ) -> dict[str, Any]:
        batch = collate(examples) if examples else {}  # {}: only skips to report (end of a finite stream)
        batch[META_KEY] = {"worker": worker, **bad.take(), **vars(position)}
        return batch


class ResumableLoader:
    """Iterable of batches over a `ShardStream` with exact `state_dict()` / `load_state_dict()`.

    Iterating again after a break continues where the last handed-out batch left off.
    """

    def __init__(
        self, dataset: ShardStream, workers: int, prefetch_factor: int = 2, pin_memory: bool = False
    ):
        self.dataset, self.workers = dataset, workers
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self._state = deepcopy(dataset.state)

    @property
    def bad_samples(self) -> int:
        """Samples skipped so far under the "skip" policy (as seen by the training loop)."""
        return self._state.bad_samples

    @property
    def bad_shards(self) -> int:
        """Shard reads that failed so far (a deleted or damaged shard counts once per data epoch)."""
        return self._state.bad_shards

    @property
    def samples(self) -> int:
        """Good samples handed to the training loop so far."""
        return self._state.samples

    @property
    def skipped(self) -> list[dict[str, Any]]:
        """Every skip so far (`skip_record`: kind, shard, object, key, reason, lost, exact, epoch)."""
        return list(self._state.skipped)

    @property
    def batches_per_epoch(self) -> int | None:
        """total_samples // (world_size * batch_size) when every shard's count is known, else None."""
        counts = [s.samples for s in self.dataset.shards]
        if any(c is None for c in counts):
            return None
        return sum(counts) // (self._state.world_size * self._state.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset.state = deepcopy(self._state)  # workers get a copy of the dataset as of now
        extra = {"prefetch_factor": self.prefetch_factor} if self.workers > 0 else {}
        loader = DataLoader(
            self.dataset, batch_size=None, num_workers=self.workers, pin_memory=self.pin_memory, **extra
        )
        for batch in loader:
            meta = batch.pop(META_KEY)
            if "fatal" in meta:
                raise meta["fatal"]
            self._count_skips(meta)
            if not batch:
                continue
            self._state.positions[int(meta["worker"])] = WorkerPosition(
                int(meta["epoch"]), int(meta["block_start"]), int(meta["offset"])
            )
            self._state.batches += 1
            self._state.samples += len(batch["object_id"])
            yield batch

    def _count_skips(self, meta: dict[str, Any]) -> None:
        self._state.bad_samples += int(meta["bad"])
        self._state.bad_shards += int(meta["bad_shards"])
        for record in meta["skipped"]:
            self._state.skipped.append(record)
            warnings.warn(f"rank {self._state.rank}: {describe_skip(record)}", stacklevel=3)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state after the last batch handed out."""
        return self._state.to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state; raises StreamStateError if it belongs to another configuration."""
        loaded = StreamState.from_dict(state)
        loaded.check_matches(self.dataset.state)
        self._state = loaded


def build_train_loader(
    urls: str | list[str],
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    transform: TransformOptions,
    workers: int = 2,
    shuffle_buffer: int = 256,
    bad_sample: str = "skip",
    shuffle_shards: bool = True,
    max_epochs: int | None = None,
    split: str = "train",
    pin_memory: bool = False,
) -> ResumableLoader:
    """Infinite, deterministic, resumable training loader of batches for one rank (module docstring).

    max_epochs: stop after that many data epochs (tests / finite runs); None = infinite.
    """
    shards = resolve_shards(urls, split)
    stream = ShardStream(
        shards,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        transform=transform,
        num_workers=workers,
        shuffle_buffer=shuffle_buffer,
        shuffle_shards=shuffle_shards,
        bad_sample=bad_sample,
        max_epochs=max_epochs,
    )
    return ResumableLoader(stream, workers, pin_memory=pin_memory)


class ValStream(IterableDataset):
    """Single pass over all shards in order, split over ranks by sample so every rank gets equal batches.

    Rank r's j-th sample is global sample (r + j * world_size) mod N, j < ceil(N / world_size): all N
    samples are covered once and ranks short of a sample repeat one from the start (at most one per rank).
    Rank batch b holds its samples [b*B, (b+1)*B); DataLoader worker w makes the batches b = w mod workers.
    """

    def __init__(
        self, shards, *, batch_size, rank, world_size, transform, num_workers, seed=0, bad_sample="skip"
    ):
        super().__init__()
        self.shards, self.batch_size, self.rank, self.world_size = shards, batch_size, rank, world_size
        self.transform, self.num_workers, self.seed, self.bad_sample = (
            transform,
            max(1, num_workers),
            seed,
            bad_sample,
        )
        _BadSamples(bad_sample)  # validate the policy name early, in the main process
        self.total = sum(s.samples if s.samples is not None else self._count(s.url) for s in shards)
        self.per_rank = math.ceil(self.total / world_size) if self.total else 0
        # A DataLoader worker without a batch would still be polled; use no more workers than batches.
        self.num_workers = max(1, min(self.num_workers, len(self)))

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def batch_indices(self, batch: int) -> list[int]:
        """Global sample indices of one of this rank's batches."""
        stop = min((batch + 1) * self.batch_size, self.per_rank)
        return [(self.rank + j * self.world_size) % self.total for j in range(batch * self.batch_size, stop)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        plan = [self.batch_indices(b) for b in range(worker, len(self), self.num_workers)]
        needed: dict[int, int] = {}
        for indices in plan:
            for index in indices:
                needed[index] = needed.get(index, 0) + 1
        held: dict[int, ShardEntry] = {}
        bad, next_batch = _BadSamples(self.bad_sample, warn=True), 0
        for index, entry in enumerate(self._readable_entries(bad)):
            if index in needed:
                held[index] = entry
            while next_batch < len(plan) and all(i in held for i in plan[next_batch]):
                yield from self._make_batch(plan[next_batch], held, needed, bad)
                next_batch += 1
        for indices in plan[next_batch:]:  # a damaged shard held fewer samples than its manifest count
            missing = [i for i in indices if i not in held]
            error = SampleError(f"<sample {missing[0]}>", "count", f"shards hold < {self.total} samples")
            bad.handle(error, ShardEntry(self.shards[-1].url, error.object_id, {}))
            yield from self._make_batch([i for i in indices if i in held], held, needed, bad)

    def _count(self, url: str) -> int:
        if self.bad_sample == "raise":
            return count_samples(url)
        return sum(entry.error is None for entry in iter_shard_entries(url))

    def _readable_entries(self, bad: _BadSamples) -> Iterator[ShardEntry]:
        """Entries of all shards in order; a tar read error goes to the bad-sample policy, not the index."""
        for shard in self.shards:
            for entry in iter_shard_entries(shard.url):
                if entry.error is None:
                    yield entry
                else:
                    bad.handle(entry.error, entry)

    def _make_batch(self, indices, held, needed, bad) -> Iterator[dict[str, Any]]:
        examples = []
        for index in indices:
            try:
                examples.append(decode_entry(held[index], self.transform, self.seed, 0))
            except SampleError as error:
                bad.handle(error, held[index])
            needed[index] -= 1
            if needed[index] == 0:
                del held[index]
        if examples:  # under "skip" a batch may shrink, and vanishes only if all its samples were bad
            yield collate(examples)


class ValLoader:
    """Single-pass validation loader: `len()` batches, the same number on every rank."""

    def __init__(self, dataset: ValStream, workers: int) -> None:
        self.dataset, self.workers = dataset, workers

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        workers = self.dataset.num_workers if self.workers > 0 else 0
        yield from DataLoader(self.dataset, batch_size=None, num_workers=workers)


def build_val_loader(
    urls: str | list[str],
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    transform: TransformOptions,
    workers: int = 2,
    seed: int = 0,
    bad_sample: str = "skip",
    split: str = "val",
) -> ValLoader:
    """Single-pass validation loader of batches for one rank (see `ValStream`)."""
    dataset = ValStream(
        resolve_shards(urls, split),
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        transform=transform,
        num_workers=workers,
        seed=seed,
        bad_sample=bad_sample,
    )
    return ValLoader(dataset, workers)


def tensor_bytes(batch: dict[str, Any]) -> bytes:
    """All tensors of a batch as bytes in key order (for byte-for-byte comparisons in tests/benchmarks)."""
    parts = [repr(batch["object_id"]).encode()]
    parts += [batch[k].numpy().tobytes() for k in sorted(batch) if isinstance(batch[k], torch.Tensor)]
    return b"".join(parts)
