"""Streaming shard reader: the training stream in one global sample order (elastic resume), and validation.

Public entry points (what the engine calls)::

    loader = build_train_loader("shards/manifest.json", batch_size=4, rank=rank, world_size=world,
                                seed=0, transform=TransformOptions(), workers=2, shuffle_buffer=256)
    for step, batch in zip(range(max_steps), loader):   # infinite: batches (datapipes.transform)
        ...
        client_state["data"] = loader.state_dict()       # JSON-able, tiny: one position + data counters
    # resume, under the same or another world size / workers / micro-batch:
    loader.load_state_dict(merge_stream_states(states_of_every_saved_rank, rank))

    val = build_val_loader("shards/manifest.json", batch_size=4, rank=rank, world_size=world,
                           transform=TransformOptions(background="white"), workers=2)
    for batch in val: ...                                  # single pass, len(val) batches on EVERY rank

`urls` is any spec of `shard_io.resolve_shards`: brace pattern, list file, manifest (``split`` picks
train/val), local paths or ``pipe:`` URLs.

Training stream (`ShardStream`): the order and the state are in `datapipes.stream_state` -- one sequence of
sample slots per data epoch, independent of world size, workers and micro-batch; rank r's n-th batch
after a (re)start at position P0 is the window ``P0 + (n*W + r)*m + [0, m)``. Infinite: every rank hands
out exactly one batch per call, forever, so collectives cannot hang; `batches_per_epoch` =
``samples_per_epoch // (world_size * batch_size)``. Any number of shards feeds any number of ranks and
workers. The per-shard sample counts come from the manifest; without one each shard is counted once when the
loader is built (local tars: headers only; ``pipe:``/http: read through).

Reading: DataLoader worker w makes the batches n = w, w+K, ... (K workers; the DataLoader hands them out
round-robin, in n order) and reads ONLY the samples of its windows. A local ``.tar`` is indexed once per
shuffle block (its tar headers: member offsets, `shard_io.index_shard`) and each sample read by offset, so
a rank reads about its share of the data. A shard that is not seekable (``pipe:``, http, compressed) is
streamed through once per block by each worker that needs one of its samples, keeping only the samples of
that worker's windows: I/O up to W*K times the data for such URLs (prefer local or node-local copies).
Memory per worker: the indexes of the shards of at most two blocks (offsets, not bytes; a window may
straddle two), or for streamed shards the worker's own samples of those blocks. Decoding, `make_example` and `collate` run on the workers; each batch
carries the position after it and its data counts, recorded by the main process only when the batch is
handed out, so prefetched batches never count.

Bad data. A slot whose sample cannot be used is a bad slot: a sample that fails to decode (``"sample"``
record), or a sample lost because its shard cannot be read from some point on (deleted, truncated, corrupt
tar: the slots of the shard's samples from there on are lost). Under ``bad_sample="skip"`` a bad slot is
dropped from its batch, so the batch is SHORTER than m; nothing from outside the window moves in, so the
order, the position and the other ranks' windows stay the same. ``batch["window_slot"]`` lists each
object's index i in its window (the engine keys the object's noise on it). A window whose slots are all bad
carries one filler instead of being empty: the first good sample after the window in the global order
(``window_slot`` [0]), counted in `fillers`, not in `samples` -- every rank hands out exactly one non-empty
batch per micro-step (lockstep). Counts: `samples` (good slots handed out), `bad_samples` (bad slots),
`fillers`; over all ranks samples + bad_samples = the slots consumed. `skipped` holds one record per
batch and cause (`skip_record`: kind, shard, object, key, reason, lost, exact, epoch): kind ``"shard"``
is a shard read failure, counted in `bad_shards` once per shard and data epoch, on the batch holding the
failure's first lost slot in the global order; its other lost slots (other batches, ranks) are kind
``"lost"``. A shard deleted while being read may be seen readable by some workers and not by others in
that epoch: its lost slots are still counted exactly, its failure possibly not (it is from the next epoch).
``"raise"`` raises SampleError naming shard, object and key (in the main process, with its own type: a
worker hands it over with its batches). All counts are part of `state_dict()`, so they stay cumulative
over resumes; the engine sums them over ranks, logs them and stops above ``data.max_bad_fraction``.

We use webdataset's URL layer (`gopen`: files, ``pipe:``, http) and its member-grouping convention, but not
its pipeline: the global order needs control of shard assignment, shuffling and random access.

Signatures::

    build_train_loader(urls, *, batch_size, rank, world_size, seed, transform: TransformOptions, workers=2,
                       shuffle_buffer=256, bad_sample="skip", shuffle_shards=True, max_epochs=None,
                       split="train", pin_memory=False) -> ResumableLoader
    build_val_loader(urls, *, batch_size, rank, world_size, transform, workers=2, seed=0, bad_sample="skip",
                     split="val") -> ValLoader
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datapipes.render_folder import decode_raw_object
from datapipes.sample import SampleError
from datapipes.shard_io import (
    ShardEntry,
    ShardIndex,
    ShardInfo,
    count_samples,
    count_slots,
    index_shard,
    is_seekable,
    iter_shard_entries,
    raw_from_entry,
    read_indexed,
    resolve_shards,
    shard_name,
)
from datapipes.stream_state import (
    GlobalOrder,
    Slot,
    StreamState,
    StreamStateError,
    example_rng,
    shards_fingerprint,
    window_start,
)
from datapipes.transform import TransformOptions, collate, make_example

BAD_SAMPLE_POLICIES = ("skip", "raise")
META_KEY = "_stream"
WINDOW_SLOT_KEY = "window_slot"


class StreamError(RuntimeError):
    """The stream cannot be built or cannot make progress (message says what to change)."""


def decode_entry(entry: ShardEntry, opts: TransformOptions, seed: int, epoch: int) -> dict[str, Any]:
    """Shard entry -> example dict (decode, validate, `make_example`); raises SampleError."""
    sample = decode_raw_object(raw_from_entry(entry), opts.views)  # decodes only the selected views
    return make_example(sample, opts, example_rng(seed, epoch, sample.object_id))


def skip_record(
    error: SampleError, url: str, epoch: int, *, kind: str = "sample", lost: int = 1, exact: bool = True
) -> dict[str, Any]:
    """What was skipped, where and why (JSON-able): one line of the run's data report.

    kind: "sample" (it failed to decode), "shard" (a shard read failure, `lost` of its samples in this
    batch), "lost" (more samples lost to a shard failure recorded elsewhere). exact: False when the shard's
    sample count is not known (no manifest and the count itself hit the failure), so `lost` is a lower bound.
    """
    return {
        "kind": kind,
        "shard": url,
        "object": error.object_id,
        "key": error.key,
        "reason": error.problem,
        "lost": lost,
        "exact": exact,
        "epoch": epoch,
    }


def describe_skip(record: dict[str, Any]) -> str:
    """One line for a skip record (the warning the main process prints)."""
    if record["kind"] == "sample":
        where = f"object {record['object']!r} in {record['shard']}: key {record['key']!r}"
        return f"skipping bad sample: {where}: {record['reason']} (data epoch {record['epoch']})"
    lost = f"{record['lost']} samples lost" + ("" if record["exact"] else " (at least; shard count unknown)")
    what = "unreadable" if record["kind"] == "shard" else "(already reported) unreadable"
    return (
        f"skipping bad samples: shard {record['shard']} {what} from {record['object']!r} on: "
        f"{record['reason']}; {lost} (data epoch {record['epoch']})"
    )


class _WindowSkips:
    """The bad slots of one window under the policy: raise, or count them into skip records."""

    def __init__(self, policy: str) -> None:
        if policy not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {policy!r}")
        self.policy, self.records = policy, []

    def sample(self, error: SampleError, url: str, epoch: int) -> None:
        if self.policy == "raise":
            raise error
        self.records.append(skip_record(error, url, epoch))

    def lost(self, entry: ShardEntry, epoch: int, first: bool, exact: bool) -> None:
        """A slot lost to a shard read failure; `first`: it is the failure's first lost slot."""
        if self.policy == "raise":
            raise entry.error
        for record in self.records:  # one record per shard and window
            if record["kind"] != "sample" and record["shard"] == entry.url and record["epoch"] == epoch:
                record["lost"] += 1
                record["kind"] = "shard" if first else record["kind"]
                return
        kind = "shard" if first else "lost"
        self.records.append(skip_record(entry.error, entry.url, epoch, kind=kind, exact=exact))

    def counts(self) -> dict[str, Any]:
        return {
            "bad": sum(r["lost"] for r in self.records),
            "bad_shards": sum(r["kind"] == "shard" for r in self.records),
            "skipped": self.records,
        }


@dataclass
class _ShardView:
    """What one worker knows of a shard in one block: its first `readable` samples can be read."""

    readable: int
    error: SampleError | None  # why the samples from `readable` on cannot be read
    index: ShardIndex | None = None  # a local tar: samples read by offset
    kept: dict[int, ShardEntry] = field(default_factory=dict)  # a streamed shard: this worker's samples


@dataclass
class _Windows:
    """The windows of one worker of one rank after a (re)start at `start` (stream_state: assignment)."""

    start: int
    world_size: int
    rank: int
    batch_size: int
    worker: int
    workers: int
    batch: int = 0  # the batch being made

    def first(self, batch: int) -> int:
        return window_start(self.start, batch, self.world_size, self.rank, self.batch_size)

    def positions(self, first: int, stop: int) -> Iterator[int]:
        """The positions in [first, stop) that this worker's windows from `batch` on will read."""
        n = max(self.batch, (first - self.start) // (self.world_size * self.batch_size) - 1)
        n += (self.worker - n) % self.workers
        while self.first(n) < stop:
            a = self.first(n)
            yield from range(max(a, first), min(a + self.batch_size, stop))
            n += self.workers


class SlotReader:
    """One worker's access to the global order: the shard entry at a position, reading only what it needs.

    Holds the shard views of at most two blocks (a window may straddle two).
    """

    def __init__(self, shards: list[ShardInfo], counts: list[int], order: GlobalOrder, windows: _Windows):
        self.shards, self.counts, self.order, self.windows = shards, counts, order, windows
        self._blocks: dict[tuple[int, int], dict[int, _ShardView]] = {}

    def read(self, position: int) -> tuple[Slot, ShardEntry]:
        """(slot, entry); an entry with `error` set when the slot's sample is lost to a shard failure."""
        slot = self.order.locate(position)
        view = self._view(slot)
        if slot.index < view.readable:
            entry = self._read(slot, view)
            if entry.error is None:
                return slot, entry
            if view.index is not None:  # the file changed since it was indexed (deleted, rewritten)
                view = self._blocks[(slot.epoch, slot.block)][slot.shard] = self._open(slot)
                if slot.index < view.readable:
                    entry = read_indexed(view.index, slot.index)
                    if entry.error is None:
                        return slot, entry
                    view.readable, view.error = slot.index, entry.error  # lost from this sample on
        return slot, ShardEntry(self.shards[slot.shard].url, view.error.object_id, {}, view.error)

    def _read(self, slot: Slot, view: _ShardView) -> ShardEntry:
        if view.index is not None:
            return read_indexed(view.index, slot.index)
        if slot.index not in view.kept:  # a filler outside this worker's windows: stream the shard again
            again = self._stream(slot, {slot.index})
            if slot.index not in again.kept:  # the shard changed since
                view.readable, view.error = min(view.readable, again.readable), again.error
                return ShardEntry(self.shards[slot.shard].url, again.error.object_id, {}, again.error)
            view.kept[slot.index] = again.kept[slot.index]
        return view.kept[slot.index]

    def first_loss(self, slot: Slot) -> bool:
        """Whether the slot is the first lost slot of its shard's failure in the global order."""
        view = self._view(slot)
        return slot.position == self.order.first_position(slot, view.readable, self.counts[slot.shard])

    def _view(self, slot: Slot) -> _ShardView:
        key = (slot.epoch, slot.block)
        if key not in self._blocks:
            if len(self._blocks) >= 2:
                del self._blocks[next(iter(self._blocks))]  # the oldest block: reads only move forward
            self._blocks[key] = {}
        views = self._blocks[key]
        if slot.shard not in views:
            views[slot.shard] = self._open(slot)
        return views[slot.shard]

    def _open(self, slot: Slot) -> _ShardView:
        url, count = self.shards[slot.shard].url, self.counts[slot.shard]
        if not is_seekable(url):
            return self._stream(slot, self._wanted(slot))
        index = index_shard(url)
        readable = min(len(index.samples), count)
        error = index.error if readable < count else None
        if readable < count and error is None:  # tarfile reads a tar cut at a header as a shorter valid one
            problem = f"cannot read shard: it ends after {readable} of {count} samples (truncated?)"
            last = index.samples[-1][0] if index.samples else "<start of shard>"
            error = SampleError(last, "tar", problem, url)
        return _ShardView(readable, error, index)

    def _wanted(self, slot: Slot) -> set[int]:
        """Samples of the slot's shard that this worker's windows read in the slot's block."""
        first, stop = self.order.block_positions(slot)
        block = self.order.blocks(slot.epoch)[slot.block]
        base = block.offsets[block.shards.index(slot.shard)]
        perm = self.order.permutation(slot.epoch, slot.block)
        wanted = {int(perm[p - first]) - base for p in self.windows.positions(first, stop)}
        return {i for i in wanted if 0 <= i < self.counts[slot.shard]} | {slot.index}

    def _stream(self, slot: Slot, wanted: set[int]) -> _ShardView:
        url, count = self.shards[slot.shard].url, self.counts[slot.shard]
        kept, read, last = {}, 0, "<start of shard>"
        for entry in iter_shard_entries(url):
            if entry.error is not None:
                return _ShardView(read, entry.error, kept=kept)
            if read in wanted:
                kept[read] = entry
            read, last = read + 1, entry.key
            if read == count:
                break  # extra samples beyond the count are not part of the order
        if read < count:
            problem = f"cannot read shard: it ends after {read} of {count} samples (truncated?)"
            return _ShardView(read, SampleError(last, "tar", problem, url), kept=kept)
        return _ShardView(read, None, kept=kept)


class ShardStream(IterableDataset):
    """Infinite (or `max_epochs`) stream of collated batches for one rank; see the module docstring.

    `start` is the stream position the next iteration starts at (set by `ResumableLoader`). num_workers
    is not part of the order (the DataLoader's worker count is what counts); it is accepted for callers.
    """

    def __init__(
        self,
        shards: list[ShardInfo],
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        transform: TransformOptions,
        num_workers: int = 0,
        shuffle_buffer: int = 256,
        shuffle_shards: bool = True,
        bad_sample: str = "skip",
        max_epochs: int | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise StreamError(f"rank {rank} outside world size {world_size}")
        if batch_size < 1:
            raise StreamError(f"batch size {batch_size} must be at least 1")
        _WindowSkips(bad_sample)  # validate the policy name early, in the main process
        self.shards, self.transform, self.bad_sample = shards, transform, bad_sample
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.shuffle_buffer, self.shuffle_shards, self.max_epochs = shuffle_buffer, shuffle_shards, max_epochs
        known = [(s.samples, True) if s.samples is not None else count_slots(s.url) for s in shards]
        self.counts, self.exact = [c for c, _ in known], [e for _, e in known]
        self.order = GlobalOrder(self.counts, seed, shuffle_buffer, shuffle_shards)
        self.start = 0

    @property
    def end(self) -> int | None:
        """The position where a finite stream (max_epochs) ends; None for the infinite stream."""
        return None if self.max_epochs is None else self.max_epochs * self.order.samples_per_epoch

    def initial_state(self, workers: int) -> StreamState:
        """The state at the start of the stream (position 0, no counts)."""
        names = [shard_name(s.url) for s in self.shards]
        saved_by = {
            "rank": self.rank,
            "world_size": self.world_size,
            "workers": workers,
            "batch_size": self.batch_size,
        }
        return StreamState(
            self.seed, shards_fingerprint(names, self.counts), len(self.shards), self.order.samples_per_epoch,
            self.shuffle_buffer, self.shuffle_shards, saved_by=saved_by,
        )  # fmt: skip

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        windows = _Windows(self.start, self.world_size, self.rank, self.batch_size, worker, workers, worker)
        reader = SlotReader(self.shards, self.counts, self.order, windows)
        try:
            if self.order.samples_per_epoch == 0:
                raise StreamError(f"no good sample: the {len(self.shards)} shards hold no samples")
            while self.end is None or windows.first(windows.batch) < self.end:
                batch = self._window_batch(reader, windows.first(windows.batch))
                after = self.start + (windows.batch + 1) * self.world_size * self.batch_size
                batch[META_KEY]["position"] = after  # once every rank handed out this batch
                yield batch
                windows.batch += workers
        except (SampleError, StreamError) as error:
            # The DataLoader re-raises a worker's exception as a RuntimeError holding a traceback's text;
            # handed over as data it reaches the main process with its own type and one-line message.
            yield {META_KEY: {"fatal": error}}

    def _window_batch(self, reader: SlotReader, first: int) -> dict[str, Any]:
        """The batch of the window starting at `first`: its good samples, or one filler (module docstring)."""
        stop = first + self.batch_size if self.end is None else min(first + self.batch_size, self.end)
        examples, slots, skips = [], [], _WindowSkips(self.bad_sample)
        for position in range(first, stop):
            slot, entry = reader.read(position)
            if entry.error is not None:
                skips.lost(entry, slot.epoch, reader.first_loss(slot), self.exact[slot.shard])
                continue
            try:
                examples.append(self.example(entry, slot.epoch))
                slots.append(position - first)
            except SampleError as error:
                skips.sample(error, entry.url, slot.epoch)
        good = len(examples)
        if not examples:
            filler = self._filler(reader, stop)
            examples, slots = ([filler], [0]) if filler is not None else ([], [])
        batch = collate(examples) if examples else {}  # {}: the end of a finite stream, only skips to report
        if examples:
            batch[WINDOW_SLOT_KEY] = slots
        batch[META_KEY] = {"good": good, "fillers": len(examples) - good, **skips.counts()}
        return batch

    def _filler(self, reader: SlotReader, after: int) -> dict[str, Any] | None:
        """The first good sample from position `after` on (None at the end of a finite stream)."""
        span = self.order.samples_per_epoch  # a whole epoch of slots without a good sample: there is none
        for position in range(after, after + span):
            if self.end is not None and position >= self.end:
                return None
            slot, entry = reader.read(position)
            if entry.error is None:
                try:
                    return self.example(entry, slot.epoch)
                except SampleError:
                    pass  # another window's slot: its own reader counts it
        raise StreamError(
            f"rank {self.rank}: no good sample in the {span} slots (a whole data epoch) after stream position "
            f"{after}: every sample of the {len(self.shards)} shards is bad or unreadable"
        )

    def example(self, entry: ShardEntry, epoch: int) -> dict[str, Any]:
        """One shard entry -> example dict (runs on the worker); a subclass may change what is produced."""
        return decode_entry(entry, self.transform, self.seed, epoch)


class ResumableLoader:
    """Iterable of batches over a `ShardStream` with exact `state_dict()` / `load_state_dict()`.

    Iterating again after a break continues where the last handed-out batch left off.
    """

    def __init__(
        self, dataset: ShardStream, workers: int, prefetch_factor: int = 2, pin_memory: bool = False
    ):
        self.dataset, self.workers = dataset, workers
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self._state = dataset.initial_state(workers)

    @property
    def position(self) -> int:
        """Slots of the global order consumed by the whole world so far (the stream's state)."""
        return self._state.position

    @property
    def bad_samples(self) -> int:
        """Bad slots of this rank so far under the "skip" policy (as seen by the training loop)."""
        return self._state.bad_samples

    @property
    def bad_shards(self) -> int:
        """Shard read failures counted by this rank (once per shard and data epoch over all ranks)."""
        return self._state.bad_shards

    @property
    def samples(self) -> int:
        """Good samples this rank handed to the training loop so far (fillers not included)."""
        return self._state.samples

    @property
    def fillers(self) -> int:
        """Filler samples handed out in windows that held no good sample."""
        return self._state.fillers

    @property
    def skipped(self) -> list[dict[str, Any]]:
        """Every skip so far (`skip_record`: kind, shard, object, key, reason, lost, exact, epoch)."""
        return list(self._state.skipped)

    @property
    def samples_per_epoch(self) -> int:
        """Slots of one data epoch (the sum of the shards' sample counts)."""
        return self.dataset.order.samples_per_epoch

    @property
    def batches_per_epoch(self) -> int:
        """samples_per_epoch // (world_size * batch_size): batches per rank in one data epoch."""
        return self.samples_per_epoch // (self.dataset.world_size * self.dataset.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset.start = self._state.position  # workers get a copy of the dataset as of now
        extra = {"prefetch_factor": self.prefetch_factor} if self.workers > 0 else {}
        loader = DataLoader(
            self.dataset, batch_size=None, num_workers=self.workers, pin_memory=self.pin_memory, **extra
        )
        for batch in loader:
            meta = batch.pop(META_KEY)
            if "fatal" in meta:
                raise meta["fatal"]
            self._count(meta)
            if batch:
                yield batch

    def _count(self, meta: dict[str, Any]) -> None:
        state = self._state
        state.position = int(meta["position"])
        state.samples += int(meta["good"])
        state.fillers += int(meta["fillers"])
        state.bad_samples += int(meta["bad"])
        state.bad_shards += int(meta["bad_shards"])
        for record in meta["skipped"]:
            state.skipped.append(record)
            warnings.warn(f"rank {self.dataset.rank}: {describe_skip(record)}", stacklevel=3)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state after the last batch handed out (format stream_state.STATE_FORMAT)."""
        return self._state.to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state (from any world size, workers, micro-batch: merge it first with
        `stream_state.merge_stream_states`). Raises StreamStateError when it belongs to another order or its
        position is not a multiple of world size x micro-batch."""
        loaded = StreamState.from_dict(state)
        loaded.check_matches(self._state)
        stride = self.dataset.world_size * self.dataset.batch_size
        if loaded.position % stride:
            raise StreamStateError(
                f"saved data position {loaded.position} is not a multiple of world size x micro-batch = "
                f"{self.dataset.world_size} x {self.dataset.batch_size}; keep the checkpoint's global batch"
            )
        loaded.saved_by = self._state.saved_by
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
    """Infinite, deterministic, elastic training loader of batches for one rank (module docstring).

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


class _BadSamples:
    """The validation reader's bad-sample policy: raise, or count and record the skip (`skip_record`)."""

    def __init__(self, policy: str, warn: bool = False) -> None:
        if policy not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {policy!r}")
        self.policy, self.warn = policy, warn
        self.records: list[dict[str, Any]] = []

    def handle(self, error: SampleError, entry: ShardEntry, epoch: int = 0) -> None:
        if self.policy == "raise":
            raise error
        unreadable = entry.error is not None  # the shard could not be read on from here: count unknown
        kind = "shard" if unreadable else "sample"
        record = skip_record(error, entry.url, epoch, kind=kind, exact=not unreadable)
        self.records.append(record)
        if self.warn:
            warnings.warn(describe_skip(record), stacklevel=2)


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
