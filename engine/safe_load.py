"""Read checkpoint pickles without running code: ``torch.load(weights_only=True)`` and an explicit allow-list.

A ``.pt`` file is a pickle, and unpickling it with ``weights_only=False`` (DeepSpeed's default) lets any object
in it run code. Every ``.pt`` file gnn3d reads (DeepSpeed's model states and ZeRO partitions, legacy per-rank
files) goes through ``load_allowed``: tensors, plain containers and the DeepSpeed types listed in
``_deepspeed_types``, nothing else. DeepSpeed's own loaders (``engine.load_checkpoint``, ``zero_to_fp32``)
call ``torch.load`` with ``weights_only=False``, so they run inside ``only_allowed_types()``.
"""

from __future__ import annotations

import contextlib
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

from engine.config import ConfigError

_torch_load = torch.load  # the real one: only_allowed_types() replaces torch.load for DeepSpeed's callers


class UntrustedCheckpointError(ConfigError):
    """A checkpoint file holds a type that no gnn3d or DeepSpeed checkpoint stores; nothing was unpickled."""

    def __init__(self, path: str | Path, names: str):
        super().__init__(
            f"refused to load: it holds {names}, which no gnn3d or DeepSpeed checkpoint stores (unpickling it "
            "could run code). Use checkpoints written by gnn3d only",
            source=str(path),
        )


def _deepspeed_types() -> list[type]:
    """The classes DeepSpeed 0.19's ZeRO-1/2 checkpoints pickle (found by scanning fp32, bf16 and offload
    checkpoints); tensors, dtypes, OrderedDict and torch.Size are allowed by torch itself."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # slow import
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def check_allowed(path: str | Path, *, deepspeed: bool = True) -> None:
    """Refuse a file whose pickle names a disallowed global, reading only its small pickle record.

    Every rank runs it on every file of a checkpoint before DeepSpeed loads any, so all ranks refuse together
    (a rank that refused alone would leave the others waiting in a collective). ``deepspeed=False``: torch's
    own allow-list only (model folders hold plain state dicts).
    """
    with safe_globals(_deepspeed_types() if deepspeed else []):
        try:
            unsafe = get_unsafe_globals_in_checkpoint(str(path))
        except (
            ValueError,
            RuntimeError,
            OSError,
        ):  # legacy format or damaged: the load refuses or reports it
            return
    if unsafe:
        raise UntrustedCheckpointError(path, ", ".join(sorted(unsafe)))


def load_allowed(path: str | Path, map_location: Any = None, **options: Any) -> Any:
    """``torch.load`` with ``weights_only=True`` and the DeepSpeed allow-list; refusal names file and type."""
    options.pop("weights_only", None)  # DeepSpeed asks for False: never honoured
    options.pop("pickle_module", None)
    with safe_globals(_deepspeed_types()):
        try:
            return _torch_load(path, map_location=map_location, weights_only=True, **options)
        except pickle.UnpicklingError as error:
            found = re.search(r"GLOBAL (\S+) was not", str(error))
            raise UntrustedCheckpointError(path, found.group(1) if found else "a disallowed object") from None


@contextlib.contextmanager
def only_allowed_types() -> Iterator[None]:
    """Within: every ``torch.load`` (DeepSpeed's checkpoint engine, zero_to_fp32) is ``load_allowed``."""
    original = torch.load

    def guarded(f: Any, map_location: Any = None, *args: Any, **options: Any) -> Any:
        if args:  # torch.load(f, map_location, pickle_module, ...) positionally: only the file matters
            raise TypeError("torch.load called with positional options inside only_allowed_types()")
        return load_allowed(f, map_location, **options)

    torch.load = guarded
    try:
        yield
    finally:
        torch.load = original


def check_checkpoint_dir(tag_dir: str | Path) -> None:
    """``check_allowed`` on every ``.pt`` file of one checkpoint tag (DeepSpeed's and legacy rank files)."""
    for path in sorted(Path(tag_dir).glob("*.pt")):
        check_allowed(path)


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def check_model_folder(folder: str | Path) -> None:
    """``check_allowed`` (torch's allow-list) on every pickled weight file of a diffusers-layout folder.

    The loaders (modeling.unet_loading, diffusers, transformers) already load them with ``weights_only=True``;
    this turns their refusal into one line naming the file, before anything is read.
    """
    for pattern in PICKLED_WEIGHTS:
        for path in sorted(Path(folder).rglob(pattern)):
            check_allowed(path, deepspeed=False)
