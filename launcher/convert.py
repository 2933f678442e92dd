"""Convert per-object render folders into webdataset shards + manifest.json (resumable).

    python launcher/convert.py --src data/synth --out data/shards --samples-per-shard 64 --workers 2
    python launcher/convert.py --src /renders --out /shards --layout wonder3d --shard-size 1GB --workers 16
    python launcher/convert.py --out data/shards --verify          # re-read shards, check counts + sha256
The reference's objects exactly (its object list minus its invalid list):
    python launcher/convert.py --src /renders --out /shards \\
        --object-list object_list.json --exclude-list invalid_list.json
Rerunning the same command after an interruption resumes from the manifest. Invalid objects are listed in
the report (and in manifest.json under "skipped"); the exit status is 0 even when some were skipped, and 2
(one line) when nothing was converted or the source, a list or the options are unusable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from datapipes.convert import ConvertError, ConvertOptions, convert, parse_size, verify
from datapipes.manifest import ManifestError
from datapipes.render_folder import LayoutError
from datapipes.sample import VIEW_NAMES
from datapipes.selection import SelectionError

USER_ERRORS = (ConvertError, ManifestError, LayoutError, SelectionError)


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
    parser.add_argument(
        "--layout",
        default="auto",
        choices=("auto", "wonder3d", "render-script"),
        help="source layout; auto decides by the RT files / masks of up to 64 object folders spread over "
        "the tree and refuses when they disagree (default: auto)",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--shard-size", default="1GB", help="target shard size, e.g. 1GB, 500MB (default: 1GB)")
    size.add_argument("--samples-per-shard", type=int, help="objects per shard instead of a byte size")
    parser.add_argument(
        "--workers", type=int, default=0, help="reader processes; 0 = in-process (default: 0)"
    )
    parser.add_argument("--val-fraction", type=float, default=0.01,
                        help="share of objects in val, by object-id hash (default: 0.01)")  # fmt: skip
    parser.add_argument(
        "--object-list",
        help="JSON list of object ids to convert (Wonder3D's object_list.json; '.../uid.glb' entries "
        "count as 'uid'); ids the source lacks are an error, so the shards hold exactly the listed objects",
    )
    parser.add_argument(
        "--exclude-list",
        help="JSON list of object ids to leave out (Wonder3D's invalid_list.json); ids the source lacks "
        "are only counted in the report",
    )
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="with --object-list: convert the listed ids the source holds and report the missing ones",
    )
    parser.add_argument(
        "--views",
        default=",".join(VIEW_NAMES),
        help="comma-separated views every object has and every sample stores; must include front "
        f"(default: {','.join(VIEW_NAMES)}); the manifest records them for data.views",
    )
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
    if args.src is None and not args.verify:
        sys.exit("give --src to convert, or --verify to check an existing output")
    try:
        if args.src is not None:
            manifest = convert(args.src, args.out, _options(args))
            _report(manifest, args.out)
            if not sum(split["samples"] for split in manifest["splits"].values()):
                return _fail(_nothing_converted(manifest, args.src))
        if args.verify:
            problems = verify(args.out)
            for problem in problems:
                print(f"VERIFY FAILED {problem}")
            print("verify: ok" if not problems else f"verify: {len(problems)} problems")
            return 1 if problems else 0
    except USER_ERRORS as error:
        return _fail(str(error))
    return 0


def _options(args: argparse.Namespace) -> ConvertOptions:
    try:
        shard_bytes = None if args.samples_per_shard else parse_size(args.shard_size)
    except ValueError as error:
        raise ConvertError(f"--shard-size: {error}") from None
    return ConvertOptions(
        layout=args.layout,
        samples_per_shard=args.samples_per_shard,
        shard_bytes=shard_bytes,
        val_fraction=args.val_fraction,
        workers=args.workers,
        reencode=args.reencode,
        object_list=args.object_list,
        exclude_list=args.exclude_list,
        allow_missing=args.allow_missing,
        views=tuple(view.strip() for view in args.views.split(",") if view.strip()),
    )


def _report(manifest: dict, out: Path) -> None:
    brief = {key: manifest[key] for key in ("layout", "splits", "selection")}
    print(json.dumps(brief))
    for item in manifest["skipped"]:
        print(f"SKIPPED {item['object_id']}: {item['reason']}")
    print(f"{len(manifest['skipped'])} objects skipped (listed in {out / 'manifest.json'})")


def _nothing_converted(manifest: dict, src: Path) -> str:
    skipped = manifest["skipped"]
    why = f"; first reason: {skipped[0]['reason']}" if skipped else ""
    return (
        f"0 objects converted from {src} ({manifest['selection'].get('selected', 0)} selected, "
        f"{len(skipped)} skipped as invalid, layout {manifest['layout']}{why}); check --src and --layout"
    )


def _fail(message: str) -> int:
    print(f"convert: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
