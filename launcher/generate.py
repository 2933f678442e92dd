"""Generate normal maps and color images of the reference views from one image with an exported model.

    python launcher/generate.py --model runs/export --image cat.png --out out/cat
    python launcher/generate.py --model runs/export --image cat.png --out out/cat2 --steps 30 --scheduler dpm

The model folder is the diffusers layout (unet/ vae/ image_encoder/ scheduler/ feature_extractor/), local or
a hub id in the Hugging Face cache. Its UNet loads strictly (Wonder3D's legacy weight names are mapped): a
missing or unexpected weight stops with one line naming the folder and the keys (exit 2).
The input (RGBA; no alpha = fully opaque) is cropped to its alpha box, scaled and centred on white.
Writes normal_{view}.png and color_{view}.png for every view, input.png (the condition image as the model
saw it) and grid.png (normals on top, colors below, the input first), and prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datapipes.cameras import camera_embedding, reference_rig
from datapipes.sample import COND_VIEW, VIEW_NAMES
from engine.safe_load import UntrustedCheckpointError, check_model_folder
from modeling.components import ModelFolderError
from modeling.pipeline import SCHEDULERS, MVDiffusionPipeline, view_grid
from modeling.preprocess import load_rgba, preprocess_image

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown and the module docstring kept as written (its example commands stay readable)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument(
        "--model", required=True, help="exported model folder (diffusers layout) or a hub id (org/name)"
    )
    parser.add_argument("--image", required=True, type=Path, help="input image (RGBA PNG/WebP; RGB = opaque)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale; 1 = off")
    parser.add_argument(
        "--seed", type=int, default=42, help="noise seed; the same seed gives the same images"
    )
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim", help="sampler")
    parser.add_argument(
        "--views",
        default=",".join(VIEW_NAMES),
        help=f"comma-separated target views of the reference rig (their count must match the UNet's "
        f"num_views); the condition view is '{COND_VIEW}'",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="image side in pixels (default: the UNet's sample size x 8)",
    )
    parser.add_argument(
        "--object-size",
        type=int,
        default=None,
        help="object's longer side in pixels (default: 3/4 of resolution)",
    )
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help="torch device")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model weights dtype")
    return parser.parse_args(argv)


def parse_views(text: str) -> tuple[str, ...]:
    """'front,right' -> ('front', 'right'); unknown names are an error naming them."""
    views = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in views if name not in VIEW_NAMES]
    if unknown or not views:
        raise SystemExit(
            f"--views: unknown or empty view names {unknown}; choose from {', '.join(VIEW_NAMES)}"
        )
    return views


def reference_camera_embeddings(views: tuple[str, ...]) -> torch.Tensor:
    """[2, V, 10] camera + domain embeddings (normal, then color) of the reference rig, front = condition."""
    rig = reference_rig()
    targets = np.stack([rig[view] for view in views])
    per_domain = [camera_embedding(rig[COND_VIEW], targets, domain) for domain in ("normal", "color")]
    return torch.from_numpy(np.stack(per_domain)).float()


def save_png(image: torch.Tensor, path: Path) -> None:
    """Save [3, H, W] in [0, 1] as an 8-bit RGB PNG."""
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    Image.fromarray(array, "RGB").save(path)


def model_resolution(pipe: MVDiffusionPipeline) -> int:
    """The UNet's image side: latent sample_size times the VAE's downsampling factor."""
    vae_factor = 2 ** (len(pipe.components.vae.config.block_out_channels) - 1)
    return int(pipe.unet.config.sample_size) * vae_factor


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    views = parse_views(args.views)
    start = time.perf_counter()
    try:
        if Path(args.model).is_dir():  # a hub id resolves to the HF cache, loaded with weights_only=True
            check_model_folder(args.model)
        pipe = MVDiffusionPipeline.from_pretrained(args.model, scheduler=args.scheduler)
    except (ModelFolderError, UntrustedCheckpointError) as error:
        # A bad or tampered folder is the user's to fix: one line, no traceback.
        print(f"--model: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    pipe.to(args.device, DTYPES[args.dtype])
    resolution = args.resolution or model_resolution(pipe)
    object_size = args.object_size or round(resolution * 0.75)
    condition = preprocess_image(load_rgba(args.image), object_size, resolution, name=str(args.image))
    out = pipe(
        condition.unsqueeze(0),
        reference_camera_embeddings(views),
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for index, view in enumerate(views):
        for domain, images in (("normal", out.normals), ("color", out.colors)):
            path = args.out / f"{domain}_{view}.png"
            save_png(images[0, index], path)
            written.append(path.name)
    save_png(condition, args.out / "input.png")
    save_png(view_grid(out.normals[0], out.colors[0], condition), args.out / "grid.png")
    summary = {"out": str(args.out), "files": [*written, "input.png", "grid.png"], "views": list(views),
               "resolution": resolution, "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
