"""Export a run to a diffusers-layout model folder that launcher/generate.py and the pipeline load.

python launcher/export.py runs/demo --out exported/demo [--tag step00000150] [--no-ema]
"""

import argparse
import sys

from engine.config import ConfigError
from engine.ema import EMAFileError
from modeling.components import ModelFolderError
from modeling.unet_loading import WeightsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", help="training run directory (holds checkpoints/)")
    parser.add_argument(
        "--out", required=True, help="output folder (unet/ vae/ image_encoder/ scheduler/ ...)"
    )
    parser.add_argument(
        "--tag", default=None, help="checkpoint tag (default: the newest, from checkpoints/latest)"
    )
    parser.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    args = parser.parse_args(argv)
    from engine.export import export_run

    try:
        out = export_run(args.run_dir, args.out, tag=args.tag, use_ema=not args.no_ema)
    except (ConfigError, ModelFolderError, WeightsError, EMAFileError) as err:  # the message names the file
        print(f"export error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.run_dir} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
