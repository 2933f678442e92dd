"""Shard inspector: counts, sizes, per-field statistics and a picture grid of samples.

Named `inspection` (not `inspect`) so it never shadows the standard library module.

    python launcher/inspect_shards.py shards/ --grid grid.png --samples 4
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from datapipes.manifest import MANIFEST_NAME
from datapipes.render_folder import decode_raw_object
from datapipes.sample import MultiViewSample, SampleError
from datapipes.shard_io import ShardInfo, iter_shard_entries, raw_from_entry, resolve_shards


def resolve_target(target: str, split: str = "train") -> list[ShardInfo]:
    """A converter output folder (its manifest, `split`), a folder of ``*.tar``, or any URL spec."""
    path = Path(target)
    if path.is_dir() and not (path / MANIFEST_NAME).is_file():
        return [ShardInfo(str(p)) for p in sorted(path.rglob("*.tar"))]
    return resolve_shards(target, split)


def _decoded_stats(sample: MultiViewSample) -> dict[str, float]:
    alpha = sample.color_rgba[..., 3] > 127
    normals = sample.normal_rgba[..., :3].astype(np.float64) / 255.0 * 2.0 - 1.0
    lengths = np.linalg.norm(normals, axis=-1)[alpha]
    return {
        "alpha_coverage": float(alpha.mean()),
        "color_mean": float(sample.color_rgba[..., :3][alpha].mean()) if alpha.any() else 0.0,
        "normal_length_mean": float(lengths.mean()) if lengths.size else 0.0,
        "normal_length_std": float(lengths.std()) if lengths.size else 0.0,
    }


def shard_statistics(shards: list[ShardInfo], decode_limit: int = 64) -> dict[str, Any]:
    """Counts, byte sizes per member field, image sizes and decoded statistics of up to `decode_limit` samples.

    Unreadable samples are listed under "errors" (shard, object, key), never fatal.
    """
    fields: dict[str, list[int]] = defaultdict(list)
    per_shard, errors, decoded = [], [], []
    sizes: Counter[str] = Counter()
    for shard in shards:
        count = 0
        for entry in iter_shard_entries(shard.url):
            if entry.error is None:
                count += 1
                for name, data in entry.members.items():
                    fields[name].append(len(data))
            try:
                if len(decoded) < decode_limit or entry.error is not None:
                    sample = decode_raw_object(raw_from_entry(entry))
                    sizes[f"{sample.cond_rgba.shape[1]}x{sample.cond_rgba.shape[0]}"] += 1
                    decoded.append(_decoded_stats(sample))
            except SampleError as error:
                errors.append(str(error))
        size = os.path.getsize(shard.url) if os.path.isfile(shard.url) else None
        per_shard.append(
            {"url": shard.url, "samples": count, "bytes": size, "manifest_samples": shard.samples}
        )
    return {
        "shards": len(shards),
        "samples": sum(s["samples"] for s in per_shard),
        "bytes": sum(s["bytes"] or 0 for s in per_shard),
        "per_shard": per_shard,
        "fields": {name: _summary(values) for name, values in sorted(fields.items())},
        "image_sizes": dict(sizes),
        "decoded": {key: _summary([d[key] for d in decoded]) for key in (decoded[0] if decoded else {})},
        "errors": errors,
    }


def _summary(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {
        "count": int(array.size),
        "min": float(array.min()),
        "mean": float(array.mean()),
        "max": float(array.max()),
    }


def first_samples(shards: list[ShardInfo], count: int) -> list[MultiViewSample]:
    """The first `count` decodable samples in shard order (bad ones are passed over)."""
    samples: list[MultiViewSample] = []
    for shard in shards:
        for entry in iter_shard_entries(shard.url):
            try:
                samples.append(decode_raw_object(raw_from_entry(entry)))
            except SampleError:
                continue
            if len(samples) >= count:
                return samples
    return samples


def _on_white(rgba: np.ndarray, cell: int) -> np.ndarray:
    image = Image.fromarray(rgba, "RGBA").resize((cell, cell), Image.Resampling.BILINEAR)
    canvas = Image.new("RGBA", (cell, cell), (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(canvas, image).convert("RGB"))


def sample_grid(samples: list[MultiViewSample], cell: int = 128) -> Image.Image:
    """One row per sample: condition | V color views | V normal maps as stored; on white, cell² pixels each."""
    if not samples:
        raise ValueError("sample_grid needs at least one sample")
    rows = []
    for sample in samples:
        tiles = [sample.cond_rgba, *sample.color_rgba, *sample.normal_rgba]
        rows.append(np.concatenate([_on_white(tile, cell) for tile in tiles], axis=1))
    width = max(row.shape[1] for row in rows)
    rows = [np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0)), constant_values=255) for row in rows]
    return Image.fromarray(np.concatenate(rows, axis=0), "RGB")
