"""Inspect shards: counts, sizes, per-field statistics, and a PNG grid of samples.

    python launcher/inspect_shards.py data/shards --grid runs/grid.png --samples 4
    python launcher/inspect_shards.py "data/shards/train/shard-{000000..000003}.tar" --json stats.json
Grid rows: condition | the stored color views | their normal maps exactly as stored (on white).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from datapipes.inspection import first_samples, resolve_target, sample_grid, shard_statistics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "target", help="converter output folder, folder of .tar, brace pattern, list file or manifest"
    )
    parser.add_argument(
        "--split",
        default="train",
        choices=("train", "val"),
        help="split when target has a manifest (default: train)",
    )
    parser.add_argument(
        "--grid", type=Path, help="write a PNG grid of the first --samples samples here (default: none)"
    )
    parser.add_argument("--samples", type=int, default=4, help="rows in the grid (default: 4)")
    parser.add_argument("--cell", type=int, default=128, help="pixel size of one grid cell (default: 128)")
    parser.add_argument(
        "--decode-limit", type=int, default=64, help="samples decoded for pixel statistics (default: 64)"
    )
    parser.add_argument("--json", type=Path, help="also write the statistics as JSON here (default: none)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    shards = resolve_target(args.target, args.split)
    stats = shard_statistics(shards, decode_limit=args.decode_limit)
    brief = {k: stats[k] for k in ("shards", "samples", "bytes", "image_sizes", "decoded")}
    print(json.dumps(brief, indent=1))
    for error in stats["errors"]:
        print(f"BAD {error}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(stats, indent=1))
    if args.grid:
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        sample_grid(first_samples(shards, args.samples), cell=args.cell).save(args.grid)
        print(f"grid written to {args.grid}")
    return stats


if __name__ == "__main__":
    main()
