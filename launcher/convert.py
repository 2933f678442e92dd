"""Convert per-object render folders into webdataset shards + manifest.json (resumable).

    python launcher/convert.py --src data/synth --out data/shards --samples-per-shard 64 --workers 2
    python launcher/convert.py --src /renders --out /shards --layout wonder3d --shard-size 1GB --workers 16
    python launcher/convert.py --out data/shards --verify          # re-read shards, check counts + sha256
Rerunning the same command after an interruption resumes from the manifest. Invalid objects are listed in
the report (and in manifest.json under "skipped"); the exit status is 0 even when some were skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from datapipes.convert import ConvertOptions, convert, parse_size, verify


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--src", type=Path, help="render root ({prefix}/{uid}/ object folders); omit with --verify only"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder for train/, val/ and manifest.json"
    )
    parser.add_argument("--layout", default="auto", choices=("auto", "wonder3d", "render-script"),
                        help="source layout; auto detects from RT files / masks (default: auto)")  # fmt: skip
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--shard-size", default="1GB", help="target shard size, e.g. 1GB, 500MB (default: 1GB)")
    size.add_argument("--samples-per-shard", type=int, help="objects per shard instead of a byte size")
    parser.add_argument(
        "--workers", type=int, default=0, help="reader processes; 0 = in-process (default: 0)"
    )
    parser.add_argument("--val-fraction", type=float, default=0.01,
                        help="share of objects in val, by object-id hash (default: 0.01)")  # fmt: skip
    parser.add_argument(
        "--reencode",
        default="none",
        choices=("none", "png", "webp"),
        help="keep the source image bytes (none) or re-encode them losslessly (default: none)",
    )
    parser.add_argument(
        "--verify", action="store_true", help="after converting (or alone), re-read and check every shard"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.src is not None:
        opts = ConvertOptions(
            layout=args.layout,
            samples_per_shard=args.samples_per_shard,
            shard_bytes=None if args.samples_per_shard else parse_size(args.shard_size),
            val_fraction=args.val_fraction,
            workers=args.workers,
            reencode=args.reencode,
        )
        manifest = convert(args.src, args.out, opts)
        print(json.dumps({"layout": manifest["layout"], "splits": manifest["splits"]}))
        for item in manifest["skipped"]:
            print(f"SKIPPED {item['object_id']}: {item['reason']}")
        print(f"{len(manifest['skipped'])} objects skipped (listed in {args.out / 'manifest.json'})")
    elif not args.verify:
        sys.exit("give --src to convert, or --verify to check an existing output")
    if args.verify:
        problems = verify(args.out)
        for problem in problems:
            print(f"VERIFY FAILED {problem}")
        print("verify: ok" if not problems else f"verify: {len(problems)} problems")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
