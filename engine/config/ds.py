"""The DeepSpeed JSON: read it, catch typos early, fill the fields marked "auto" from the run config.

The JSON is the user's source of truth for DeepSpeed settings. We only fill "auto" fields and refuse
explicit values that contradict the run config (e.g. a micro-batch that differs), naming both places.
"""

import copy
import difflib
import json
from pathlib import Path
from typing import Any

from engine.config.checks import derive_grad_accum
from engine.config.errors import ConfigError
from engine.config.schema import RunConfig

AUTO = "auto"
# Top-level sections DeepSpeed reads that are not plain constants in deepspeed.runtime.constants.
_EXTRA_TOP_LEVEL = {
    "zero_optimization", "activation_checkpointing", "flops_profiler", "tensorboard", "wandb", "csv_monitor",
    "comet", "comms_logger", "aio", "autotuning", "compression_training", "data_efficiency", "elasticity",
    "sparse_attention", "pipeline", "curriculum_learning", "amp", "zero_allow_untested_optimizer",
    "nebula", "checkpoint", "monitor_config", "weight_quantization", "hybrid_engine", "compile",
    "timers", "sequence_parallel_size", "dataloader_drop_last", "train_batch_size", "seed",
}  # fmt: skip


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """Parse and structurally validate a DeepSpeed JSON; ConfigError names the file and key on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("DeepSpeed config not found", source=str(path))
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"invalid JSON: {err}", source=str(path)) from None
    if not isinstance(ds, dict):
        raise ConfigError("top level must be a JSON object", source=str(path))
    known = _known_top_level_keys()
    for key in ds:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown DeepSpeed key{hint}", key=key, source=str(path))
    _validate_zero_section(ds.get("zero_optimization", {}), str(path))
    return ds


def resolve_ds_config(
    ds: dict[str, Any], cfg: RunConfig, *, world_size: int, source: str, cuda: bool
) -> dict[str, Any]:
    """A copy of ``ds`` with every "auto" filled from ``cfg`` and the batch arithmetic checked.

    micro-batch × grad-accum × world size must equal train_batch_size; the error says which number to change.
    With ``train.global_batch_size`` set, ``cfg.train.grad_accum`` is first derived for this world size.
    """
    derive_grad_accum(cfg, world_size=world_size)
    out = copy.deepcopy(ds)
    t = cfg.train
    _fill(out, "train_micro_batch_size_per_gpu", t.micro_batch_size, cfg, "train.micro_batch_size", source)
    _fill(out, "gradient_accumulation_steps", t.grad_accum, cfg, "train.grad_accum", source)
    _fill(out, "gradient_clipping", t.grad_clip, cfg, "train.grad_clip", source)
    expected = t.micro_batch_size * t.grad_accum * world_size
    if out.get("train_batch_size", AUTO) == AUTO:
        out["train_batch_size"] = expected
    elif out["train_batch_size"] != expected:
        raise ConfigError(
            f"train_batch_size={out['train_batch_size']} but train.micro_batch_size ({t.micro_batch_size}) × "
            f"train.grad_accum ({t.grad_accum}) × world size ({world_size}) = {expected}; set "
            f'"train_batch_size": "auto" or change train.grad_accum / train.micro_batch_size',
            key="train_batch_size",
            source=source,
        )
    _resolve_precision(out, cfg, source=source, cuda=cuda)
    _resolve_optimizer(out, cfg)
    _reject_leftover_auto(out, source=source)
    return out


def check_trainable_stage(ds: dict[str, Any], *, source: str) -> None:
    """The training loop keeps EMA, validates and checks replicas on full weights: ZeRO stages 0-2 only."""
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        raise ConfigError(
            "ZeRO-3 partitions the weights, but gnn3d's EMA, validation and replica check need them whole; "
            "use ds_configs/zero2.json or zero2_offload.json (ZeRO-3 training is not supported yet)",
            key="zero_optimization.stage",
            source=source,
        )


def save_ds_config(ds: dict[str, Any], path: str | Path) -> None:
    """Write the resolved JSON into the run directory."""
    Path(path).write_text(json.dumps(ds, indent=2) + "\n")


def _known_top_level_keys() -> set[str]:
    import deepspeed.runtime.constants as constants

    names = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str) and "\n" not in v}
    return names | _EXTRA_TOP_LEVEL


def _validate_zero_section(zero: Any, source: str) -> None:
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    if not isinstance(zero, dict):
        raise ConfigError("must be an object", key="zero_optimization", source=source)
    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ConfigError(first["msg"], key=f"zero_optimization.{field}", source=source) from None


def _fill(ds: dict, ds_key: str, value: Any, cfg: RunConfig, cfg_key: str, source: str) -> None:
    current = ds.get(ds_key, AUTO)
    if current == AUTO:
        ds[ds_key] = value
    elif current != value:
        raise ConfigError(
            f"{current} contradicts {cfg_key}={value} (set by {cfg.source_of(cfg_key)}); "
            f'use "auto" here so the run config decides, or make them equal',
            key=ds_key,
            source=source,
        )


def _resolve_precision(ds: dict, cfg: RunConfig, *, source: str, cuda: bool) -> None:
    precision = cfg.train.precision
    for name in ("bf16", "fp16"):
        section = ds.setdefault(name, {"enabled": AUTO})
        enabled = section.get("enabled", False)
        wanted = precision == name
        if enabled == AUTO:
            section["enabled"] = wanted
        elif enabled != wanted:
            raise ConfigError(
                f'enabled={enabled} contradicts train.precision={precision!r}; use "auto" or make them agree',
                key=f"{name}.enabled",
                source=source,
            )
    if ds["fp16"]["enabled"] and not cuda:
        raise ConfigError("fp16 needs CUDA; use train.precision=bf16 or fp32 on CPU", key="train.precision")


def _resolve_optimizer(ds: dict, cfg: RunConfig) -> None:
    """Fill "auto" in a JSON-declared optimizer/scheduler from the run config's train section."""
    params = ds.get("optimizer", {}).get("params", {})
    filled = {"lr": cfg.train.lr, "betas": cfg.train.adam_betas, "eps": cfg.train.adam_eps}
    filled["weight_decay"] = cfg.train.weight_decay
    for key, value in filled.items():
        if params.get(key) == AUTO:
            params[key] = value


def _reject_leftover_auto(ds: Any, *, source: str, prefix: str = "") -> None:
    items = ds.items() if isinstance(ds, dict) else enumerate(ds) if isinstance(ds, list) else []
    for key, value in items:
        dotted = f"{prefix}{key}"
        if value == AUTO:
            raise ConfigError(
                '"auto" is not supported for this field; give a value', key=dotted, source=source
            )
        _reject_leftover_auto(value, source=source, prefix=f"{dotted}.")
