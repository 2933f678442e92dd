"""Wonder3D's names -> ours: config keys, block type names and legacy cross-domain weight names.

Pure mapping (no models): ``modeling.unet_mv`` applies :func:`normalize_config` to every config it builds
from, and ``modeling.unet_loading`` (the one UNet folder loader) applies :func:`rename_legacy_keys` to every
state dict it loads.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

# Wonder3D block type names -> the diffusers blocks we build (our transformer blocks are swapped in later).
BLOCK_TYPE_MAP = {
    "CrossAttnDownBlockMV2D": "CrossAttnDownBlock2D",
    "UNetMidBlockMV2DCrossAttn": "UNetMidBlock2DCrossAttn",
    "CrossAttnUpBlockMV2D": "CrossAttnUpBlock2D",
}
# Legacy Wonder3D config keys -> current names.
LEGACY_CONFIG_KEYS = {"joint_attention": "cd_attention_last", "joint_attention_twice": "cd_attention_mid"}
# Old checkpoint names -> current ones. The "_twice" names are matched first; all prefixes carry the
# trailing dot so "attn_joint." never matches inside "attn_joint_twice.".
LEGACY_KEY_RENAMES: tuple[tuple[str, str], ...] = (
    ("attn_joint_twice.", "attn_joint_mid."),
    ("norm_joint_twice.", "norm_joint_mid."),
    ("attn_joint.", "attn_joint_last."),
    ("norm_joint.", "norm_joint_last."),
)
# The config flag that switches on each cross-domain layer, and the weight-name fragments of that layer.
CROSS_DOMAIN_LAYERS = {"cd_attention_mid": ("attn_joint_mid.", "norm_joint_mid."),
                       "cd_attention_last": ("attn_joint_last.", "norm_joint_last.")}  # fmt: skip


class MVUNetConfigError(ValueError):
    """A UNet config cannot be mapped onto MVUNet; the message names the key."""


def normalize_config(config: dict[str, Any]) -> dict[str, Any]:
    """Map a Wonder3D / legacy config onto ours: legacy flag names and MV block type names.

    Raises :class:`MVUNetConfigError` if a legacy key and its new name are both present with different values.
    """
    cfg = dict(config)
    for old, new in LEGACY_CONFIG_KEYS.items():
        if old in cfg:
            value = cfg.pop(old)
            if new in cfg and bool(cfg[new]) != bool(value):
                raise MVUNetConfigError(f"config sets legacy {old}={value} and {new}={cfg[new]}; keep one")
            cfg.setdefault(new, value)
    for key in ("down_block_types", "up_block_types"):
        if key in cfg:
            cfg[key] = [BLOCK_TYPE_MAP.get(name, name) for name in cfg[key]]
    if cfg.get("mid_block_type") is not None:
        cfg["mid_block_type"] = BLOCK_TYPE_MAP.get(cfg["mid_block_type"], cfg["mid_block_type"])
    return cfg


def rename_legacy_key(key: str) -> str:
    """The current name of one (possibly legacy) Wonder3D state-dict key."""
    for old, new in LEGACY_KEY_RENAMES:
        if f".{old}" in f".{key}":
            return key.replace(old, new)
    return key


def rename_legacy_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename legacy cross-domain keys; raise ``ValueError`` if two keys collide after renaming."""
    renamed: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = rename_legacy_key(key)
        if new in renamed:
            raise ValueError(f"checkpoint has both {key!r} and another key that maps to {new!r}")
        renamed[new] = value
    return renamed


def newly_enabled_layers(saved: dict[str, Any], final: dict[str, Any]) -> tuple[str, ...]:
    """Weight-name fragments of cross-domain layers that ``final`` switches on and ``saved`` lacks.

    Both configs already normalised. Stage 2 adds ``cd_attention_mid`` to a stage-1 UNet: only these keys
    may be missing from its weights.
    """
    out: tuple[str, ...] = ()
    for flag, fragments in CROSS_DOMAIN_LAYERS.items():
        if final.get(flag) and not saved.get(flag):
            out += fragments
    return out
