"""A model given as a local folder or a Hugging Face hub id ("org/name") -> a local folder.

Hub ids resolve the way diffusers resolves them, through ``huggingface_hub.snapshot_download``: the local
cache first (``HF_HOME`` / ``HF_HUB_CACHE`` / ``HUGGINGFACE_HUB_CACHE``), a download only when online
(``HF_HUB_OFFLINE`` unset). Only the parts gnn3d reads are fetched.
"""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import constants, snapshot_download

# "org/name": one slash, hub-legal characters, no leading "." or "/" (those are local paths).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# A diffusers pipeline folder (sd-image-variations, a gnn3d export) or a bare UNet folder.
WANTED_FILES = [
    "model_index.json",
    "config.json",
    "diffusion_pytorch_model.*",
    "unet/*",
    "vae/*",
    "image_encoder/*",
    "scheduler/*",
    "feature_extractor/*",
]
UNUSED_FORMATS = ["*.msgpack", "*.h5", "*.onnx", "*.ckpt"]  # flax / tf / onnx / original SD weights


class ModelNotFoundError(FileNotFoundError):
    """Neither a local folder nor a resolvable hub id; the message names the value and what was tried."""


def is_hub_id(name: str | Path) -> bool:
    """True for an "org/name" string that is not an existing local path."""
    text = str(name)
    return not Path(text).exists() and HUB_ID.fullmatch(text) is not None


def resolve_model_folder(name: str | Path) -> Path:
    """An existing local folder as is; a hub id -> its snapshot folder in the hub cache (downloaded if online).

    Raises :class:`ModelNotFoundError` for a missing local path, or a hub id that is neither cached nor
    downloadable (offline, unknown repo, no network).
    """
    path = Path(name).expanduser()
    if path.exists():
        return path
    if not is_hub_id(name):
        raise ModelNotFoundError(f"{name} does not exist (and is not a hub id like org/name)")
    try:
        return Path(snapshot_download(str(name), allow_patterns=WANTED_FILES, ignore_patterns=UNUSED_FORMATS))
    except (OSError, ValueError) as error:  # hub errors: not cached offline, unknown repo, network, bad id
        why = (
            "HF_HUB_OFFLINE is set"
            if constants.HF_HUB_OFFLINE
            else f"download failed: {type(error).__name__}"
        )
        raise ModelNotFoundError(
            f"{name}: no such local folder, and the hub id is not in the hub cache {constants.HF_HUB_CACHE} ({why})"
        ) from error
