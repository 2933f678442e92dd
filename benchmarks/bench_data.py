"""Data-loading throughput: shard streamer vs folder dataset vs the pure-decode ceiling (samples/s).

All three produce the same examples from the same synthetic objects with the same number of DataLoader
workers, at two stages: ``example`` = decode + `make_example` + `collate` (the full training batch), and
``decode`` = decode to the MultiViewSample only (isolates reading/decoding from the transform's cost):
- ``streamer``: `build_train_loader` over the converted shards (tar reading, shuffle block, decode);
- ``folder``:   `build_folder_loader` over the render folders (one file open per image + RT files);
- ``ceiling``:  a map-style dataset over the encoded objects already in memory: decode + transform only.

The ratio is streamer / folder (goal ≥ 1.5×) on full examples; streamer / ceiling (goal ≥ 0.8×) and the
per-object cost of decode and of the transform alone (one thread, in this process) are in ``raw``.

    python benchmarks/bench_data.py            # 64 objects at 256², 2 workers, 2 epochs, 3 repeats
    python benchmarks/bench_data.py --quick    # 32 objects, 1 epoch, 2 repeats
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from common import main_args, write_result
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

GOAL_FOLDER, GOAL_CEILING = 1.5, 0.8


@dataclass(frozen=True)
class Sizes:
    """What one run measures; ``run`` picks the full or quick sizes, the smoke test smaller ones."""

    objects: int = 64
    res: int = 256
    workers: int = 2
    batch_size: int = 4
    epochs: int = 2
    samples_per_shard: int = 8
    shuffle_buffer: int = 16
    repeats: int = 3
    stages: tuple[str, ...] = ("decode", "example")


QUICK = Sizes(objects=32, epochs=1, repeats=2)


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


def run(quick: bool, sizes: Sizes | None = None) -> dict:
    """Render, convert, then time the three loaders side by side; returns the result payload."""
    args = sizes or (QUICK if quick else Sizes())
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        src, shards = Path(tmp) / "src", Path(tmp) / "shards"
        render_dataset(src, args.objects, res=args.res, seed=0, workers=max(args.workers, 1))
        convert(src, shards, ConvertOptions(samples_per_shard=args.samples_per_shard, val_fraction=0.0))
        opts = TransformOptions(resolution=args.res)
        raw = {"load_average_before": os.getloadavg()[0], "per_object_ms": _per_object_ms(shards, opts)}
        for stage in args.stages:
            raw[stage] = _run_stage(src, shards, args, opts, stage)
    raw["load_average_after"] = os.getloadavg()[0]
    main_stage = raw["example" if "example" in args.stages else args.stages[-1]]
    vs_folder, vs_ceiling = main_stage["streamer_vs_folder"], main_stage["streamer_vs_ceiling"]
    best = main_stage["best_samples_per_s"]
    return {
        "config": asdict(args),
        "raw": raw,
        "ratio": vs_folder,
        "goal": f">= {GOAL_FOLDER}x folder; >= {GOAL_CEILING}x ceiling",
        "met": vs_folder >= GOAL_FOLDER and vs_ceiling >= GOAL_CEILING,
        "baseline": "folder dataset (and the in-memory decode+transform ceiling), same workers",
        "summary": (
            f"shard streamer {best['streamer']:.1f} samples/s vs folder {best['folder']:.1f} and in-memory "
            f"ceiling {best['ceiling']:.1f} ({vs_ceiling:.2f}x ceiling); transform "
            f"{raw['per_object_ms']['transform']:.1f} ms/object, decode {raw['per_object_ms']['decode']:.1f}."
        ),
    }


def _per_object_ms(shards: Path, opts: TransformOptions, limit: int = 8) -> dict:
    """Decode and transform cost per object on one thread in this process (best of 3 passes)."""
    raws = [raw for info in resolve_shards(str(shards)) for raw in iter_raw_objects(info.url)][:limit]
    decode, transform = [], []
    for _ in range(3):
        start = time.perf_counter()
        samples = [decode_raw_object(raw) for raw in raws]
        middle = time.perf_counter()
        for sample in samples:
            make_example(sample, opts, example_rng(0, 0, sample.object_id))
        decode.append((middle - start) / len(raws))
        transform.append((time.perf_counter() - middle) / len(raws))
    return {"decode": round(1000 * min(decode), 2), "transform": round(1000 * min(transform), 2)}


def _stream_batches(shards: Path, args: Sizes, opts: TransformOptions, stage: str):
    stream_cls = DecodeOnlyStream if stage == "decode" else ShardStream
    stream = stream_cls(
        resolve_shards(str(shards)), batch_size=args.batch_size, rank=0, world_size=1, seed=0, transform=opts,
        num_workers=args.workers, shuffle_buffer=args.shuffle_buffer, max_epochs=args.epochs,
    )  # fmt: skip
    return ResumableLoader(stream, args.workers)


def _run_stage(src: Path, shards: Path, args: Sizes, opts: TransformOptions, stage: str) -> dict:
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


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--objects", type=int, help="synthetic objects (default: 64, quick 32)")
    parser.add_argument("--workers", type=int, help="DataLoader workers for every loader (default: 2)")
    parser.add_argument("--repeats", type=int, help="timed runs per loader, in rotation (default: 3)")


def main(argv: list[str] | None = None) -> dict:
    args = main_args(__doc__, argv, _add_args)
    sizes = QUICK if args.quick else Sizes()
    chosen = {k: v for k, v in vars(args).items() if k != "quick" and v is not None}
    payload = run(args.quick, replace(sizes, **chosen))
    print(f"{write_result('data', payload)}: {payload['summary']}")
    return payload


if __name__ == "__main__":
    main()
