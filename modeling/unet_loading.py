"""The one UNet loader: a config + weights (ours or Wonder3D's, legacy names included) -> an MVUNet, strictly.

Every path that loads UNet weights goes through :func:`load_unet_weights`: ``MVUNet.from_pretrained`` (so
``MVDiffusionPipeline.from_pretrained`` and ``launcher/generate.py``), and the run's ``model.unet``
(``engine/build.py``). It maps Wonder3D's config and legacy weight names (``modeling/wonder3d_keys.py``) and
refuses any missing or unexpected key. The one exception: config overrides may switch on cross-domain
layers the weights do not have (stage 2: ``cd_attention_mid=True`` on a stage-1 UNet); those keep their
zero init. diffusers' own ``from_pretrained`` is never used for this: it leaves keys it cannot match
uninitialised, with a warning at most.

The functions take the model class (``MVUNet``) as an argument so that ``modeling.unet_mv`` can route its
``from_pretrained`` here without an import circle.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import ModelMixin
from safetensors.torch import load_file
from torch import Tensor

from modeling.hub import resolve_model_folder
from modeling.wonder3d_keys import (
    MVUNetConfigError,
    newly_enabled_layers,
    normalize_config,
    rename_legacy_key,
    rename_legacy_keys,
)

SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
BIN_NAME = "diffusion_pytorch_model.bin"
SHOWN_KEYS = 6  # keys listed in an error message; the counts give the rest

Model = TypeVar("Model", bound=ModelMixin)


class WeightsError(RuntimeError):
    """A UNet folder or its weights cannot be used; the message names the folder and the keys."""


@dataclass
class LoadReport:
    """What a load did: keys the model had no weight for, weights the model had no key for, and notes."""

    source: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A human-readable multi-line report (also what the loaders print)."""
        lines = [f"loaded UNet weights from {self.source}"]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  missing keys ({len(self.missing)}): {self.missing}")
        lines.append(f"  unexpected keys ({len(self.unexpected)}): {self.unexpected}")
        return "\n".join(lines)


def unet_folder(folder: str | os.PathLike, subfolder: str | None = None) -> Path:
    """The UNet folder itself, or ``folder/unet`` for a whole pipeline folder; a hub id is resolved first.

    ``subfolder`` (diffusers' argument) names the UNet's folder inside ``folder`` explicitly.
    """
    try:
        folder = resolve_model_folder(folder)
    except FileNotFoundError as error:
        raise WeightsError(str(error)) from error
    folder = folder / subfolder if subfolder else folder
    if (folder / "unet" / "config.json").is_file():
        return folder / "unet"
    if not (folder / "config.json").is_file():
        raise WeightsError(f"{folder} has neither config.json nor unet/config.json")
    return folder


def read_config(folder: Path) -> dict[str, Any]:
    """The JSON config of a UNet folder."""
    with open(folder / "config.json") as f:
        return json.load(f)


def read_weights(folder: Path) -> dict[str, Tensor]:
    """Load ``diffusion_pytorch_model.safetensors`` (or ``.bin`` with ``weights_only=True``) from a folder."""
    if (folder / SAFETENSORS_NAME).is_file():
        return load_file(folder / SAFETENSORS_NAME)
    if (folder / BIN_NAME).is_file():
        # weights_only: never unpickle arbitrary objects from a downloaded checkpoint
        try:
            return torch.load(folder / BIN_NAME, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:  # what weights_only raises for a disallowed global
            first_line = str(err).strip().splitlines()[0]
            raise WeightsError(
                f"{folder / BIN_NAME}: refused to load (not plain tensors): {first_line}"
            ) from None
    raise WeightsError(f"no {SAFETENSORS_NAME} or {BIN_NAME} in {folder}")


def _check_override_keys(model_cls: type[ModelMixin], overrides: dict[str, Any], source: str) -> None:
    """Unknown override keys would be dropped by ``from_config`` with a warning: refuse them instead."""
    known = set(inspect.signature(model_cls.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise WeightsError(f"loading {source}: {unknown} are not {model_cls.__name__} config keys")


def load_unet_weights(
    model_cls: type[Model],
    config: dict[str, Any],
    weights: dict[str, Tensor],
    source: str,
    config_overrides: dict[str, Any] | None = None,
) -> tuple[Model, LoadReport]:
    """Build ``model_cls`` from ``config`` (+ overrides) and load ``weights`` into it, refusing any mismatch.

    Args:
        model_cls: the model class (``MVUNet``).
        config: the saved UNet config, ours or Wonder3D's (legacy keys and block names are mapped).
        weights: its state dict; legacy cross-domain names are renamed.
        source: what the weights are (a folder, a run), for messages.
        config_overrides: config keys to change, e.g. ``{"cd_attention_mid": True, "attention_backend": "sdpa"}``.

    Raises:
        WeightsError: an unknown override key, weights that do not fit the config's shapes, or any missing or
            unexpected key other than those of cross-domain layers switched on by ``config_overrides``.
    """
    overrides = dict(config_overrides or {})
    _check_override_keys(model_cls, overrides, source)
    try:
        saved = normalize_config({k: v for k, v in config.items() if not k.startswith("_")})
    except MVUNetConfigError as error:
        raise WeightsError(f"{source}: {error}") from error
    final = {**saved, **overrides}
    model = model_cls.from_config(final)
    report = LoadReport(source=source)
    try:
        renamed = rename_legacy_keys(weights)
    except ValueError as error:
        raise WeightsError(f"{source}: {error}") from error
    legacy = sum(rename_legacy_key(k) != k for k in weights)
    if legacy:
        report.notes.append(f"renamed {legacy} legacy cross-domain keys")
    try:
        result = model.load_state_dict(renamed, strict=False)
    except RuntimeError as error:  # shape mismatches: the config does not describe these weights
        raise WeightsError(f"weights in {source} do not fit its config (+ overrides): {error}") from error
    report.missing, report.unexpected = sorted(result.missing_keys), sorted(result.unexpected_keys)
    new_layers = newly_enabled_layers(saved, final)
    if new_layers:
        report.notes.append(f"new zero-initialised layers (expected missing): {', '.join(new_layers)}")
    bad_missing = [k for k in report.missing if not any(f".{fragment}" in k for fragment in new_layers)]
    if bad_missing or report.unexpected:
        raise WeightsError(
            f"{source} does not fit {model_cls.__name__}: {len(bad_missing)} missing keys "
            f"{bad_missing[:SHOWN_KEYS]}, {len(report.unexpected)} unexpected keys "
            f"{report.unexpected[:SHOWN_KEYS]}"
        )
    return model, report


def load_unet_folder(
    model_cls: type[Model],
    folder: str | os.PathLike,
    config_overrides: dict[str, Any] | None = None,
    subfolder: str | None = None,
) -> tuple[Model, LoadReport]:
    """:func:`load_unet_weights` from a UNet folder, a pipeline folder with ``unet/``, or a hub id."""
    folder = unet_folder(folder, subfolder)
    return load_unet_weights(
        model_cls, read_config(folder), read_weights(folder), str(folder), config_overrides
    )
