"""Which objects each rank trained on: ``run.dir/samples/rank{r}.jsonl`` when ``logging.sample_ids`` is on.

One line per micro-step, ``{"step", "micro_step", "rank", "ids", "slots"}``: ``step`` is the optimizer step
the batch is trained in (1-based), ``slots`` each object's slot-in-step (its place in the step's global batch,
which also keys its noise: ``engine.randomness``). It lets a user audit the data order: after a resume on any number of processes, the
objects of every data epoch are the same multiset, none seen twice. A resume first drops the lines of steps
after its checkpoint (a killed run may have logged a few), so the files describe the run that counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

import torch.distributed as dist


def samples_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "samples"


class SampleLog:
    """Appends this rank's lines; a disabled log writes nothing."""

    def __init__(self, run_dir: Path, rank: int, enabled: bool):
        self.enabled, self.rank = enabled, rank
        self._path = samples_dir(run_dir) / f"rank{rank}.jsonl"
        self._file: IO[str] | None = None

    def start(self, start_step: int, *, is_main: bool) -> None:
        """Collective when enabled: rank 0 drops every file's lines of steps after ``start_step``."""
        if not self.enabled:
            return
        if is_main:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            for path in self._path.parent.glob("rank*.jsonl"):
                kept = [line for line in path.read_text().splitlines() if _step(line) <= start_step]
                path.write_text("".join(line + "\n" for line in kept))
        if dist.is_initialized():
            dist.barrier()  # no rank appends before the files are trimmed

    def write(self, step: int, micro_step: int, ids: list[str], slots: list[int]) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self._path.open("a")
        record = {"step": step, "micro_step": micro_step, "rank": self.rank, "ids": list(ids), "slots": slots}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):  # a line cut off by a kill
        return 1 << 62
