"""Training examples from cached latents (``launcher/encode.py``): the stream ``data.source=latents`` reads.

A latent shard holds the same objects, in the same order, as its source shard, so the global order, the
windows, the resume state and the bad-sample handling are the pixel stream's (`ShardStream`); only
`example` changes. Per object it gives what the pixel transform would have fed the frozen encoders, already
encoded: the background is drawn exactly as `make_example` draws it (`example_rng` → `pick_background`),
and that background's stored VAE posterior (mean, logvar; fp16, unscaled) of the condition image and of the
selected target views, its stored CLIP embedding, and the camera embeddings as the pixel transform computes
them from the stored poses. ``engine.objective`` samples the latents from the posterior.

Example keys (unbatched): object_id; cond_mean, cond_logvar [4,h,w] fp16; color_mean, color_logvar,
normal_mean, normal_logvar [V,4,h,w] fp16; clip_embed [D] fp32; camera_embed_image, camera_embed_normal
[V,10] fp32. `collate` stacks them like any example.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from datapipes.cameras import camera_embedding
from datapipes.latent_format import LatentsError, latents_manifest_path, load_latents_manifest, unpack_object
from datapipes.sample import SampleError
from datapipes.shard_io import ShardEntry, ShardInfo
from datapipes.shards import ResumableLoader, ShardStream
from datapipes.stream_state import example_rng
from datapipes.transform import BACKGROUNDS, TransformOptions, pick_background

POSTERIOR_KEYS = ("cond_mean", "cond_logvar", "color_mean", "color_logvar", "normal_mean", "normal_logvar")
LATENT_BATCH_KEY = "cond_mean"  # a batch holding it came from latents (engine.objective picks its path)


def latent_shards(path: str) -> list[ShardInfo]:
    """The train shards a latents folder (or its latents.json) lists, with their sample counts."""
    manifest = load_latents_manifest(path)
    root = latents_manifest_path(path).parent
    return [ShardInfo(str(root / shard["name"]), int(shard["samples"])) for shard in manifest["shards"]]


def background_name(mode: str, rng: np.random.Generator) -> str:
    """The background `make_example` would draw for this object: the same call on the same generator."""
    color = pick_background(mode, rng)
    return next(
        name for name, rgb in BACKGROUNDS.items() if np.array_equal(np.asarray(rgb, np.float32), color)
    )


def latent_example(
    entry: ShardEntry, opts: TransformOptions, backgrounds: tuple[str, ...], seed: int, epoch: int
) -> dict[str, Any]:
    """One latent shard entry -> example (module docstring); raises SampleError naming object, shard, key."""
    if entry.error is not None:
        raise entry.error
    try:
        meta, tensors = unpack_object(entry.members, f"{entry.url}#{entry.key}")
    except LatentsError as error:
        raise SampleError(entry.key, "latents", str(error), entry.url) from None
    object_id = str(meta["object_id"])
    background = background_name(opts.background, example_rng(seed, epoch, object_id))
    if background not in backgrounds:
        problem = f"background {background!r} drawn, but only {list(backgrounds)} were encoded"
        raise SampleError(object_id, "backgrounds", problem, entry.url)
    g = backgrounds.index(background)
    stored = list(meta["view_names"])
    views = list(opts.views) if opts.views is not None else stored
    absent = [view for view in views if view not in stored]
    if absent:
        raise SampleError(object_id, "view_names", f"views {absent} not among stored {stored}", entry.url)
    index = [stored.index(view) for view in views]
    example: dict[str, Any] = {"object_id": object_id}
    for key in POSTERIOR_KEYS:
        example[key] = tensors[key][g] if key.startswith("cond_") else tensors[key][g, index]
    example["clip_embed"] = tensors["clip_embed"][g]
    cond_w2c = np.asarray(meta["cond_w2c"], dtype=np.float64)
    w2c = np.asarray(meta["w2c"], dtype=np.float64)[index]
    for key, domain in (("camera_embed_image", "color"), ("camera_embed_normal", "normal")):
        example[key] = torch.from_numpy(camera_embedding(cond_w2c, w2c, domain).astype(np.float32))
    return example


class LatentShardStream(ShardStream):
    """`ShardStream` over latent shards: the same order and state, examples made by `latent_example`.

    transform: its background and views are used (data.background, data.views); backgrounds: the encoded
    backgrounds in the latents.json order.
    """

    def __init__(self, shards: list[ShardInfo], *, backgrounds: tuple[str, ...], **kwargs: Any) -> None:
        super().__init__(shards, **kwargs)
        self.backgrounds = tuple(backgrounds)

    def example(self, entry: ShardEntry, epoch: int) -> dict[str, Any]:
        return latent_example(entry, self.transform, self.backgrounds, self.seed, epoch)


def build_latent_train_loader(
    path: str,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    transform: TransformOptions,
    workers: int = 2,
    shuffle_buffer: int = 256,
    bad_sample: str = "skip",
    shuffle_shards: bool = True,
    max_epochs: int | None = None,
    pin_memory: bool = False,
) -> ResumableLoader:
    """`datapipes.shards.build_train_loader` for a latents folder (OUT or OUT/latents.json)."""
    stream = LatentShardStream(
        latent_shards(path),
        backgrounds=tuple(load_latents_manifest(path)["backgrounds"]),
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        transform=transform,
        num_workers=workers,
        shuffle_buffer=shuffle_buffer,
        shuffle_shards=shuffle_shards,
        bad_sample=bad_sample,
        max_epochs=max_epochs,
    )
    return ResumableLoader(stream, workers, pin_memory=pin_memory)
