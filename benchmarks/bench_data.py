"""Data-loading throughput: shard streamer vs folder dataset vs the pure-decode ceiling (samples/s).

All three produce the same examples from the same synthetic objects with the same number of DataLoader
workers, at two stages: ``example`` = decode + `make_example` + `collate` (the full training batch), and
``decode`` = decode to the MultiViewSample only (isolates reading/decoding from the transform's cost):
- ``streamer``: `build_train_loader` over the converted shards (tar reading, shuffle block, decode);
- ``folder``:   `build_folder_loader` over the render folders (one file open per image + RT files);
- ``ceiling``:  a map-style dataset over the encoded objects already in memory: decode + transform only.

    python benchmarks/bench_data.py                       # 64 objects at 256², 2 workers
    python benchmarks/bench_data.py --objects 128 --epochs 3 --out benchmarks/results/data.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datapipes.convert import ConvertOptions, convert
from datapipes.folder import FolderDataset, build_folder_loader
from datapipes.render_folder import RawObject, decode_raw_object
from datapipes.sample import MultiViewSample
from datapipes.shard_io import iter_raw_objects, raw_from_entry, resolve_shards
from datapipes.shards import ResumableLoader, ShardStream
from datapipes.stream_state import example_rng
from datapipes.synth.dataset import render_dataset
from datapipes.transform import TransformOptions, collate, make_example


def _finish(sample: MultiViewSample, opts: TransformOptions | None, epoch: int) -> dict:
    """The full example, or (decode stage, opts None) a minimal collatable record of the decoded sample."""
    if opts is None:
        return {"object_id": sample.object_id, "cond": torch.from_numpy(sample.cond_rgba)}
    return make_example(sample, opts, example_rng(0, epoch, sample.object_id))


class InMemoryObjects(Dataset):
    """Encoded objects held in memory: what is left when all I/O and tar parsing is free."""

    def __init__(self, raws: list[RawObject], opts: TransformOptions | None) -> None:
        self.raws, self.opts = raws, opts

    def __len__(self) -> int:
        return len(self.raws)

    def __getitem__(self, index: int) -> dict:
        return _finish(decode_raw_object(self.raws[index]), self.opts, 0)


class DecodeOnlyFolder(FolderDataset):
    """Folder dataset stopping after decoding (decode stage)."""

    def __getitem__(self, index: int) -> dict:
        return _finish(self.sample(index), None, self.epoch)


class DecodeOnlyStream(ShardStream):
    """Shard stream stopping after decoding (decode stage)."""

    def example(self, entry, epoch: int) -> dict:
        return _finish(decode_raw_object(raw_from_entry(entry)), None, epoch)


def _timed(batches, epochs_total_samples: int) -> dict:
    start, count = time.perf_counter(), 0
    for batch in batches:
        count += len(batch["object_id"])
    seconds = time.perf_counter() - start
    assert count == epochs_total_samples, f"expected {epochs_total_samples} samples, got {count}"
    return {"samples": count, "seconds": round(seconds, 3), "samples_per_s": round(count / seconds, 2)}


def _folder_batches(src: Path, args, opts: TransformOptions, stage: str):
    loader = build_folder_loader(
        src, batch_size=args.batch_size, rank=0, world_size=1, seed=0, transform=opts, workers=args.workers
    )
    if stage == "decode":
        dataset = DecodeOnlyFolder(src, opts)
        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
        loader = DataLoader(
            dataset, args.batch_size, sampler=sampler, num_workers=args.workers, collate_fn=collate
        )
    for epoch in range(args.epochs):
        loader.sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
        yield from loader


def _ceiling_batches(shards: Path, args, opts: TransformOptions, stage: str):
    raws = [raw for info in resolve_shards(str(shards)) for raw in iter_raw_objects(info.url)]
    dataset = InMemoryObjects(raws, None if stage == "decode" else opts)
    for _ in range(args.epochs):
        yield from DataLoader(
            dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, collate_fn=collate
        )


def run(args: argparse.Namespace) -> dict:
    """Render, convert, then time the three loaders; returns the result record."""
    torch.set_num_threads(1)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_data_"))
    src, shards = work / "src", work / "shards"
    render_dataset(src, args.objects, res=args.res, seed=0, workers=args.workers)
    convert(src, shards, ConvertOptions(samples_per_shard=args.samples_per_shard, val_fraction=0.0))
    opts = TransformOptions(resolution=args.res)
    record = {
        "benchmark": "bench_data",
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "work_dir")},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "load_average_before": os.getloadavg()[0],
    }
    for stage in args.stages:
        record[stage] = _run_stage(src, shards, args, opts, stage)
    record["load_average_after"] = os.getloadavg()[0]
    return record


def _stream_batches(shards: Path, args: argparse.Namespace, opts: TransformOptions, stage: str):
    stream_cls = DecodeOnlyStream if stage == "decode" else ShardStream
    stream = stream_cls(
        resolve_shards(str(shards)), batch_size=args.batch_size, rank=0, world_size=1, seed=0, transform=opts,
        num_workers=args.workers, shuffle_buffer=args.shuffle_buffer, max_epochs=args.epochs,
    )  # fmt: skip
    return ResumableLoader(stream, args.workers)


def _run_stage(src: Path, shards: Path, args: argparse.Namespace, opts: TransformOptions, stage: str) -> dict:
    """Time the three loaders in rotation `repeats` times; the best run of each is the least disturbed
    by other processes on a shared machine, so ratios use the best, and every run is kept."""
    total = args.objects * args.epochs
    makers = {
        "ceiling": lambda: _ceiling_batches(shards, args, opts, stage),
        "folder": lambda: _folder_batches(src, args, opts, stage),
        "streamer": lambda: _stream_batches(shards, args, opts, stage),
    }
    runs: dict[str, list[dict]] = {name: [] for name in makers}
    for _ in range(args.repeats):
        for name, make in makers.items():
            runs[name].append(_timed(make(), total))
    best = {name: max(r["samples_per_s"] for r in rs) for name, rs in runs.items()}
    return {
        "best_samples_per_s": best,
        "runs": runs,
        "streamer_vs_folder": round(best["streamer"] / best["folder"], 3),
        "streamer_vs_ceiling": round(best["streamer"] / best["ceiling"], 3),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--objects", type=int, default=64, help="synthetic objects (default: 64)")
    parser.add_argument(
        "--res", type=int, default=256, help="image resolution, also the transform's (default: 256)"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="DataLoader workers for every loader (default: 2)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="objects per batch (default: 4)")
    parser.add_argument(
        "--epochs", type=int, default=2, help="passes over the objects per loader (default: 2)"
    )
    parser.add_argument("--samples-per-shard", type=int, default=8, help="objects per shard (default: 8)")
    parser.add_argument("--shuffle-buffer", type=int, default=16, help="streamer shuffle block (default: 16)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per loader, in rotation (default: 3)"
    )
    parser.add_argument("--stages", nargs="+", default=["decode", "example"], choices=("decode", "example"),
                        help="what each loader produces: decoded samples and/or full training examples (default: both)")  # fmt: skip
    parser.add_argument("--work-dir", help="where to render and convert (default: a new temp folder)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/data.json"),
                        help="JSON result file (default: benchmarks/results/data.json)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    record = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
