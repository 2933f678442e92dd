"""One rank's own resume state, ``gnn3d_rank00000.safetensors``: no pickle, so nothing in it can run code.

Tensors: the torch and numpy RNG states. Metadata (JSON): the data position (``ResumableLoader.state_dict``,
JSON-able by design) and the rest of the Python and numpy RNG states. Checkpoints written before this format
hold ``gnn3d_rank00000.pt`` (a pickle of plain types), read only through ``engine.safe_load``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.config import ConfigError
from engine.safe_load import load_allowed

RANK_FILE_GLOB = "gnn3d_rank*"
_META_KEY = "gnn3d"


def rank_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"gnn3d_rank{rank:05d}.safetensors"


def legacy_rank_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"gnn3d_rank{rank:05d}.pt"


def saved_rank_count(tag_dir: Path) -> int:
    """How many ranks wrote this checkpoint (one rank file each, current or legacy format)."""
    return len(list(tag_dir.glob(RANK_FILE_GLOB)))


def save_rank_state(data_state: dict[str, Any] | None, path: Path) -> None:
    """Write this rank's data position and RNG states (Python, numpy, torch) to ``path``."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {
        "rng.torch": torch.get_rng_state(),
        "rng.numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "rng.python": torch.tensor(internal, dtype=torch.int64),
    }
    meta = {
        "data_state": data_state,
        "python": [version, gauss],
        "numpy": [name, int(pos), int(has_gauss), float(cached)],
    }
    save_file(tensors, str(path), metadata={_META_KEY: json.dumps(meta)})


def saved_data_states(tag_dir: Path) -> list[dict[str, Any] | None]:
    """Every saved rank's data position, in rank order (the world size that wrote the checkpoint)."""
    states = []
    for rank in range(saved_rank_count(tag_dir)):
        if not rank_file(tag_dir, rank).is_file() and legacy_rank_file(tag_dir, rank).is_file():
            states.append(load_allowed(legacy_rank_file(tag_dir, rank))["data_state"])
        else:
            states.append(_read(rank_file(tag_dir, rank))[0]["data_state"])
    return states


def load_rank_state(tag_dir: Path, rank: int) -> dict[str, Any] | None:
    """Restore this rank's RNG states from its file and return its saved data position.

    A rank the checkpoint did not have (a resume on more processes) keeps the run's seeded RNG: the training
    step draws its randomness from per-object generators (``engine.randomness``), not from these states.
    """
    path = rank_file(tag_dir, rank)
    if not path.is_file() and legacy_rank_file(tag_dir, rank).is_file():
        return _load_legacy(legacy_rank_file(tag_dir, rank))
    if not path.is_file() and rank >= saved_rank_count(tag_dir) > 0:
        return None
    meta, tensors = _read(path)
    version, gauss = meta["python"]
    random.setstate((version, tuple(tensors["rng.python"].tolist()), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    return meta["data_state"]


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()[_META_KEY])
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (OSError, KeyError, TypeError, ValueError) as error:  # missing, truncated, not ours
        raise ConfigError(f"cannot read this rank's state ({error})", source=str(path)) from None
    return meta, tensors


def _load_legacy(path: Path) -> dict[str, Any] | None:
    """A ``.pt`` rank file of an older gnn3d: plain types, loaded with the allow-list (never weights_only=False)."""
    state = load_allowed(path)
    version, internal, gauss = state["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["rng"]["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["rng"]["torch"])
    return state["data_state"]
