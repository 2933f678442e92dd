"""The converter's ``manifest.json``: its format, atomic writing, reading, and what it says about views.

Both the converter (writes it) and the shard reader (reads it) import this module; neither imports the
other for it. Layout of the file::

    {"format": "gnn3d-shards/1", "source": ..., "layout": ..., "options": {...},
     "views": ["front", ...], "cond_view": "front",          # the views every sample stores
     "shards": [{"name": "train/shard-000000.tar", "split": "train", "samples": N, "bytes": ...,
                 "sha256": ..., "objects": [...]}, ...],
     "skipped": [{"object_id": ..., "path": ..., "reason": ...}], "selection": {...},
     "splits": {"train": {"shards", "samples", "bytes"}, "val": {...}}, "complete": bool}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from datapipes.sample import COND_VIEW, VIEW_NAMES

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "gnn3d-shards/1"
SPLITS = ("train", "val")


class ManifestError(RuntimeError):
    """A manifest is missing, unreadable or not ours (the message names the file)."""


def manifest_path(out: str | Path) -> Path:
    """``OUT/manifest.json`` for a converter output folder, or the manifest file itself."""
    path = Path(out)
    return path if path.suffix == ".json" else path / MANIFEST_NAME


def load_manifest(out: str | Path) -> dict[str, Any]:
    """Read ``OUT/manifest.json`` (or the manifest file itself); raises ManifestError if absent/invalid."""
    path = manifest_path(out)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ManifestError(f"cannot read manifest {path}: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ManifestError(f"{path} is not a gnn3d shard manifest (format {found!r})")
    return manifest


def manifest_views(manifest: dict[str, Any]) -> tuple[tuple[str, ...], str]:
    """(views every sample stores, condition view) of a manifest.

    Manifests written before the converter recorded them hold the 6 reference views with the front
    condition view: that converter always read exactly `VIEW_NAMES`.
    """
    return tuple(manifest.get("views", VIEW_NAMES)), str(manifest.get("cond_view", COND_VIEW))


def write_manifest_atomic(out: Path, manifest: dict[str, Any]) -> None:
    """Update the split totals, write to a temp file, fsync, rename: a crash leaves the old or the new one."""
    for split in SPLITS:
        shards = [s for s in manifest["shards"] if s["split"] == split]
        manifest["splits"][split] = {
            "shards": len(shards),
            "samples": sum(s["samples"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
        }
    tmp = out / f"{MANIFEST_NAME}.tmp"
    with open(tmp, "w") as handle:
        json.dump(manifest, handle, indent=1, allow_nan=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, out / MANIFEST_NAME)
