"""Encode the train split of converted shards into cached latents (VAE mean/logvar + CLIP embedding per
background), so `data.source=latents` trains without running the frozen encoders.

    python launcher/encode.py --demo --out data/latents-demo                  # the CPU demo's data and VAE
    python launcher/encode.py --shards data/shards --out data/latents \\
        --pretrained lambdalabs/sd-image-variations-diffusers --device cuda --dtype fp16 --workers 8
    python launcher/encode.py --shards data/shards --out data/latents --components runs/x/components

Rerunning the same command after an interruption resumes (finished shards are kept, the rest re-encoded to
the same bytes). Exit status 2 with one line when the shards, OUT or an option cannot be used.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from engine.config import ConfigError, load_config
from engine.encoding import (
    DEFAULT_BACKGROUNDS,
    DTYPES,
    EncodeError,
    EncodeOptions,
    EncoderSource,
    check_encoder_source,
    demo_shards,
    encode_shards,
    load_encoder,
    plan_encode,
    shard_bytes,
)

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo_cpu.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shards", help="converter output folder or its manifest.json (default with --demo: the demo shards)"
    )
    parser.add_argument("--out", type=Path, required=True, help="latents folder to write (or resume)")
    model = parser.add_mutually_exclusive_group()
    model.add_argument(
        "--pretrained", help="VAE + CLIP from a diffusers folder or hub id (sd-image-variations)"
    )
    model.add_argument("--components", help="a run's saved components folder (RUN/components)")
    model.add_argument(
        "--demo", action="store_true", help="the demo run's components (the default when no model is given)"
    )
    parser.add_argument(
        "--config",
        default=str(DEMO_CONFIG),
        help="with --demo: the run config whose demo data / fitted VAE to use (default: the CPU demo)",
    )
    parser.add_argument(
        "--backgrounds",
        default=",".join(DEFAULT_BACKGROUNDS),
        help="comma-separated backgrounds to encode: every one the training config can draw (default: %(default)s)",
    )
    parser.add_argument(
        "--resolution", type=int, help="image size, a multiple of 8 (default: 256; --demo: the config's)"
    )
    parser.add_argument("--clip-size", type=int, default=224, help="CLIP input size (default: %(default)s)")
    parser.add_argument(
        "--batch-size", type=int, default=64, help="images per VAE call, at most (default: %(default)s)"
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="data decoding processes (default: %(default)s)"
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: %(default)s)")
    parser.add_argument(
        "--dtype", default="fp32", choices=tuple(DTYPES), help="encoder precision (default: %(default)s)"
    )
    return parser.parse_args(argv)


def _source(args: argparse.Namespace) -> EncoderSource:
    if args.pretrained:
        return EncoderSource("pretrained", args.pretrained)
    if args.components:
        return EncoderSource("components", args.components)
    return EncoderSource("demo", args.config)


def _options(args: argparse.Namespace, source: EncoderSource) -> EncodeOptions:
    resolution = args.resolution
    if resolution is None:
        resolution = _demo_resolution(args.config) if source.kind == "demo" else 256
    backgrounds = tuple(name.strip() for name in args.backgrounds.split(",") if name.strip())
    return EncodeOptions(
        resolution=resolution,
        clip_size=args.clip_size,
        backgrounds=backgrounds,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        dtype=args.dtype,
    )


def _demo_resolution(config: str) -> int:
    try:
        return load_config(config).data.resolution
    except ConfigError as error:
        raise EncodeError(f"--config: {error}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = _source(args)
    try:
        check_encoder_source(source)
        opts = _options(args, source)
        if args.shards is None and source.kind != "demo":
            raise EncodeError("--shards is required unless encoding the demo (--demo)")
        shards = args.shards if args.shards is not None else demo_shards(args.config)
        plan = plan_encode(shards, args.out, opts)  # every check that needs no model, before loading one
        components, names = load_encoder(source, device=opts.device)
        done = {shard["name"] for shard in (plan.resuming or {}).get("shards", [])}
        total = sum(int(s["samples"]) for s in plan.shards if s["name"] not in done)
        start = time.perf_counter()
        with tqdm(total=total, desc="encode", unit="obj") as bar:
            manifest = encode_shards(plan, components, opts, names, progress=bar.update)
        seconds = time.perf_counter() - start
    except EncodeError as error:
        print(f"encode error: {error}", file=sys.stderr)
        return 2
    pixels, latents = shard_bytes(plan)
    objects = sum(shard["samples"] for shard in manifest["shards"])
    print(
        f"encoded {total} objects in {seconds:.1f} s ({total / max(seconds, 1e-9):.2f} obj/s); {args.out}: "
        f"{objects} objects in {len(manifest['shards'])} shards, {latents / 2**20:.1f} MiB "
        f"({latents / max(pixels, 1):.2f}x the pixel shards' {pixels / 2**20:.1f} MiB); "
        f"encoder {manifest['encoder']['hash'][:12]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
