"""Load a RunConfig from YAML plus dotted overrides, type-checking every value on the way in.

Nothing here imports torch: a bad config fails in well under a second, before any model or process exists.
"""

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from engine.config.checks import check_consistency
from engine.config.errors import ConfigError
from engine.config.schema import RunConfig

CLI = "command line"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults <- YAML file at ``path`` (optional) <- ``overrides`` ("section.key=value"), validated.

    Raises ConfigError naming the file and dotted key of the first problem found.
    """
    cfg = RunConfig()
    if path is not None:
        for section, values in _read_yaml(Path(path)).items():
            _apply_section(cfg, section, values, source=str(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r} must look like section.key=value", source=CLI)
        section, _, name = key.partition(".")
        _apply_section(cfg, section, {name: _Raw(raw)}, source=CLI)
    check_consistency(cfg)
    return cfg


def config_to_dict(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Plain nested dict of the config (without bookkeeping), ready for YAML/JSON."""
    return {f.name: dataclasses.asdict(getattr(cfg, f.name)) for f in _section_fields()}


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with ``load_config``)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def describe_options() -> str:
    """Every option as ``section.key = default  (type)  help`` — the body of ``--help``."""
    lines = []
    for section_field in _section_fields():
        lines.append(f"\n{section_field.name}:")
        for f in dataclasses.fields(section_field.type):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kind = _type_name(_hints(section_field.type)[f.name])
            lines.append(f"  {section_field.name}.{f.name} = {default!r}  ({kind})")
            lines.append(f"      {f.metadata.get('help', '')}")
    return "\n".join(lines)


class _Raw(str):
    """A value typed on the command line: still text, converted by the field's type."""


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError("config file not found", source=str(path))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid YAML: {err}", source=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"top level must be a mapping of sections, got {type(data).__name__}", source=str(path)
        )
    return data


def _section_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(RunConfig) if f.name != "sources"]


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply_section(cfg: RunConfig, section: str, values: Any, *, source: str) -> None:
    sections = {f.name: f for f in _section_fields()}
    if section not in sections:
        raise ConfigError(f"unknown section{_suggest(section, sections)}", key=str(section), source=source)
    if not isinstance(values, dict):
        raise ConfigError("a section must be a mapping of key: value", key=section, source=source)
    target = getattr(cfg, section)
    hints = _hints(type(target))
    known = {f.name: f for f in dataclasses.fields(target)}
    for name, value in values.items():
        key = f"{section}.{name}"
        if name not in known:
            raise ConfigError(f"unknown key{_suggest(name, known)}", key=key, source=source)
        converted = _convert(value, hints[name], key=key, source=source)
        _check_bounds(converted, known[name].metadata, key=key, source=source)
        setattr(target, name, converted)
        cfg.sources[key] = source


def _suggest(name: Any, known: Any) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"


def _convert(value: Any, kind: Any, *, key: str, source: str) -> Any:
    def fail(expected: str) -> ConfigError:
        return ConfigError(f"expected {expected}, got {value!r}", key=key, source=source)

    origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise fail("one of " + ", ".join(map(repr, choices)))
        return str(value)
    if origin is list:
        (item_kind,) = typing.get_args(kind)
        if isinstance(value, _Raw):
            value = [_Raw(v) if isinstance(v, str) else v for v in _split_list(value)]
        if not isinstance(value, list):
            raise fail(f"a list of {_type_name(item_kind)}")
        return [_convert(v, item_kind, key=key, source=source) for v in value]
    if kind is str:
        if not isinstance(value, str):
            raise fail("a string")
        return str(value)
    if kind is bool:
        if isinstance(value, _Raw) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if kind in (int, float):
        return _convert_number(value, kind, fail)
    raise ConfigError(f"unsupported field type {kind}", key=key, source=source)


def _split_list(text: str) -> list:
    """CLI list: "a,b" or "[a, b]"; YAML-parsed when possible, else split plainly (``[*joint_mid*]``)."""
    text = text.strip()
    if text.startswith("["):
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError:
            parsed = None
        if isinstance(parsed, list):
            return parsed
        text = text[1:-1] if text.endswith("]") else text[1:]
    return [part.strip() for part in text.split(",") if part.strip()]


def _convert_number(value: Any, kind: type, fail: Any) -> Any:
    if isinstance(value, bool):
        raise fail(_type_name(kind))
    if isinstance(value, str):  # CLI text, or YAML's "1e-4" (PyYAML reads exponents without a dot as text)
        try:
            value = float(value) if kind is float or any(c in value for c in ".eE") else int(value)
        except ValueError:
            raise fail(_type_name(kind)) from None
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise fail("an integer")
        if not isinstance(value, int | float):
            raise fail("an integer")
        return int(value)
    if not isinstance(value, int | float):
        raise fail("a number")
    return float(value)


def _check_bounds(value: Any, meta: Any, *, key: str, source: str) -> None:
    lo, hi = meta.get("min"), meta.get("max")
    for v in value if isinstance(value, list) else [value]:
        if not isinstance(v, int | float) or isinstance(v, bool):
            continue
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise ConfigError(f"value {v} out of range {bounds}", key=key, source=source)


def _type_name(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin is Literal:
        return "|".join(map(str, typing.get_args(kind)))
    if origin is list:
        return f"list[{_type_name(typing.get_args(kind)[0])}]"
    return getattr(kind, "__name__", str(kind))
