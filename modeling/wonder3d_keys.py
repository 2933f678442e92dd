"""Load a UNet folder — ours (``save_pretrained``) or Wonder3D's (legacy names included) — into MVUNet.

Wonder3D's config keys and block type names are mapped by ``modeling.unet_mv.normalize_config``; its
weights use the same module names as ours except the legacy cross-domain names renamed here.

Config overrides may switch on layers the checkpoint does not have (stage 2: ``cd_attention_mid=True`` on a
stage-1 UNet). Their keys are reported as missing and keep their zero init; any *other* missing or
unexpected key is an error in strict mode. (diffusers' ``from_pretrained`` is not used for this: it builds
the model with weight init disabled, so such new layers would hold uninitialised memory.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from modeling.convert_2d import LoadReport, WeightsError, read_config, read_weights, unet_folder
from modeling.unet_mv import MVUNet, normalize_config

# Old checkpoint names -> current ones. The "_twice" names are matched first; all prefixes carry the
# trailing dot so "attn_joint." never matches inside "attn_joint_twice.".
LEGACY_KEY_RENAMES: tuple[tuple[str, str], ...] = (
    ("attn_joint_twice.", "attn_joint_mid."),
    ("norm_joint_twice.", "norm_joint_mid."),
    ("attn_joint.", "attn_joint_last."),
    ("norm_joint.", "norm_joint_last."),
)
_NEW_LAYER_PREFIXES = {"cd_attention_mid": ("attn_joint_mid.", "norm_joint_mid."),
                       "cd_attention_last": ("attn_joint_last.", "norm_joint_last.")}  # fmt: skip


def rename_legacy_key(key: str) -> str:
    """The current name of one (possibly legacy) Wonder3D state-dict key."""
    for old, new in LEGACY_KEY_RENAMES:
        if f".{old}" in f".{key}":
            return key.replace(old, new)
    return key


def rename_legacy_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename legacy cross-domain keys; raise :class:`WeightsError` if two keys collide after renaming."""
    renamed: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = rename_legacy_key(key)
        if new in renamed:
            raise WeightsError(f"checkpoint has both {key!r} and another key that maps to {new!r}")
        renamed[new] = value
    return renamed


def _newly_enabled_prefixes(saved: dict[str, Any], final: dict[str, Any]) -> tuple[str, ...]:
    """Key fragments of cross-domain layers switched on by the overrides but absent from the checkpoint."""
    out: tuple[str, ...] = ()
    for flag, prefixes in _NEW_LAYER_PREFIXES.items():
        if final.get(flag) and not saved.get(flag):
            out += prefixes
    return out


def load_unet(
    folder: str | Path,
    config_overrides: dict[str, Any] | None = None,
    strict: bool = True,
    verbose: bool = True,
) -> tuple[MVUNet, LoadReport]:
    """Build an MVUNet from a UNet folder of ours or Wonder3D's (or a pipeline folder with ``unet/``).

    Args:
        folder: folder with ``config.json`` and ``diffusion_pytorch_model.{safetensors,bin}``.
        config_overrides: config keys to change, e.g. ``{"cd_attention_mid": True, "attention_backend": "sdpa"}``.
        strict: raise :class:`WeightsError` on unexpected keys, or missing keys other than those of
            cross-domain layers newly enabled by ``config_overrides``.
        verbose: print the load report.

    Returns:
        ``(unet, report)``.
    """
    folder = unet_folder(folder)
    saved = normalize_config(read_config(folder))
    final = {**saved, **(config_overrides or {})}
    model = MVUNet.from_config(final)
    raw = read_weights(folder)
    weights = rename_legacy_keys(raw)
    report = LoadReport(source=str(folder))
    legacy = sum(rename_legacy_key(k) != k for k in raw)
    if legacy:
        report.notes.append(f"renamed {legacy} legacy cross-domain keys")
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # shape mismatches: the config does not describe these weights
        raise WeightsError(f"weights in {folder} do not fit its config (+ overrides): {err}") from err
    report.missing, report.unexpected = sorted(result.missing_keys), sorted(result.unexpected_keys)
    new_prefixes = _newly_enabled_prefixes(saved, final)
    if new_prefixes:
        report.notes.append(f"new zero-initialised layers (expected missing): {', '.join(new_prefixes)}")
    if verbose:
        print(report.summary())
    bad_missing = [k for k in report.missing if not any(f".{p}" in k for p in new_prefixes)]
    if strict and (bad_missing or report.unexpected):
        raise WeightsError(
            f"{report.summary()}\n  not allowed: missing {bad_missing}, unexpected {report.unexpected}"
        )
    return model, report


def load_wonder3d_unet(
    folder: str | Path, attention_backend: str = "auto", strict: bool = True, verbose: bool = True
) -> tuple[MVUNet, LoadReport]:
    """A Wonder3D UNet folder (its config.json + weights, legacy names allowed) -> ``(MVUNet, report)``."""
    return load_unet(folder, {"attention_backend": attention_backend}, strict=strict, verbose=verbose)
