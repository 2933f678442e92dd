"""Render the embedded synthetic dataset: random primitive unions seen from the reference 6-view rig.

Writes the reference render-script layout, ready for `launcher/convert.py`:
    python launcher/synth.py --out data/synth --objects 1000 --res 256
    python launcher/synth.py --out data/synth_webp --objects 100 --format webp --workers 4
Objects are a function of (--seed, object index) only, so reruns write identical bytes, and objects whose
folders are already complete are skipped (an interrupted run resumes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from datapipes.synth import FORMATS, NORMAL_SPACES
from datapipes.synth.dataset import render_dataset


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the docstring's line breaks and show every default."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output root folder (created if missing)")
    parser.add_argument("--objects", type=int, default=100, help="number of objects to render")
    parser.add_argument("--res", type=int, default=256, help="image resolution (square), pixels")
    parser.add_argument(
        "--seed", type=int, default=0, help="dataset seed; object i is a function of (seed, i)"
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes (<= 1: render in-process)")
    parser.add_argument("--format", choices=FORMATS, default="png", help="image format (both lossless)")
    parser.add_argument(
        "--supersample", type=int, default=1, help="s*s rays per pixel; > 1 antialiases edges"
    )
    parser.add_argument(
        "--normal-space",
        choices=NORMAL_SPACES,
        default="camera",
        help="frame of the stored normal maps: each view's own camera frame (as the reference "
        "render script writes them) or world space",
    )
    parser.add_argument("--overwrite", action="store_true", help="re-render objects whose folders exist")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.objects < 0 or args.seed < 0 or args.res < 2 or args.supersample < 1:
        raise SystemExit("synth.py: --objects and --seed must be >= 0, --res >= 2, --supersample >= 1")
    summary = render_dataset(
        args.out,
        objects=args.objects,
        res=args.res,
        seed=args.seed,
        workers=args.workers,
        fmt=args.format,
        supersample=args.supersample,
        overwrite=args.overwrite,
        normal_space=args.normal_space,
    )
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
