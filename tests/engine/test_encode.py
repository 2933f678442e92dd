"""Cached latents, producer side (engine/encoding.py, launcher/encode.py): what is stored equals what the
pixel path's VAE/CLIP compute, a resumed encoding writes the same bytes, and the encoder identity / preflight
refuse what does not match. Tiny: 6 synthetic objects at 32², tiny components, in-process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from datapipes.cameras import camera_embedding
from datapipes.convert import ConvertOptions, convert
from datapipes.latent_format import LATENTS_MANIFEST, load_latents_manifest, unpack_object
from datapipes.shard_io import iter_shard_entries
from datapipes.shards import decode_entry
from datapipes.synth.dataset import render_dataset
from datapipes.transform import TransformOptions
from engine.encoding import (
    EncodeError,
    EncodeOptions,
    encode_shards,
    encoder_identity,
    plan_encode,
)
from launcher import encode as encode_cli
from modeling.components import load_components, save_components, tiny_components

RES, OBJECTS = 32, 6
OPTS = EncodeOptions(resolution=RES, clip_size=224, batch_size=20)  # 39 images per object: 1 per VAE call
NAMES = {"vae": "tiny", "clip": "tiny"}


@pytest.fixture(scope="module")
def pixel_shards(tmp_path_factory) -> Path:
    """Converter output: 6 objects at 32², 2 per shard, all in train."""
    root = tmp_path_factory.mktemp("encode_src")
    render_dataset(root / "renders", OBJECTS, res=RES, seed=3, workers=1)
    convert(root / "renders", root / "shards", ConvertOptions(samples_per_shard=2, val_fraction=0.0))
    return root / "shards"


def components():
    return tiny_components(RES, 32, seed=0)


def encode(shards: Path, out: Path, opts: EncodeOptions = OPTS, parts=None, progress=None) -> dict:
    kwargs = {} if progress is None else {"progress": progress}
    return encode_shards(plan_encode(shards, out, opts), parts or components(), opts, NAMES, **kwargs)


@pytest.fixture(scope="module")
def encoded(pixel_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("encode_out") / "latents"
    encode(pixel_shards, out)
    return out


def _latent_samples(out: Path, shard: str) -> list[tuple[dict, dict]]:
    return [unpack_object(e.members, e.key) for e in iter_shard_entries(str(out / shard))]


def test_stored_latents_equal_the_pixel_path_encoders(pixel_shards, encoded):
    manifest = load_latents_manifest(encoded)
    assert manifest["complete"] and manifest["backgrounds"] == ["white", "black", "gray"]
    assert sum(s["samples"] for s in manifest["shards"]) == OBJECTS
    parts = components()
    source_entries = list(iter_shard_entries(str(pixel_shards / "train/shard-000000.tar")))
    stored = _latent_samples(encoded, "train/shard-000000.tar")
    assert [meta["object_id"] for meta, _ in stored] == manifest["shards"][0]["objects"]
    for entry, (meta, tensors) in zip(source_entries, stored, strict=True):
        for g, background in enumerate(manifest["backgrounds"]):
            opts = TransformOptions(background=background, resolution=RES, clip_size=224, num_views=6)
            example = decode_entry(entry, opts, seed=0, epoch=0)
            assert example["object_id"] == meta["object_id"]
            for key, domain in (("image", "color"), ("normal", "normal")):  # stored poses -> same embedding
                embed = camera_embedding(np.array(meta["cond_w2c"]), np.array(meta["w2c"]), domain)
                torch.testing.assert_close(torch.from_numpy(embed).float(), example[f"camera_embed_{key}"])
            with torch.no_grad():
                for name, key in (("cond", "image_cond_vae"), ("color", "image_target_vae")):
                    images = example[key] if example[key].dim() == 4 else example[key][None]
                    posterior = parts.vae.encode(images).latent_dist
                    want_mean, want_logvar = posterior.mean, posterior.logvar
                    got_mean, got_logvar = tensors[f"{name}_mean"][g], tensors[f"{name}_logvar"][g]
                    # fp16 storage: relative rounding 2^-11, plus fp32 batch-vs-single differences
                    torch.testing.assert_close(
                        got_mean.float(), want_mean.reshape(got_mean.shape), rtol=2e-3, atol=2e-3
                    )
                    torch.testing.assert_close(
                        got_logvar.float(), want_logvar.reshape(got_logvar.shape), rtol=2e-3, atol=2e-3
                    )
                normal = parts.vae.encode(example["normal_target_vae"]).latent_dist.mean
                torch.testing.assert_close(tensors["normal_mean"][g].float(), normal, rtol=2e-3, atol=2e-3)
                clip = parts.image_encoder(example["image_cond_CLIP"][None]).image_embeds[0]
                torch.testing.assert_close(tensors["clip_embed"][g], clip, rtol=1e-4, atol=1e-5)
        for a, b in ((0, 1), (0, 2), (1, 2)):  # every background is its own encoding
            assert not torch.allclose(tensors["cond_mean"][a], tensors["cond_mean"][b], atol=1e-2)
            assert not torch.allclose(tensors["clip_embed"][a], tensors["clip_embed"][b], atol=1e-4)


def test_resume_after_a_crash_writes_the_same_bytes(pixel_shards, encoded, tmp_path):
    crashed = tmp_path / "latents"
    shutil.copytree(encoded, crashed)
    manifest = json.loads((crashed / LATENTS_MANIFEST).read_text())
    last = manifest["shards"].pop()  # killed after the tar's rename, before latents.json recorded it
    manifest["complete"] = False
    (crashed / LATENTS_MANIFEST).write_text(json.dumps(manifest, indent=1))
    (crashed / f"{last['name']}.tmp").write_bytes(b"half a tar")  # and a half-written next one
    first = manifest["shards"][0]
    (crashed / first["name"]).unlink()  # a listed shard lost since: encoded again
    seen = []
    encode(pixel_shards, crashed, progress=seen.append)
    assert sum(seen) == last["samples"] + first["samples"], (
        "want exactly the unrecorded shard and the lost one encoded"
    )
    files = sorted(p.relative_to(encoded) for p in encoded.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(crashed) for p in crashed.rglob("*") if p.is_file())
    for name in files:
        assert (encoded / name).read_bytes() == (crashed / name).read_bytes(), f"{name} differs after resume"


def test_workers_write_the_same_bytes(pixel_shards, encoded, tmp_path):
    out = tmp_path / "latents"
    encode(pixel_shards, out, EncodeOptions(**{**OPTS.__dict__, "workers": 1}))
    for shard in load_latents_manifest(encoded)["shards"]:
        assert (out / shard["name"]).read_bytes() == (encoded / shard["name"]).read_bytes(), shard["name"]


def test_encoder_identity_follows_weights_config_and_sizes(tmp_path):
    parts = components()
    base = encoder_identity(parts, RES, 224)
    save_components(parts, tmp_path / "saved")
    assert encoder_identity(load_components(tmp_path / "saved"), RES, 224) == base, "save/load changed it"
    assert encoder_identity(parts, RES * 2, 224) != base
    assert encoder_identity(parts, RES, 112) != base
    with torch.no_grad():
        next(iter(parts.vae.parameters())).view(-1)[0] += 1e-3
    assert encoder_identity(parts, RES, 224) != base
    parts = components()
    with torch.no_grad():
        next(iter(parts.image_encoder.parameters())).view(-1)[0] += 1e-3
    assert encoder_identity(parts, RES, 224) != base


def test_resume_refuses_other_settings_and_other_encoder(pixel_shards, encoded, tmp_path):
    with pytest.raises(EncodeError, match="resolution 32 there, 64 now"):
        plan_encode(pixel_shards, encoded, EncodeOptions(resolution=64, clip_size=224))
    changed = json.loads((encoded / LATENTS_MANIFEST).read_text())
    changed["shards"][1]["source_sha256"] = "0" * 64
    (tmp_path / "changed").mkdir()
    (tmp_path / "changed" / LATENTS_MANIFEST).write_text(json.dumps(changed))
    with pytest.raises(EncodeError, match=r"source shard train/shard-000001\.tar changed"):
        plan_encode(pixel_shards, tmp_path / "changed", OPTS)
    with pytest.raises(EncodeError, match="backgrounds"):
        plan_encode(
            pixel_shards, encoded, EncodeOptions(resolution=RES, clip_size=224, backgrounds=("white",))
        )
    other = components()
    with torch.no_grad():
        next(iter(other.vae.parameters())).view(-1)[0] += 1e-3
    want = load_latents_manifest(encoded)["encoder"]["hash"]
    with pytest.raises(EncodeError, match=f"encoder {want}, these components are [0-9a-f]{{64}}"):
        encode_shards(plan_encode(pixel_shards, encoded, OPTS), other, OPTS, NAMES)


@pytest.fixture(scope="module")
def components_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("encode_components")
    save_components(components(), folder)
    return folder


def _cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = encode_cli.main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("case", ["missing", "not_ours", "out_is_source", "bad_background", "resolution"])
def test_cli_refuses_in_one_line_before_loading_a_model(
    case, pixel_shards, components_dir, tmp_path, capsys, monkeypatch
):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the preflight refused")

    monkeypatch.setattr(encode_cli, "load_encoder", no_model)
    shards, out, extra, named = (
        str(tmp_path / "nowhere"),
        str(tmp_path / "out"),
        [],
        str(tmp_path / "nowhere"),
    )
    if case == "not_ours":
        (tmp_path / "manifest.json").write_text('{"format": "something-else"}')
        shards = named = str(tmp_path / "manifest.json")
    elif case == "out_is_source":
        shards, out, named = str(pixel_shards), str(pixel_shards), "manifest.json"
    elif case == "bad_background":
        shards, extra, named = str(pixel_shards), ["--backgrounds", "white,pink"], "white,pink"
    elif case == "resolution":
        shards, extra, named = str(pixel_shards), ["--resolution", "36"], "--resolution 36"
    code, lines = _cli(
        ["--shards", shards, "--out", out, "--components", str(components_dir), *extra], capsys
    )
    assert code == 2 and len(lines) == 1, lines
    assert named in lines[0], lines
