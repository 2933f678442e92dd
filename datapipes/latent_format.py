"""Cached latents: the folder `launcher/encode.py` writes and `data.source=latents` reads.

A latents dataset is a folder OUT next to (not inside) the pixel shards it was made from::

    OUT/latents.json                      the manifest below (atomic, rewritten after each finished shard)
    OUT/train/shard-000000.tar            one latent shard per source train shard, same object order

    {"format": "gnn3d-latents/1", "source_manifest": "/abs/pixels/manifest.json",
     "encoder": {"hash": sha256 hex, "vae": name or path, "clip": name or path},
     "resolution": R, "clip_size": C, "latent_channels": 4, "latent_size": R // 8,
     "backgrounds": ["white", "black", "gray"], "views": [stored view names], "cond_view": "front",
     "scaling_factor": f,
     "shards": [{"name": "train/shard-000000.tar", "source": "train/shard-000000.tar", "samples": N,
                 "objects": [...], "bytes": ..., "sha256": ...}], "complete": bool}

Each sample of a latent shard is two tar members (webdataset grouping: ``<key>.<member>``):
- ``<key>.json``: {"object_id", "view_names", "cond_view", "cond_w2c" [3][4], "w2c" [V][3][4]};
- ``<key>.latents.safetensors``: `TENSOR_SPECS` -- G backgrounds in manifest order, V stored views. mean and
  logvar are diffusers' ``latent_dist.mean`` / ``.logvar`` (NOT scaled by the scaling factor).
Only safetensors and JSON are ever parsed: nothing here unpickles.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

LATENTS_FORMAT = "gnn3d-latents/1"
LATENTS_MANIFEST = "latents.json"
META_MEMBER = "json"
TENSORS_MEMBER = "latents.safetensors"
# tensor name -> (dtype, rank); shapes: cond_* [G,4,h,w], color_*/normal_* [G,V,4,h,w], clip_embed [G,D]
TENSOR_SPECS: dict[str, tuple[torch.dtype, int]] = {
    "cond_mean": (torch.float16, 4),
    "cond_logvar": (torch.float16, 4),
    "color_mean": (torch.float16, 5),
    "color_logvar": (torch.float16, 5),
    "normal_mean": (torch.float16, 5),
    "normal_logvar": (torch.float16, 5),
    "clip_embed": (torch.float32, 2),
}
META_KEYS = ("object_id", "view_names", "cond_view", "cond_w2c", "w2c")
MANIFEST_KEYS = (
    "source_manifest",
    "encoder",
    "resolution",
    "clip_size",
    "latent_channels",
    "latent_size",
    "backgrounds",
    "views",
    "cond_view",
    "scaling_factor",
    "shards",
    "complete",
)


class LatentsError(RuntimeError):
    """A latents folder, manifest or sample is missing, unreadable or not ours (the message names it)."""


def latents_manifest_path(path: str | Path) -> Path:
    """``OUT/latents.json`` for a latents folder, or the manifest file itself."""
    path = Path(path)
    return path if path.suffix == ".json" else path / LATENTS_MANIFEST


def load_latents_manifest(path: str | Path) -> dict[str, Any]:
    """Read ``OUT/latents.json`` (path = OUT or the file); raises LatentsError naming the file."""
    file = latents_manifest_path(path)
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise LatentsError(f"cannot read latents manifest {file}: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != LATENTS_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise LatentsError(
            f"{file} is not a gnn3d latents manifest (format {found!r}, want {LATENTS_FORMAT!r})"
        )
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise LatentsError(f"{file} lacks keys {missing}")
    return manifest


def is_latents_dir(path: str | Path) -> bool:
    """True when `path` is a latents folder (or its latents.json) whose manifest reads as ours."""
    try:
        load_latents_manifest(path)
    except LatentsError:
        return False
    return True


def write_latents_manifest_atomic(out: str | Path, manifest: dict[str, Any]) -> None:
    """Write OUT/latents.json via a temp file, fsync, rename: a crash leaves the old or the new one."""
    out = Path(out)
    tmp = out / f"{LATENTS_MANIFEST}.tmp"
    with open(tmp, "w") as handle:
        json.dump(manifest, handle, indent=1, allow_nan=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, out / LATENTS_MANIFEST)


def pack_object(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """One object's tar members by extension: {"json": ..., "latents.safetensors": ...}.

    Deterministic bytes (sorted JSON keys, safetensors' fixed layout), so a rerun writes identical shards.
    """
    _check_meta(meta, str(meta.get("object_id")))
    _check_tensors(tensors, str(meta["object_id"]))
    contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    return {
        META_MEMBER: json.dumps(meta, sort_keys=True, allow_nan=False).encode(),
        TENSORS_MEMBER: save_safetensors(contiguous),
    }


def unpack_object(
    members: dict[str, bytes], where: str = ""
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(meta, tensors) from one sample's members; raises LatentsError naming `where` (shard#key).

    The tensors member is parsed only as safetensors (a pickle or anything else is refused).
    """
    where = where or "latent sample"
    absent = [name for name in (META_MEMBER, TENSORS_MEMBER) if name not in members]
    if absent:
        raise LatentsError(f"{where}: missing members {absent} (has {sorted(members)})")
    try:
        meta = json.loads(members[META_MEMBER])
    except ValueError as error:
        raise LatentsError(f"{where}: member {META_MEMBER!r} is not JSON: {error}") from error
    try:
        tensors = load_safetensors(members[TENSORS_MEMBER])
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise LatentsError(f"{where}: member {TENSORS_MEMBER!r} is not safetensors: {error}") from error
    _check_meta(meta, where)
    _check_tensors(tensors, where)
    return meta, tensors


def _check_meta(meta: Any, where: str) -> None:
    if not isinstance(meta, dict):
        raise LatentsError(f"{where}: meta must be a JSON object, got {type(meta).__name__}")
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise LatentsError(f"{where}: meta lacks keys {missing}")


def _check_tensors(tensors: dict[str, torch.Tensor], where: str) -> None:
    names = set(tensors)
    if names != set(TENSOR_SPECS):
        raise LatentsError(f"{where}: tensors {sorted(names)} differ from {sorted(TENSOR_SPECS)}")
    for name, (dtype, rank) in TENSOR_SPECS.items():
        tensor = tensors[name]
        if tensor.dtype != dtype or tensor.dim() != rank:
            problem = f"{tensor.dtype} rank {tensor.dim()}, want {dtype} rank {rank}"
            raise LatentsError(f"{where}: tensor {name!r} is {problem}")
