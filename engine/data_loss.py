"""Lost data made visible: bad samples and shards summed over ranks, logged, limited and reported.

Each rank's loader counts what it skipped (``datapipes.shards``: the counts travel with the batches, so they
cover exactly the batches trained on, cumulative over resumes). Every step all ranks sum them
(``DataLoss.step``, one tiny all-reduce) for the logs -- ``data/bad_samples``, ``data/bad_shards``
(cumulative) and ``data/bad_fraction`` -- and for the limit: above ``data.max_bad_fraction`` of the samples
read, every rank stops with `DataLossError` at the same step (exit `EXIT_DATA_LOSS`). At the end (or that
stop) rank 0 gathers every rank's skip records into ``run.dir/data_report.json`` and prints a summary.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

REPORT_NAME = "data_report.json"
REPORT_FORMAT = "gnn3d-data-report/1"
EXIT_DATA_LOSS = 65  # sysexits.h EX_DATAERR: the input data was bad (also bad_sample=raise, no good sample)
SUMMARY_LINES = 20  # skip groups printed at the end; the report file lists all of them


class DataLossError(RuntimeError):
    """Too much of the training data was unreadable (the message names the counts, the limit and the report)."""


def limit_exceeded(bad: float, seen: float, limit: float) -> bool:
    """bad / seen > limit, judged once seen >= 1 / limit samples: from there on a single bad sample never
    trips the limit by itself, so an early skip in a long run is not mistaken for a dead data set."""
    if limit >= 1.0 or seen <= 0:
        return False
    floor = math.ceil(1.0 / limit) if limit > 0 else 1
    return seen >= floor and bad > limit * seen


class DataLoss:
    """Per-step global counts, the limit, and the end-of-run report (collective: every rank calls them)."""

    def __init__(self, limit: float, run_dir: Path, *, is_main: bool) -> None:
        self.limit, self.run_dir, self.is_main = limit, Path(run_dir), is_main
        self.totals = {"samples": 0, "bad_samples": 0, "bad_shards": 0, "fillers": 0}  # summed over ranks

    def step(
        self, loader: Any, device: torch.device, step: int, log: Callable[[int, dict[str, float]], None]
    ) -> dict[str, float]:
        """Sum the loaders' cumulative counts over ranks; the metrics to log. Past the limit: ``log`` the
        counts at ``step``, write the report and raise DataLossError (on every rank alike: the sums are the same)."""
        keys = tuple(self.totals)
        local = torch.tensor(
            [float(getattr(loader, key)) for key in keys], dtype=torch.float64, device=device
        )
        dist.all_reduce(local)
        self.totals = {key: round(value) for key, value in zip(keys, local.tolist())}
        bad, seen = self.totals["bad_samples"], self.totals["samples"] + self.totals["bad_samples"]
        metrics = {
            "data/bad_samples": float(bad),
            "data/bad_shards": float(self.totals["bad_shards"]),
            "data/bad_fraction": bad / seen if seen else 0.0,
        }
        if limit_exceeded(bad, seen, self.limit):
            log(step, metrics)
            path = self.report(loader, stopped=True)
            raise DataLossError(
                f"{bad} of {seen} samples read were bad ({bad / seen:.1%}; {self.totals['bad_shards']} shard "
                f"read failures), above data.max_bad_fraction={self.limit:g}; every skip is listed in {path}"
            )
        return metrics

    def report(
        self, loader: Any, *, stopped: bool = False, write: Callable[[str], None] | None = None
    ) -> Path:
        """Gather every rank's skip records; rank 0 writes run_dir/data_report.json and, with ``write``,
        prints the summary. Returns the report's path."""
        gathered: list[list[dict] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, loader.skipped)
        path = self.run_dir / REPORT_NAME
        if not self.is_main:
            return path
        skipped = [
            {"rank": rank, **record} for rank, records in enumerate(gathered) for record in records or []
        ]
        seen = self.totals["samples"] + self.totals["bad_samples"]
        report = {
            "format": REPORT_FORMAT,
            "samples_read": seen,
            "good_samples": self.totals["samples"],
            "bad_samples": self.totals["bad_samples"],
            "bad_shards": self.totals["bad_shards"],
            "fillers": self.totals["fillers"],  # samples repeated in batches whose slots were all bad
            "bad_fraction": self.totals["bad_samples"] / seen if seen else 0.0,
            "max_bad_fraction": self.limit,
            "stopped": stopped,
            "skipped": skipped,
        }
        _write_json(path, report)
        if write is not None:
            for line in summary_lines(report, path):
                write(line)
        return path


def summary_lines(report: dict[str, Any], path: Path) -> list[str]:
    """The end-of-run summary: the counts, then each distinct skip (shard, object, reason) with how often."""
    head = (
        f"data: {report['bad_samples']:.0f} of {report['samples_read']:.0f} samples read were skipped "
        f"({report['bad_fraction']:.2%}; {report['bad_shards']:.0f} shard read failures; "
        f"{report.get('fillers', 0):.0f} fillers) -> {path}"
    )
    groups = Counter(
        (r["kind"], r["shard"], r["object"], r["key"], r["reason"], r["lost"]) for r in report["skipped"]
    )
    lines = [head]
    for (kind, shard, obj, key, reason, lost), times in list(groups.items())[:SUMMARY_LINES]:
        lost_here = f"shard {shard} from {obj!r} on ({lost} samples)"  # "lost": more of a failure's samples
        what = f"{obj!r} in {shard}" if kind == "sample" else lost_here
        lines.append(f"  skipped {what}: key {key!r}: {reason}" + (f" [x{times}]" if times > 1 else ""))
    if len(groups) > SUMMARY_LINES:
        lines.append(f"  ... {len(groups) - SUMMARY_LINES} more in {path}")
    return lines


def _write_json(path: Path, record: dict[str, Any]) -> None:
    """Write-then-rename, so a reader never sees half a report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)
