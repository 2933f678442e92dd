"""The cached-latents format (datapipes/latent_format.py): pack/unpack round trip, safetensors only,
and the manifest's atomic write / strict read."""

from __future__ import annotations

import io
import json
import pickle

import pytest
import torch

from datapipes.latent_format import (
    LATENTS_FORMAT,
    LATENTS_MANIFEST,
    TENSOR_SPECS,
    LatentsError,
    is_latents_dir,
    load_latents_manifest,
    pack_object,
    unpack_object,
    write_latents_manifest_atomic,
)

G, V, H = 3, 6, 4


def _object() -> tuple[dict, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    shapes = {4: (G, 4, H, H), 5: (G, V, 4, H, H), 2: (G, 32)}
    tensors = {
        name: torch.randn(shapes[rank], generator=gen).to(dtype)
        for name, (dtype, rank) in TENSOR_SPECS.items()
    }
    pose = [[0.1 * i + 1e-9 * j for j in range(4)] for i in range(3)]
    meta = {
        "object_id": "obj-1",
        "view_names": ["v"] * V,
        "cond_view": "v",
        "cond_w2c": pose,
        "w2c": [pose] * V,
    }
    return meta, tensors


def test_pack_unpack_round_trip_is_exact_and_deterministic():
    meta, tensors = _object()
    members = pack_object(meta, tensors)
    assert sorted(members) == ["json", "latents.safetensors"]
    assert members == pack_object(meta, tensors), "same object, different bytes"
    got_meta, got = unpack_object(members, "shard#obj-1")
    assert got_meta == meta  # float64 poses survive JSON exactly
    assert set(got) == set(tensors)
    for name, tensor in tensors.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


@pytest.mark.parametrize("payload", ["pickle", "torch_save", "garbage"])
def test_unpack_refuses_anything_but_safetensors(payload):
    meta, tensors = _object()
    members = pack_object(meta, tensors)
    if payload == "pickle":
        members["latents.safetensors"] = pickle.dumps(tensors)
    elif payload == "torch_save":
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        members["latents.safetensors"] = buffer.getvalue()
    else:
        members["latents.safetensors"] = b"\x00" * 64
    with pytest.raises(
        LatentsError, match=r"shard-7\.tar#obj-1: member 'latents.safetensors' is not safetensors"
    ):
        unpack_object(members, "shard-7.tar#obj-1")


def test_unpack_refuses_missing_members_and_wrong_dtypes():
    meta, tensors = _object()
    members = pack_object(meta, tensors)
    with pytest.raises(LatentsError, match="missing members"):
        unpack_object({"json": members["json"]}, "s#k")
    with pytest.raises(LatentsError, match=r"'cond_mean' is torch\.float32"):
        pack_object(meta, {**tensors, "cond_mean": tensors["cond_mean"].float()})
    with pytest.raises(LatentsError, match="lacks keys"):
        unpack_object({**members, "json": json.dumps({"object_id": "x"}).encode()}, "s#k")


def test_manifest_atomic_write_and_strict_read(tmp_path):
    manifest = {"format": LATENTS_FORMAT, "source_manifest": "/x/manifest.json", "encoder": {"hash": "h"}}
    manifest.update(resolution=64, clip_size=224, latent_channels=4, latent_size=8, backgrounds=["white"])
    manifest.update(views=["front"], cond_view="front", scaling_factor=1.0, shards=[], complete=True)
    write_latents_manifest_atomic(tmp_path, manifest)
    assert not list(tmp_path.glob("*.tmp"))
    assert load_latents_manifest(tmp_path) == manifest == load_latents_manifest(tmp_path / LATENTS_MANIFEST)
    assert is_latents_dir(tmp_path)
    (tmp_path / LATENTS_MANIFEST).write_text(json.dumps({**manifest, "format": "gnn3d-shards/1"}))
    with pytest.raises(LatentsError, match=rf"{tmp_path / LATENTS_MANIFEST} is not a gnn3d latents manifest"):
        load_latents_manifest(tmp_path)
    assert not is_latents_dir(tmp_path) and not is_latents_dir(tmp_path / "nowhere")
