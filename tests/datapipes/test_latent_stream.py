"""The latents stream gives each object what the pixel stream gives it, already encoded: the same order, the
background the pixel transform draws, the selected views, the same camera embeddings."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from datapipes.latent_format import LATENTS_FORMAT, pack_object, write_latents_manifest_atomic
from datapipes.latent_stream import build_latent_train_loader, latent_example
from datapipes.manifest import load_manifest
from datapipes.render_folder import decode_raw_object
from datapipes.sample import SampleError
from datapipes.shard_io import iter_shard_entries, raw_from_entry
from datapipes.shards import build_train_loader
from datapipes.transform import BACKGROUNDS, TransformOptions
from tests.datapipes.fixtures_stream import make_shards

ENCODED = ("gray", "white", "black")  # not BACKGROUNDS' order: the stream must map names, not positions
LATENT = 4  # 32² images -> 4² latents


def fake_tensors(views: int) -> dict[str, torch.Tensor]:
    """Tensors whose values say which background g and stored view v they are: mean = 10·g + v."""
    g = torch.arange(len(ENCODED), dtype=torch.float16)
    v = torch.arange(views, dtype=torch.float16)
    cond = g.view(-1, 1, 1, 1).expand(-1, 4, LATENT, LATENT)
    targets = (10 * g.view(-1, 1, 1, 1, 1) + v.view(1, -1, 1, 1, 1)).expand(-1, -1, 4, LATENT, LATENT)
    return {
        "cond_mean": cond.clone(),
        "cond_logvar": -cond.clone(),
        "color_mean": targets.clone(),
        "color_logvar": -targets.clone(),
        "normal_mean": 100 + targets,
        "normal_logvar": -100 - targets,
        "clip_embed": g.float().view(-1, 1).expand(-1, 8).clone(),
    }


def write_fake_latents(pixels: Path, out: Path) -> Path:
    """A latents folder for the pixel shards' train split, in the launcher/encode.py format."""
    manifest = load_manifest(pixels / "manifest.json")
    shards = []
    for shard in (s for s in manifest["shards"] if s["split"] == "train"):
        (out / shard["name"]).parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out / shard["name"], "w") as tar:
            for entry in iter_shard_entries(str(pixels / shard["name"])):
                sample = decode_raw_object(raw_from_entry(entry))
                meta = {
                    "object_id": sample.object_id,
                    "view_names": list(sample.view_names),
                    "cond_view": "front",
                    "cond_w2c": sample.cond_w2c.tolist(),
                    "w2c": sample.w2c.tolist(),
                }
                for member, data in pack_object(meta, fake_tensors(sample.num_views)).items():
                    info = tarfile.TarInfo(f"{entry.key}.{member}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append({"name": shard["name"], "source": shard["name"], "samples": shard["samples"]})
    latents = {
        "format": LATENTS_FORMAT, "source_manifest": str(pixels / "manifest.json"),
        "encoder": {"hash": "0" * 64, "vae": "fake", "clip": "fake"}, "resolution": 32, "clip_size": 32,
        "latent_channels": 4, "latent_size": LATENT, "backgrounds": list(ENCODED),
        "views": list(sample.view_names), "cond_view": "front", "scaling_factor": 0.18215, "shards": shards,
        "complete": True,
    }  # fmt: skip
    write_latents_manifest_atomic(out, latents)
    return out


@pytest.fixture(scope="module")
def pixels_and_latents(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("latent_stream")
    pixels = make_shards(tmp, count=10, per_shard=3)
    (tmp / "latents").mkdir()
    return pixels, write_fake_latents(pixels, tmp / "latents")


def _batches(build, spec, opts: TransformOptions) -> list[dict]:
    loader = build(
        str(spec), batch_size=2, rank=0, world_size=1, seed=3, transform=opts, workers=0, shuffle_buffer=4,
        max_epochs=2,
    )  # fmt: skip
    return list(loader)


def test_latent_examples_follow_the_pixel_stream(pixels_and_latents):
    pixels, latents = pixels_and_latents
    views = ("front", "back", "left")  # a subset, reordered: stored view indices 0, 3, 4
    opts = TransformOptions(resolution=32, num_views=3, background="random", clip_size=32, views=views)
    pixel_batches = _batches(build_train_loader, pixels / "manifest.json", opts)
    latent_batches = _batches(build_latent_train_loader, latents, opts)
    assert [b["object_id"] for b in latent_batches] == [b["object_id"] for b in pixel_batches]
    drawn = []
    for pixel, latent in zip(pixel_batches, latent_batches, strict=True):
        assert latent["window_slot"] == pixel["window_slot"]
        for key in ("camera_embed_image", "camera_embed_normal"):
            torch.testing.assert_close(latent[key], pixel[key], rtol=0, atol=0)
        for i in range(len(latent["object_id"])):
            g = int(latent["cond_mean"][i, 0, 0, 0])
            corner = pixel["image_cond"][i, :, 0, 0].numpy()  # outside the disc: the background itself
            np.testing.assert_array_equal(corner, np.float32(BACKGROUNDS[ENCODED[g]]))
            assert latent["color_mean"][i, :, 0, 0, 0].tolist() == [10 * g + v for v in (0, 3, 4)]
            assert latent["normal_logvar"][i, :, 0, 0, 0].tolist() == [-100 - 10 * g - v for v in (0, 3, 4)]
            assert latent["clip_embed"][i].tolist() == [float(g)] * 8
            drawn.append(ENCODED[g])
    assert latent_batches[0]["color_mean"].dtype == torch.float16
    assert set(drawn) == set(ENCODED), f"every background should be drawn at least once: {drawn}"


def test_a_background_that_was_not_encoded_is_a_sample_error(pixels_and_latents):
    _, latents = pixels_and_latents
    entry = next(iter_shard_entries(str(next((latents / "train").iterdir()))))
    opts = TransformOptions(resolution=32, num_views=6, background="black", clip_size=32)
    with pytest.raises(SampleError, match=r"background 'black' drawn, but only \['gray', 'white'\]"):
        latent_example(entry, opts, ("gray", "white"), seed=0, epoch=0)
