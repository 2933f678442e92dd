"""Declaring config fields with help text and bounds, in one line each."""

from dataclasses import field
from typing import Any


def opt(default: Any, help: str, *, min: float | None = None, max: float | None = None) -> Any:
    """A dataclass field with a help string (shown by ``--help``) and optional inclusive numeric bounds."""
    meta = {"help": help, "min": min, "max": max}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)
