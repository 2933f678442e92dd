"""Non-finite steps: skip them, count them, stop a run that keeps diverging, never save non-finite weights.

A bad step is skipped through DeepSpeed's own overflow path, the one its fp16 loss scaler uses: when the loss
of any rank is non-finite, every rank back-propagates a NaN-poisoned loss, so DeepSpeed's gradient check
before the optimizer step discards the accumulated gradient on every rank (ZeRO partitions, offload buffers
included), leaves Adam's moments and the LR schedule untouched and reports ``engine.was_step_applied()``
False. A finite loss with a non-finite gradient takes the same path. gnn3d's step counter and EMA follow
that flag in every precision, so they stay in step with DeepSpeed's applied updates and its LR scheduler,
fp16 loss-scale skips included. (Discarding the gradient ourselves would reach into ZeRO-2's internals.)
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from engine.config import ConfigError

EXIT_DIVERGED = 3  # process exit code of a run stopped by DivergedError


class DivergedError(RuntimeError):
    """The run stopped: too many bad steps in a row, or non-finite weights where a checkpoint was due."""


class NonFiniteWeightsError(DivergedError):
    """A checkpoint was due, but the weights (or the EMA) hold NaN or infinity: nothing was written."""


@dataclass
class SkippedSteps:
    """Steps whose update DeepSpeed discarded: in total (logged, kept in checkpoints) and bad ones in a row."""

    limit: int = 0  # train.max_bad_steps; 0 = never stop
    total: int = 0
    in_a_row: int = 0
    last_bad: bool = False

    def applied(self) -> None:
        self.in_a_row = 0

    def skipped(self, *, bad: bool) -> None:
        """Count a skip; ``bad`` ones (a non-finite loss, or gradient outside fp16, where a gradient overflow
        is the loss scaler probing) count towards the limit."""
        self.total += 1
        self.last_bad = bad
        if bad:
            self.in_a_row += 1

    @property
    def must_stop(self) -> bool:
        return self.limit > 0 and self.in_a_row >= self.limit

    def postfix(self) -> dict[str, str]:
        """Progress-bar entry, shown once a step was skipped."""
        return {"skipped": str(self.total)} if self.total else {}


def finite_on_every_rank(values: Tensor) -> bool:
    """Collective: True when ``values`` are finite on every rank, so every rank takes the same branch."""
    bad = (~torch.isfinite(values.detach())).any().to(torch.float32).reshape(1)
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0


def poison(loss: Tensor) -> Tensor:
    """``loss`` whose gradient is NaN everywhere it reaches, so DeepSpeed's overflow check discards the step
    even where a non-finite loss would have had finite gradients (an infinite loss, or another rank's NaN)."""
    return loss * float("nan")


def check_skips_nonfinite_gradients(engine: Any, *, source: str) -> None:
    """Refuse a DeepSpeed setup whose optimizer would apply a non-finite gradient instead of skipping it."""
    optimizer = engine.optimizer
    if not hasattr(optimizer, "overflow"):  # a plain torch optimizer: ZeRO stage 0 in fp32
        raise ConfigError(
            "stage 0 in fp32 applies non-finite gradients (no overflow check); use stage 1 or 2",
            key="zero_optimization.stage",
            source=source,
        )
    checks = getattr(optimizer, "check_grad_overflow", True)
    by_norm = (
        getattr(optimizer, "compute_grad_norm", True) and getattr(optimizer, "dtype", None) != torch.bfloat16
    )
    if not (checks or by_norm):  # ZeRO-1/2 with the check switched off
        key = (
            "bf16.check_grad_overflow" if engine.bfloat16_enabled() else "zero_optimization.compute_grad_norm"
        )
        raise ConfigError(
            "gnn3d skips non-finite steps through DeepSpeed's overflow check; set it to true (the default)",
            key=key,
            source=source,
        )


def weights_finite(engine: Any, ema: Any) -> bool:
    """Collective: the module weights of every rank (under ZeRO-1/2 a full copy each, made from the fp32
    master) and every rank's slice of the EMA hold no NaN or infinity."""
    tensors = [p.detach() for p in engine.module.parameters()] + list(ema.shadow.values())
    device = tensors[0].device if tensors else torch.device("cpu")
    bad = torch.zeros(1, dtype=torch.float32, device=device)
    for tensor in tensors:
        bad += (~torch.isfinite(tensor)).any().to(device=device, dtype=torch.float32)
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0


def last_good_checkpoint(checkpoint: Path | None) -> str:
    """The end of the stop message: where to resume from (checkpoints hold finite weights only)."""
    if checkpoint is None:
        return "no checkpoint was saved before; start again with a lower train.lr"
    step = int(checkpoint.name.removeprefix("step"))
    return f"last good checkpoint: {checkpoint} (step {step})"
