"""Encode pixel shards once into cached latents, so training never runs the frozen VAE / CLIP again.

For every object of the source's TRAIN shards and every background a run can draw, the images are made
exactly as the pixel path makes them (`datapipes.transform.make_example`, all stored views) and encoded in
batches: the VAE posterior (mean, logvar; fp16) of the condition image and of every color and normal view,
and the CLIP ``image_embeds`` of the condition image (fp32). One latent shard per source shard, same object
order; the format is `datapipes.latent_format`.

Resumable like the converter: ``latents.json`` is rewritten atomically after each finished shard; a rerun
(after a crash or kill -9) deletes half-written shards, skips the finished ones and writes the same bytes
(batches never span two shards, so a shard's VAE calls do not depend on where a run started).

    plan = plan_encode("shards/", "latents/", opts, names)   # preflight: no model loaded
    encode_shards(plan, components, opts, names)             # components: modeling.components.Components
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from datapipes.convert import sha256_file
from datapipes.latent_format import (
    LATENTS_FORMAT,
    LATENTS_MANIFEST,
    LatentsError,
    load_latents_manifest,
    pack_object,
    write_latents_manifest_atomic,
)
from datapipes.manifest import MANIFEST_NAME, ManifestError, load_manifest, manifest_path, manifest_views
from datapipes.render_folder import decode_raw_object
from datapipes.sample import COND_VIEW, SampleError
from datapipes.shard_io import ShardIndex, index_shard, raw_from_entry, read_indexed
from datapipes.transform import BACKGROUNDS, TransformOptions, make_example
from engine.build import build_components
from engine.config import ConfigError, load_config
from engine.demo.data import ensure_demo_shards
from engine.demo.vae import ensure_demo_components
from engine.sources import resolve_pretrained
from modeling.components import Components, load_components

SPLIT = "train"  # validation keeps reading pixels: only the train split is encoded
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_BACKGROUNDS = tuple(BACKGROUNDS)  # Wonder3D's three: white, black, gray
LATENT_CHANNELS = 4
VAE_FACTOR = 8
# config keys that say where / by which library version a model was saved, not what it computes: a model
# built in memory and the same model saved and reloaded must have one identity
_PROVENANCE_KEYS = {"transformers_version", "architectures", "dtype", "torch_dtype"}
# what a resume must share with the folder it continues (besides the encoder hash)
_RESUME_KEYS = ("source_manifest", "resolution", "clip_size", "backgrounds", "views", "cond_view", "dtype")


class EncodeError(RuntimeError):
    """The encoding cannot start or continue (one line naming the file / option); the CLI exits 2."""


@dataclass(frozen=True)
class EncodeOptions:
    """What one encoding does. A resumed run must use the same resolution, clip size, backgrounds, dtype."""

    resolution: int = 256
    clip_size: int = 224
    backgrounds: tuple[str, ...] = DEFAULT_BACKGROUNDS
    batch_size: int = 64  # images per VAE call (at most); objects per call = batch_size // images per object
    workers: int = 0  # DataLoader processes decoding and transforming the pixel samples (0: this process)
    device: str = "cpu"
    dtype: str = "fp32"  # the encoders' precision; outputs are stored as fp16 (latents) / fp32 (CLIP) anyway


@dataclass(frozen=True)
class EncodePlan:
    """What `plan_encode` checked: the source train shards, the stored views, the latents folder to write."""

    source_manifest: Path
    out: Path
    views: tuple[str, ...]
    cond_view: str
    shards: list[dict[str, Any]]  # the source manifest's train shard entries, in order
    resuming: dict[str, Any] | None  # the existing latents.json this run continues, if any


# ------------------------------------------------------------------------------------------- identity


def _config_json(config: Any) -> str:
    items = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    kept = {k: v for k, v in items.items() if not str(k).startswith("_") and k not in _PROVENANCE_KEYS}
    return json.dumps(kept, sort_keys=True, default=str)


def _hash_module(digest: Any, module: torch.nn.Module) -> None:
    state = module.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu")
        tensor = tensor.float() if tensor.is_floating_point() else tensor
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.contiguous().numpy().tobytes())


def encoder_identity(components: Components, resolution: int, clip_size: int) -> str:
    """sha256 hex over the VAE's and CLIP's weights (names sorted, fp32 CPU bytes), their configs (JSON,
    sorted keys, provenance keys left out) and the image sizes.

    Call it on components as loaded (fp32): a bf16 copy of the weights hashes differently.
    """
    digest = hashlib.sha256()
    for label, module in (("vae", components.vae), ("clip", components.image_encoder)):
        digest.update(f"[{label}]{_config_json(module.config)}".encode())
        _hash_module(digest, module)
    digest.update(f"[sizes]resolution={resolution};clip_size={clip_size}".encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------- preflight


def check_options(opts: EncodeOptions) -> None:
    """Raise EncodeError naming the option that cannot work."""
    unknown = [name for name in opts.backgrounds if name not in BACKGROUNDS]
    if unknown or not opts.backgrounds or len(set(opts.backgrounds)) != len(opts.backgrounds):
        raise EncodeError(
            f"--backgrounds {','.join(opts.backgrounds)}: want distinct names from {list(BACKGROUNDS)}"
        )
    if opts.resolution < VAE_FACTOR or opts.resolution % VAE_FACTOR:
        raise EncodeError(
            f"--resolution {opts.resolution} must be a positive multiple of {VAE_FACTOR} (VAE factor)"
        )
    if opts.clip_size < 8:
        raise EncodeError(f"--clip-size {opts.clip_size} must be >= 8")
    if opts.batch_size < 1 or opts.workers < 0:
        raise EncodeError(
            f"--batch-size must be >= 1 and --workers >= 0 (got {opts.batch_size}, {opts.workers})"
        )
    if opts.dtype not in DTYPES:
        raise EncodeError(f"--dtype {opts.dtype!r}: want one of {list(DTYPES)}")


def plan_encode(shards: str | Path, out: str | Path, opts: EncodeOptions) -> EncodePlan:
    """Check everything that needs no model: options, the source manifest, OUT (new, or a resume of the same
    settings). Raises EncodeError in one line naming the file or option."""
    check_options(opts)
    source = manifest_path(shards).resolve()
    if not source.is_file():
        raise EncodeError(
            f"--shards {shards}: no {MANIFEST_NAME} at {source} (give the converter's output folder)"
        )
    try:
        manifest = load_manifest(source)
    except ManifestError as error:
        raise EncodeError(f"--shards {shards}: {error}") from None
    if not manifest.get("complete", True):
        raise EncodeError(f"{source}: the conversion is not complete; finish it (rerun the converter) first")
    train = [dict(entry) for entry in manifest["shards"] if entry["split"] == SPLIT]
    if not train:
        raise EncodeError(f"{source} lists no {SPLIT} shards")
    views, cond_view = manifest_views(manifest)
    plan = EncodePlan(source, Path(out).resolve(), views, cond_view, train, None)
    return EncodePlan(**{**plan.__dict__, "resuming": _check_out(plan, opts)})


def _check_out(plan: EncodePlan, opts: EncodeOptions) -> dict[str, Any] | None:
    out = plan.out
    if out.exists() and not out.is_dir():
        raise EncodeError(f"--out {out} exists and is not a folder")
    if not (out / LATENTS_MANIFEST).is_file():
        foreign = _foreign_files(out)
        if foreign:
            raise EncodeError(
                f"--out {out} holds {foreign[0]} and no {LATENTS_MANIFEST}: not a latents folder; pick a new one"
            )
        return None
    try:
        existing = load_latents_manifest(out)
    except LatentsError as error:
        raise EncodeError(f"--out {out}: {error}") from None
    wanted = _settings(plan, opts)
    differ = [key for key in _RESUME_KEYS if existing.get(key) != wanted[key]]
    if differ:
        pairs = "; ".join(f"{key} {existing.get(key)!r} there, {wanted[key]!r} now" for key in differ)
        raise EncodeError(
            f"--out {out} was encoded with other settings ({pairs}); use them to resume or a new --out"
        )
    source_sha = {shard["name"]: shard.get("sha256") for shard in plan.shards}
    for shard in existing["shards"]:
        if source_sha.get(shard["source"], shard["source_sha256"]) != shard["source_sha256"]:
            raise EncodeError(
                f"--out {out}: source shard {shard['source']} changed since it was encoded (sha256 differs); "
                "use a new --out"
            )
    return existing


def _foreign_files(out: Path) -> list[str]:
    """Files in OUT that no encoding run of ours leaves before its first latents.json (a crash right then
    leaves a temp manifest or half-written shards)."""
    if not out.is_dir():
        return []
    ours = {SPLIT, f"{LATENTS_MANIFEST}.tmp"}
    found = [p.name for p in out.iterdir() if p.name not in ours]
    if (out / SPLIT).is_dir():
        found += [f"{SPLIT}/{p.name}" for p in (out / SPLIT).iterdir() if not p.name.startswith("shard-")]
    return sorted(found)


def _settings(plan: EncodePlan, opts: EncodeOptions) -> dict[str, Any]:
    return {
        "source_manifest": str(plan.source_manifest),
        "resolution": opts.resolution,
        "clip_size": opts.clip_size,
        "backgrounds": list(opts.backgrounds),
        "views": list(plan.views),
        "cond_view": plan.cond_view,
        "dtype": opts.dtype,
    }


def _start_manifest(
    plan: EncodePlan, opts: EncodeOptions, components: Components, names: dict[str, str]
) -> dict[str, Any]:
    """The new latents.json, or the resumed one once its encoder hash matches (EncodeError otherwise)."""
    identity = encoder_identity(components, opts.resolution, opts.clip_size)
    if plan.resuming is not None:
        found = plan.resuming["encoder"]["hash"]
        if found != identity:
            raise EncodeError(
                f"--out {plan.out} was encoded by encoder {found}, these components are {identity} "
                f"({names['vae']}); use the same VAE/CLIP to resume or a new --out"
            )
        return {**plan.resuming, "complete": False}
    return {
        "format": LATENTS_FORMAT,
        "encoder": {"hash": identity, "vae": names["vae"], "clip": names["clip"]},
        **_settings(plan, opts),
        "latent_channels": LATENT_CHANNELS,
        "latent_size": opts.resolution // VAE_FACTOR,
        "scaling_factor": float(components.vae.config.scaling_factor),
        "shards": [],
        "complete": False,
    }


# ------------------------------------------------------------------------------------------- reading


class PixelObjects(Dataset):
    """Object n of the pending shards, made for every background: stacked `*_vae` and CLIP inputs.

    Item: {"key", "meta", "cond" [G,3,H,W], "color" / "normal" [G,V,3,H,W], "clip" [G,3,c,c]} or
    {"error": str} (a worker hands back a message, not an exception: SampleError does not cross processes
    through DataLoader intact).
    """

    def __init__(self, root: Path, shards: list[dict[str, Any]], plan: EncodePlan, opts: EncodeOptions):
        self.slots = [
            (str(root / shard["name"]), i) for shard in shards for i in range(int(shard["samples"]))
        ]
        self.transforms = [
            TransformOptions(
                background=bg, resolution=opts.resolution, clip_size=opts.clip_size, num_views=len(plan.views)
            )
            for bg in opts.backgrounds
        ]
        self.views = plan.views
        self._index: ShardIndex | None = None

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, n: int) -> dict[str, Any]:
        url, i = self.slots[n]
        if self._index is None or self._index.url != url:
            self._index = index_shard(url)  # slots come in shard order: one index per shard and worker
        if i >= len(self._index.samples):
            problem = self._index.error or f"holds {len(self._index.samples)} samples, the manifest more"
            return {"error": f"{url}: sample {i}: {problem}"}
        try:
            return self._make(read_indexed(self._index, i))
        except SampleError as error:
            return {"error": str(error)}

    def _make(self, entry) -> dict[str, Any]:
        raw = raw_from_entry(entry)
        sample = decode_raw_object(raw)  # every stored view, stored order
        if tuple(sample.view_names) != self.views:
            raise sample.error("view_names", f"stores {sample.view_names}, the manifest {self.views}")
        examples = [make_example(sample, t, None) for t in self.transforms]
        meta = {
            "object_id": sample.object_id,
            "view_names": list(sample.view_names),
            "cond_view": str(raw.cameras.get("cond_view", COND_VIEW)),
            "cond_w2c": sample.cond_w2c.tolist(),
            "w2c": sample.w2c.tolist(),
        }

        def stack(key: str) -> torch.Tensor:  # [G, ...]: backgrounds in the order asked for
            return torch.stack([example[key] for example in examples])

        return {
            "key": entry.key,
            "meta": meta,
            "cond": stack("image_cond_vae"),
            "color": stack("image_target_vae"),
            "normal": stack("normal_target_vae"),
            "clip": stack("image_cond_CLIP"),
        }


def _objects(dataset: PixelObjects, workers: int) -> Iterator[dict[str, Any]]:
    if workers == 0:
        yield from (dataset[n] for n in range(len(dataset)))
        return
    # batch_size=None: items as made, in order; workers decode ahead while this process encodes
    yield from DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, prefetch_factor=4)


# ------------------------------------------------------------------------------------------- encoding


@torch.no_grad()
def encode_objects(
    objects: list[dict[str, Any]], components: Components, opts: EncodeOptions
) -> list[dict[str, torch.Tensor]]:
    """The latent tensors (`datapipes.latent_format.TENSOR_SPECS`) of each object, VAE calls of at most
    `opts.batch_size` images. Components must already be on opts.device in opts.dtype."""
    device, dtype = torch.device(opts.device), DTYPES[opts.dtype]
    groups, views = objects[0]["cond"].shape[0], objects[0]["color"].shape[1]
    # (n, G, 1 + 2V, 3, H, W): condition, color views, normal views of every background
    images = torch.stack([torch.cat([o["cond"][:, None], o["color"], o["normal"]], dim=1) for o in objects])
    means, logvars = [], []
    for chunk in images.flatten(0, 2).split(opts.batch_size):
        posterior = components.vae.encode(chunk.to(device, dtype)).latent_dist
        means.append(posterior.mean.float().cpu())
        logvars.append(posterior.logvar.float().cpu())
    shape = (len(objects), groups, 1 + 2 * views)
    mean = torch.cat(means).unflatten(0, shape).half()
    logvar = torch.cat(logvars).unflatten(0, shape).half()
    clip_in = torch.stack([o["clip"] for o in objects]).flatten(0, 1).to(device, dtype)
    clip = components.image_encoder(clip_in).image_embeds.float().cpu().unflatten(0, (len(objects), groups))
    color, normal = slice(1, 1 + views), slice(1 + views, None)
    return [
        {
            "cond_mean": mean[i, :, 0].clone(),
            "cond_logvar": logvar[i, :, 0].clone(),
            "color_mean": mean[i, :, color].clone(),
            "color_logvar": logvar[i, :, color].clone(),
            "normal_mean": mean[i, :, normal].clone(),
            "normal_logvar": logvar[i, :, normal].clone(),
            "clip_embed": clip[i].clone(),
        }
        for i in range(len(objects))
    ]


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # fixed metadata (no mtime / owner) keeps a rerun's shards byte-identical, as the converter's
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _encode_shard(
    name: str,
    objects: Iterator[dict[str, Any]],
    components: Components,
    opts: EncodeOptions,
    views: int,
    tmp: Path,
    progress: Callable[[int], None],
) -> list[str]:
    """Encode one source shard's objects into the tar `tmp`; returns the object ids written.

    Whole objects per VAE call where they fit in opts.batch_size images, and never two shards in one call.
    """
    group = max(1, opts.batch_size // (len(opts.backgrounds) * (1 + 2 * views)))
    written: list[str] = []
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        items = iter(objects)
        while batch := list(itertools.islice(items, group)):
            errors = [item["error"] for item in batch if "error" in item]
            if errors:
                raise EncodeError(f"cannot encode {name}: {errors[0]}")
            for item, tensors in zip(batch, encode_objects(batch, components, opts), strict=True):
                for member, data in sorted(pack_object(item["meta"], tensors).items()):
                    _tar_member(tar, f"{item['key']}.{member}", data)
                written.append(item["meta"]["object_id"])
            progress(len(batch))
    return written


def _discard_unfinished(out: Path, manifest: dict[str, Any]) -> None:
    """Forget listed shards whose file is gone or has another size (encoded again), and delete ``*.tmp`` and
    shard files latents.json does not list (a crash before its update)."""
    manifest["shards"] = [
        shard
        for shard in manifest["shards"]
        if (out / shard["name"]).is_file() and (out / shard["name"]).stat().st_size == shard["bytes"]
    ]
    listed = {shard["name"] for shard in manifest["shards"]}
    for path in sorted((out / SPLIT).glob("shard-*")) if (out / SPLIT).is_dir() else []:
        if f"{SPLIT}/{path.name}" not in listed:
            path.unlink()


def encode_shards(
    plan: EncodePlan,
    components: Components,
    opts: EncodeOptions,
    names: dict[str, str],
    progress: Callable[[int], None] = lambda objects: None,
) -> dict[str, Any]:
    """Encode every train shard of the plan not finished yet; returns the final latents.json.

    names: {"vae": ..., "clip": ...} recorded in the manifest (name or path). Moves `components` to
    opts.device / opts.dtype (after hashing them). Raises EncodeError (encoder differs from the one a
    resumed folder was made with, an unreadable source sample).
    """
    manifest = _start_manifest(plan, opts, components, names)
    out, root = plan.out, plan.source_manifest.parent
    (out / SPLIT).mkdir(parents=True, exist_ok=True)
    _discard_unfinished(out, manifest)
    write_latents_manifest_atomic(out, manifest)
    done = {shard["name"] for shard in manifest["shards"]}
    pending = [shard for shard in plan.shards if shard["name"] not in done]
    dtype = DTYPES[opts.dtype]  # diffusers warns on any dtype cast, fp32 included: cast only when needed
    components.to(torch.device(opts.device), None if dtype == torch.float32 else dtype).freeze()
    objects = _objects(PixelObjects(root, pending, plan, opts), opts.workers)
    for shard in pending:
        tmp = out / f"{shard['name']}.tmp"
        mine = itertools.islice(objects, int(shard["samples"]))
        written = _encode_shard(shard["name"], mine, components, opts, len(plan.views), tmp, progress)
        final = out / shard["name"]
        tmp.replace(final)
        manifest["shards"].append(
            {
                "name": shard["name"],
                "source": shard["name"],
                "source_sha256": shard.get("sha256"),
                "samples": len(written),
                "objects": written,
                "bytes": final.stat().st_size,
                "sha256": sha256_file(final),
            }
        )
        write_latents_manifest_atomic(out, manifest)
    order = [shard["name"] for shard in plan.shards]
    manifest["shards"].sort(key=lambda entry: order.index(entry["name"]))
    manifest["complete"] = True
    write_latents_manifest_atomic(out, manifest)
    return manifest


def shard_bytes(plan: EncodePlan) -> tuple[int, int]:
    """(bytes of the source's train shards, bytes of the latent shards written): what the cache costs."""
    latents = load_latents_manifest(plan.out)
    return sum(int(s["bytes"]) for s in plan.shards), sum(int(s["bytes"]) for s in latents["shards"])


# ------------------------------------------------------------------------------------------- which encoder


@dataclass(frozen=True)
class EncoderSource:
    """Where the VAE and CLIP come from: kind "pretrained" (folder or hub id), "components" (a run's saved
    components folder) or "demo" (`where` = the run config whose demo components to use: fitted VAE, cached)."""

    kind: str
    where: str


def check_encoder_source(source: EncoderSource) -> None:
    """Cheap checks before any model is read (EncodeError naming the option)."""
    if source.kind == "pretrained":
        try:
            resolve_pretrained(source.where, key="--pretrained")
        except ConfigError as error:
            raise EncodeError(str(error)) from None
    elif source.kind == "components":
        if not (Path(source.where) / "vae" / "config.json").is_file():
            raise EncodeError(f"--components {source.where}: no vae/config.json there (a run's components/)")
    elif source.kind == "demo":
        try:
            load_config(source.where)
        except ConfigError as error:
            raise EncodeError(f"--config: {error}") from None
    else:
        raise EncodeError(f"unknown encoder source {source.kind!r}")


def demo_shards(config: str | Path) -> Path:
    """The demo run's pixel manifest for this run config (rendered and converted on first use)."""
    return ensure_demo_shards(load_config(config), local_rank=0)


def load_encoder(source: EncoderSource, device: str = "cpu") -> tuple[Components, dict[str, str]]:
    """(frozen fp32 CPU components, {"vae": name, "clip": name} for the manifest).

    demo: exactly the components a demo run with that config trains with (the cached fitted VAE; fitted on
    `device` on first use), or its tiny ones when the config fits none.
    """
    if source.kind == "pretrained":
        folder = resolve_pretrained(source.where, key="--pretrained")
        return load_components(folder), {"vae": source.where, "clip": source.where}
    if source.kind == "components":
        folder = str(Path(source.where).resolve())
        return load_components(folder), {"vae": f"{folder}/vae", "clip": f"{folder}/image_encoder"}
    cfg = load_config(source.where)
    ensure_demo_shards(cfg, local_rank=0)  # the demo VAE is fitted to the demo renders
    folder = ensure_demo_components(
        cfg, local_rank=0, run_components=Path(cfg.run.dir) / "components", device=device
    )
    components = build_components(cfg, saved=folder)
    name = str(folder) if folder is not None else f"tiny components of {source.where} (seed {cfg.run.seed})"
    return components, {"vae": name, "clip": name}
