"""The streaming reader's order and its tiny resumable state.

Order (a pure function of seed, epoch, rank, world size and worker count):
- data epoch e permutes the shard list with ``default_rng([seed, e])`` (same on every rank);
- rank r takes ``perm[r::world_size]``, its logical worker w takes ``rank_shards[w::num_workers]``;
  so within one data epoch every sample is read by exactly one (rank, worker);
- a worker reads its shards in shuffle blocks: consecutive shards until the block holds at least
  ``shuffle_buffer`` samples; the block's samples are permuted with ``default_rng([seed, e, r, w, start])``.

State: per logical worker the position of the next sample, ``(epoch, block_start, offset)`` =
the block's first shard in the worker's epoch list and how many of the block's (permuted) samples are used.
Resuming skips whole shards before ``block_start`` without opening them, reads the block, and skips
``offset`` samples without decoding them. The main process counts consumed batches; a DataLoader hands out
batches round-robin from its workers, so after ``n`` batches the next one comes from logical worker
``n % num_workers`` -- a restarted loader rotates worker ids by that amount.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

STATE_FORMAT = "gnn3d-stream-state/1"


class StreamStateError(ValueError):
    """A saved stream state does not fit this loader (different world size, workers, batch size or seed)."""


@dataclass
class WorkerPosition:
    """Where a logical worker continues: data epoch, first shard of its block, samples of the block used."""

    epoch: int = 0
    block_start: int = 0
    offset: int = 0


@dataclass
class StreamState:
    """Everything needed to continue a training stream exactly (JSON-serialisable via `to_dict`)."""

    seed: int
    rank: int
    world_size: int
    num_workers: int
    batch_size: int
    batches: int = 0  # batches handed to the training loop
    samples: int = 0  # good samples in those batches
    bad_samples: int = 0  # samples skipped under the "skip" policy (a bad shard's lost samples included)
    bad_shards: int = 0  # shard reads that failed (once per data epoch in which it failed)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # one `shards.skip_record` per skip
    positions: dict[int, WorkerPosition] = field(default_factory=dict)

    def position(self, worker: int) -> WorkerPosition:
        """The position of a logical worker (start of the stream if it never produced a batch)."""
        return self.positions.get(worker, WorkerPosition())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (worker ids become strings, as JSON keys must)."""
        record = asdict(self)
        record["positions"] = {str(k): asdict(v) for k, v in self.positions.items()}
        record["format"] = STATE_FORMAT
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> StreamState:
        """Inverse of `to_dict`; raises StreamStateError on a foreign record."""
        if record.get("format") != STATE_FORMAT:
            raise StreamStateError(f"not a stream state (format {record.get('format')!r})")
        fields = {k: v for k, v in record.items() if k not in ("format", "positions")}
        # States saved before good samples were counted: every batch of the infinite stream is full.
        fields.setdefault("samples", fields.get("batches", 0) * fields.get("batch_size", 0))
        positions = {int(k): WorkerPosition(**v) for k, v in record["positions"].items()}
        return cls(**fields, positions=positions)

    def check_matches(self, other: StreamState) -> None:
        """Refuse to resume under a different configuration: the order would not be the same stream."""
        keys = ("seed", "rank", "world_size", "num_workers", "batch_size")
        diff = {
            k: (getattr(self, k), getattr(other, k)) for k in keys if getattr(self, k) != getattr(other, k)
        }
        if diff:
            raise StreamStateError(
                f"saved data state does not match this loader (saved, current): {diff}. Resume with the same "
                "world size, DataLoader workers, batch size and seed, or start the data stream afresh."
            )


def epoch_shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Global shard order of a data epoch: int64 [num_shards], identical on every rank."""
    if not shuffle:
        return np.arange(num_shards)
    return np.random.default_rng([seed, epoch]).permutation(num_shards)


def worker_shards(order: np.ndarray, rank: int, world_size: int, worker: int, num_workers: int) -> list[int]:
    """Shard indices read by one (rank, logical worker) in a data epoch."""
    return [int(i) for i in order[rank::world_size][worker::num_workers]]


def block_permutation(
    size: int, seed: int, epoch: int, rank: int, worker: int, block_start: int
) -> np.ndarray:
    """Order of the samples of one shuffle block: int64 [size]."""
    return np.random.default_rng([seed, epoch, rank, worker, block_start]).permutation(size)


def stable_id_hash(object_id: str) -> int:
    """A 63-bit process-independent hash of an object id (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(object_id.encode("utf-8")).digest()[:8], "big") >> 1


def example_rng(seed: int, epoch: int, object_id: str) -> np.random.Generator:
    """The augmentation RNG of one object in one epoch: independent of rank, worker and reader type."""
    return np.random.default_rng([seed, epoch, stable_id_hash(object_id)])
