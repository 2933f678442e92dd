"""Cached latents: objects/s of the training step from latents vs from pixels, same config, one run.

    python benchmarks/bench_latents.py [--quick]

For each config (the CPU demo; the issue's "small": widths 128/256, 32² latents, 6 views x 2 domains, bf16,
here with Stable Diffusion's VAE architecture in place of its tiny VAE so the encoder costs what it costs in
real training; both keep their tiny CLIP) one DeepSpeed ZeRO-2 engine (world 1) trains on a fixed batch of synthetic objects: the pixel batch (the frozen
VAE and CLIP encode it every step) and the same objects as the latents stream hands them out (posteriors
encoded once by ``engine.encoding.encode_objects``), alternating so both see the same machine load. Timed:
``engine.train.run_step`` (prepare → forward → loss → backward → optimizer step → EMA), data loading excluded
(the data benchmarks time that). Rates are objects per CPU-second of this process (process_time: the
2-core machine is shared, so wall time mostly measures the other jobs; wall obj/s is in raw too). Each config has its own ratio (latents ÷ pixels, medians) and goal; the
payload's ratio is the demo's (goal >= 2x), the small config's is in raw (goal >= 1.3x); "met" needs both.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import main_args, side_by_side, summarize, write_result  # noqa: E402

CONFIGS = {"demo": ("configs/demo_cpu.yaml", 2.0), "small": ("configs/small_cpu.yaml", 1.3)}


def _batches(cfg, components, objects: int) -> tuple[dict, dict]:
    """(pixel batch, latents batch) of the same synthetic objects, white background; components in the
    training precision."""
    from datapipes.latent_stream import POSTERIOR_KEYS
    from datapipes.synth import render_object
    from datapipes.transform import TransformOptions, collate, make_example
    from engine.encoding import EncodeOptions, encode_objects

    opts = TransformOptions(resolution=cfg.data.resolution, background="white", clip_size=cfg.data.clip_size)
    examples = [make_example(render_object(i, res=cfg.data.resolution), opts, None) for i in range(objects)]
    items = [
        {
            "cond": ex["image_cond_vae"][None],
            "color": ex["image_target_vae"][None],
            "normal": ex["normal_target_vae"][None],
            "clip": ex["image_cond_CLIP"][None],
        }
        for ex in examples
    ]
    encoded = encode_objects(items, components, EncodeOptions(batch_size=64, dtype=cfg.train.precision))
    latents = []
    for ex, tensors in zip(examples, encoded, strict=True):
        latent = {key: tensors[key][0] for key in (*POSTERIOR_KEYS, "clip_embed")}
        latent.update({k: ex[k] for k in ("object_id", "camera_embed_image", "camera_embed_normal")})
        latents.append(latent)
    return collate(examples), collate(latents)


def sd_vae(resolution: int):
    """Stable Diffusion 1.x's VAE architecture (sd-image-variations, Wonder3D) built from config, random
    weights, frozen: ~270 GFLOP per 256² image in the encoder, the cost the pixel path pays per view."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=resolution,
            scaling_factor=0.18215,
        )
    return vae.eval().requires_grad_(False)


def _step_rate(run, batch: dict, steps: int, cpu_rates: list[float] | None = None) -> float:
    """Objects per second (wall) of ``steps`` training steps on ``batch``; objects per CPU-second of this
    process appended to ``cpu_rates`` (robust to other processes on a shared machine)."""
    from engine.train import run_step

    start, cpu = time.perf_counter(), time.process_time()
    for step in range(steps):
        run_step(run, iter([batch]), step + 1)
    objects = steps * len(batch["object_id"])
    if cpu_rates is not None:
        cpu_rates.append(objects / (time.process_time() - cpu))
    return objects / (time.perf_counter() - start)


def _prepare_seconds(objective, pixels: dict, latents: dict) -> dict:
    """Seconds of ``DiffusionObjective.prepare`` alone (the part latents remove: VAE/CLIP encode) per side."""
    from engine.randomness import object_generators

    out = {}
    for name, batch in (("pixels", pixels), ("latents", latents)):
        start = time.perf_counter()
        objective.prepare(batch, object_generators(0, 0, range(len(batch["object_id"]))))
        out[name] = round(time.perf_counter() - start, 4)
    return out


def measure(name: str, quick: bool) -> dict:
    """Pixels vs latents obj/s of one config, side by side on one engine."""
    from engine.build import build_components, in_training_precision
    from engine.config import load_config, load_ds_config, resolve_ds_config
    from engine.distributed import init_distributed
    from engine.ema import EMA
    from engine.objective import DiffusionObjective
    from engine.train import Run, build_engine

    config, goal = CONFIGS[name]
    cfg = load_config(ROOT / config, ["run.dir=unused", "validation.every=0"])
    info = init_distributed()
    ds = resolve_ds_config(
        load_ds_config(ROOT / "ds_configs" / "zero2.json"), cfg, world_size=1, source="zero2.json", cuda=False
    )
    components = build_components(cfg)
    if (
        name == "small"
    ):  # the real VAE's cost, not the tiny one's: SD's AutoencoderKL architecture, random init
        components.vae = sd_vae(cfg.data.resolution)
    components = in_training_precision(components, cfg)  # as engine.train.setup does
    pixels, latents = _batches(cfg, components, cfg.train.micro_batch_size)
    engine, _ = build_engine(cfg, ds, info)
    ema = EMA(engine, cfg.train.ema_decay, cfg.train.ema_every)
    objective = DiffusionObjective(components, cfg, info.device)
    run = Run(cfg, info, Path("unused"), engine, ema, objective, components, loader=None, train_shards="")
    # The small step takes 10-40 s on 2 busy CPU cores: --quick times one step per side.
    plan = {
        ("small", True): (1, 1),
        ("small", False): (3, 2),
        ("demo", True): (4, 2),
        ("demo", False): (20, 3),
    }
    steps, repeats = plan[(name, quick)]
    _step_rate(run, latents, 1)  # warm-up: the optimizer state is made at the first step
    cpu = {"pixels": [], "latents": []}
    rates = side_by_side(
        {
            "latents": lambda: _step_rate(run, latents, steps, cpu["latents"]),
            "pixels": lambda: _step_rate(run, pixels, steps, cpu["pixels"]),
        },
        repeats=repeats,
    )
    # The ratio of CPU-time rates: on a 2-core machine shared with other jobs wall time mostly measures them.
    ratio = summarize(cpu["latents"])["median"] / summarize(cpu["pixels"])["median"]
    wall_ratio = summarize(rates["latents"])["median"] / summarize(rates["pixels"])["median"]
    return {
        "config": config,
        "objects_per_step": cfg.train.micro_batch_size,
        "views": len(cfg.data.views),
        "resolution": cfg.data.resolution,
        "precision": cfg.train.precision,
        "steps_per_measurement": steps,
        # one more SD-VAE encode of 13 images is too much for --quick
        "prepare_s": None if quick and name == "small" else _prepare_seconds(objective, pixels, latents),
        "pixels_obj_s": summarize(rates["pixels"]),
        "latents_obj_s": summarize(rates["latents"]),
        "pixels_obj_per_cpu_s": summarize(cpu["pixels"]),
        "latents_obj_per_cpu_s": summarize(cpu["latents"]),
        "wall_ratio": round(wall_ratio, 3),
        "ratio": round(ratio, 3),
        "goal": goal,
        "met": ratio >= goal,
    }


def run(quick: bool) -> dict:
    torch.manual_seed(0)
    raw = {name: measure(name, quick) for name in CONFIGS}
    demo, small = raw["demo"], raw["small"]
    return {
        "config": {name: CONFIGS[name][0] for name in CONFIGS}
        | {"quick": quick, "threads": torch.get_num_threads()},
        "raw": raw,
        "ratio": demo["ratio"],
        "goal": ">= 2x demo, >= 1.3x small",
        "met": demo["met"] and small["met"],
        "baseline": "the pixel path (VAE/CLIP encode in the step), same config, engine and batch, alternated; "
        "objects per CPU-second of the process (wall obj/s in raw)",
        "summary": (
            f"training step obj/s from cached latents vs pixels: {demo['ratio']:.2f}x on the demo, "
            f"{small['ratio']:.2f}x on the small config (per CPU-second, medians; wall {demo['wall_ratio']:.2f}x, "
            f"{small['wall_ratio']:.2f}x)"
        ),
    }


def main(argv: list[str] | None = None) -> None:
    args = main_args(__doc__, argv)
    payload = run(args.quick)
    print(payload["summary"])
    print(write_result("latents", payload))


if __name__ == "__main__":
    main()
