"""The training stream's global sample order and its one-integer resumable state.

Order -- a pure function of (seed, data epoch, the shard list and its per-shard sample counts,
shuffle_buffer, shuffle_shards); world size, DataLoader workers and micro-batch play no part:
- data epoch e permutes the shard list with ``default_rng([seed, e])`` (identity without shuffle_shards);
- that list is cut into shuffle blocks of consecutive shards holding at least ``shuffle_buffer`` samples
  (whole shards; the last block may hold fewer; shards without samples hold no slot);
- block b's samples (its shards' samples concatenated in block order) are permuted with
  ``default_rng([seed, e, b])`` (identity when shuffle_buffer is 0).
Epochs are concatenated into ONE sequence of sample slots: position P names slot ``P % L`` of data epoch
``P // L`` (L = samples per epoch, the sum of the counts).

Assignment -- after a (re)start at position P0, the n-th batch (n = 0, 1, ...) that rank r hands out
covers the window ``P0 + (n*W + r)*m + [0, m)`` (`window_start`; W ranks, micro-batch m). The DataLoader
asks its K workers round-robin, so worker w makes the batches n = w, w+K, ...: no rotation is needed on a
restart, because n counts from P0. Once every rank handed out n batches, the position is P0 + n*W*m on all
of them -- the whole state of the order, valid under any W, K, m whose W*m divides it.

State (`StreamState`, format ``gnn3d-stream-state/2``): the seed and what fixes the order (shard
fingerprint: names + counts, shuffle settings), the position, and this rank's cumulative data counters
(good samples, bad samples, bad shards, fillers, skip records). `merge_stream_states` turns the states of
any old world size into the state of a new rank (counters onto rank 0). Format /1 (v0.1, per-worker
positions) cannot be mapped onto the global order and is refused.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

STATE_FORMAT = "gnn3d-stream-state/2"
LEGACY_FORMAT = "gnn3d-stream-state/1"
ORDER_KEYS = ("seed", "shards", "shuffle_buffer", "shuffle_shards")  # a resume must keep these
COUNTERS = ("samples", "bad_samples", "bad_shards", "fillers")


class StreamStateError(ValueError):
    """A saved stream state cannot continue this loader's stream (the message names the field)."""


# ------------------------------------------------------------------------------------------------ order


def epoch_shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Global shard order of a data epoch: int64 [num_shards]."""
    if not shuffle:
        return np.arange(num_shards)
    return np.random.default_rng([seed, epoch]).permutation(num_shards)


@dataclass(frozen=True)
class Block:
    """One shuffle block of a data epoch: consecutive shards of the epoch's shard order."""

    start: int  # in-epoch offset of the block's first slot
    shards: tuple[int, ...]  # indices into the shard list, in epoch order
    offsets: tuple[int, ...]  # block-local offset of each shard's first sample; the last entry is the size

    @property
    def size(self) -> int:
        return self.offsets[-1]


@dataclass(frozen=True)
class Slot:
    """Where a stream position points: data epoch, block, shard (list index) and sample within the shard."""

    position: int
    epoch: int
    block: int
    shard: int
    index: int


class GlobalOrder:
    """The global sample order (module docstring); caches the current epoch's blocks and a few permutations."""

    def __init__(self, counts: list[int], seed: int, shuffle_buffer: int, shuffle_shards: bool) -> None:
        self.counts, self.seed = [int(c) for c in counts], seed
        self.shuffle_buffer, self.shuffle_shards = shuffle_buffer, shuffle_shards
        self.samples_per_epoch = sum(self.counts)
        self._blocks: dict[int, list[Block]] = {}
        self._starts: dict[int, list[int]] = {}
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def blocks(self, epoch: int) -> list[Block]:
        """The shuffle blocks of a data epoch, in order."""
        if epoch not in self._blocks:
            if len(self._blocks) >= 2:  # a window or a filler search spans at most two epochs
                oldest = min(self._blocks)
                del self._blocks[oldest], self._starts[oldest]
            order = epoch_shard_order(len(self.counts), self.seed, epoch, self.shuffle_shards)
            self._blocks[epoch] = self._cut(order)
            self._starts[epoch] = [block.start for block in self._blocks[epoch]]
        return self._blocks[epoch]

    def _cut(self, order: np.ndarray) -> list[Block]:
        blocks, start, shards, offsets = [], 0, [], [0]
        for shard in (int(s) for s in order if self.counts[s] > 0):
            shards.append(shard)
            offsets.append(offsets[-1] + self.counts[shard])
            if offsets[-1] >= max(1, self.shuffle_buffer):
                blocks.append(Block(start, tuple(shards), tuple(offsets)))
                start, shards, offsets = start + offsets[-1], [], [0]
        if shards:
            blocks.append(Block(start, tuple(shards), tuple(offsets)))
        return blocks

    def permutation(self, epoch: int, block: int) -> np.ndarray:
        """Order of one block's samples: int64 [block size]; entry j = block-local sample of slot j."""
        key = (epoch, block)
        if key not in self._perms:
            if len(self._perms) >= 4:
                self._perms.pop(next(iter(self._perms)))
            size = self.blocks(epoch)[block].size
            rng = np.random.default_rng([self.seed, epoch, block])
            self._perms[key] = rng.permutation(size) if self.shuffle_buffer > 0 else np.arange(size)
        return self._perms[key]

    def locate(self, position: int) -> Slot:
        """The slot at a stream position."""
        epoch, offset = divmod(position, self.samples_per_epoch)
        blocks = self.blocks(epoch)
        b = bisect.bisect_right(self._starts[epoch], offset) - 1
        block = blocks[b]
        sample = int(self.permutation(epoch, b)[offset - block.start])
        i = bisect.bisect_right(block.offsets, sample) - 1
        return Slot(position, epoch, b, block.shards[i], sample - block.offsets[i])

    def first_position(self, slot: Slot, first_index: int, stop_index: int) -> int:
        """Lowest stream position among samples [first_index, stop_index) of the slot's shard in its block."""
        block = self.blocks(slot.epoch)[slot.block]
        base = block.offsets[block.shards.index(slot.shard)]
        perm = self.permutation(slot.epoch, slot.block)
        mask = (perm >= base + first_index) & (perm < base + stop_index)
        return slot.epoch * self.samples_per_epoch + block.start + int(np.flatnonzero(mask)[0])

    def block_positions(self, slot: Slot) -> tuple[int, int]:
        """[first, stop) stream positions of the slot's block."""
        block = self.blocks(slot.epoch)[slot.block]
        first = slot.epoch * self.samples_per_epoch + block.start
        return first, first + block.size


def window_start(start: int, batch: int, world_size: int, rank: int, batch_size: int) -> int:
    """First position of the `batch`-th window a rank hands out after a (re)start at `start`."""
    return start + (batch * world_size + rank) * batch_size


def shards_fingerprint(names: list[str], counts: list[int]) -> str:
    """What identifies the shard list for the order: file names (not paths: data may move) and counts."""
    text = json.dumps([[name, int(count)] for name, count in zip(names, counts)])
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ state


@dataclass
class StreamState:
    """Everything needed to continue the training stream (JSON-able via `to_dict`)."""

    seed: int
    shards: str  # shards_fingerprint
    num_shards: int
    samples_per_epoch: int
    shuffle_buffer: int
    shuffle_shards: bool
    position: int = 0  # slots consumed by the whole world
    samples: int = 0  # good samples this rank handed out (fillers not included)
    bad_samples: int = 0  # slots of this rank that held no usable sample (bad sample, lost to a bad shard)
    bad_shards: int = 0  # shard read failures (once per shard and data epoch, see datapipes.shards)
    fillers: int = 0  # filler samples handed out in windows without a good sample
    skipped: list[dict[str, Any]] = field(default_factory=list)  # one `shards` skip record each
    saved_by: dict[str, int] = field(default_factory=dict)  # rank, world size, workers, batch (information)

    def to_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> StreamState:
        """Inverse of `to_dict`; raises StreamStateError on a v0.1 or foreign record."""
        found = record.get("format")
        if found == LEGACY_FORMAT:
            raise StreamStateError(
                f"the checkpoint's data state has format {LEGACY_FORMAT} (gnn3d v0.1: per-worker positions), which "
                "cannot be mapped onto the global sample order; start a new run.dir from the weights: "
                "model.unet=<old run dir>"
            )
        if found != STATE_FORMAT:
            raise StreamStateError(f"not a stream state (format {found!r}, expected {STATE_FORMAT})")
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in record.items() if k in names})

    def check_matches(self, current: StreamState) -> None:
        """Refuse a state whose order is not this loader's order."""
        for key in ORDER_KEYS:
            saved, now = getattr(self, key), getattr(current, key)
            if saved != now:
                hint = ""
                if key == "shards":
                    hint = (
                        f" (saved: {self.num_shards} shards, {self.samples_per_epoch} samples per epoch; now: "
                        f"{current.num_shards} shards, {current.samples_per_epoch} samples)"
                    )
                raise StreamStateError(
                    f"saved data state has {key}={saved!r}, this run {key}={now!r}{hint}: the global sample order "
                    f"would differ; resume with the same {_CONFIG_KEYS[key]}, or start a new run.dir"
                )


_CONFIG_KEYS = {
    "seed": "run.seed",
    "shards": "data.shards (shard names and sample counts)",
    "shuffle_buffer": "data.shuffle_buffer",
    "shuffle_shards": "shard shuffling",
}


def check_resumable(state: dict[str, Any], *, world_size: int, batch_size: int) -> None:
    """Whether a saved state can continue under W ranks x micro-batch m: format /2 and W*m divides the position.

    Cheap (no shard access): preflight calls it; the seed and the shard list are checked by the loader.
    """
    position = StreamState.from_dict(state).position
    if position % (world_size * batch_size):
        raise StreamStateError(
            f"saved data position {position} is not a multiple of world size x micro-batch = "
            f"{world_size} x {batch_size}: the steps would not line up with the saved ones; keep the global "
            "batch (world size x micro-batch x grad accum) of the checkpoint"
        )


def merge_stream_states(states: list[dict[str, Any]], rank: int) -> dict[str, Any]:
    """The state for new rank `rank` from every saved rank's state (any old world size).

    The saved ranks must agree on the order and the position; their counters and skip records are summed
    onto new rank 0 (zero elsewhere), so the run's data totals stay cumulative.
    """
    if not states:
        raise StreamStateError("no saved data state to resume from")
    parsed = [StreamState.from_dict(state) for state in states]
    first = parsed[0]
    for index, other in enumerate(parsed[1:], start=1):
        for key in (*ORDER_KEYS, "position"):
            if getattr(other, key) != getattr(first, key):
                raise StreamStateError(
                    f"saved data states disagree on {key}: {getattr(first, key)!r} (state 0) vs "
                    f"{getattr(other, key)!r} (state {index}); the checkpoint is inconsistent"
                )
    counters = {key: sum(getattr(s, key) for s in parsed) if rank == 0 else 0 for key in COUNTERS}
    skipped = [record for s in parsed for record in s.skipped] if rank == 0 else []
    return replace(first, **counters, skipped=skipped).to_dict()


# ------------------------------------------------------------------------------------------ augmentation


def stable_id_hash(object_id: str) -> int:
    """A 63-bit process-independent hash of an object id (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(object_id.encode("utf-8")).digest()[:8], "big") >> 1


def example_rng(seed: int, epoch: int, object_id: str) -> np.random.Generator:
    """The augmentation RNG of one object in one epoch: independent of rank, worker and reader type."""
    return np.random.default_rng([seed, epoch, stable_id_hash(object_id)])
