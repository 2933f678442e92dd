"""Typed run configuration: YAML + dotted overrides -> RunConfig, plus the DeepSpeed JSON resolver."""

from engine.config.ds import check_trainable_stage, load_ds_config, resolve_ds_config, save_ds_config
from engine.config.errors import ConfigError
from engine.config.loader import config_to_dict, describe_options, load_config, save_config
from engine.config.schema import RunConfig

__all__ = [
    "ConfigError",
    "RunConfig",
    "check_trainable_stage",
    "config_to_dict",
    "describe_options",
    "load_config",
    "load_ds_config",
    "resolve_ds_config",
    "save_config",
    "save_ds_config",
]
