"""``train.compile``: the UNet under torch.compile (inductor), before DeepSpeed wraps it."""

import torch

from engine.config import ConfigError, RunConfig

BACKEND = "inductor"  # tests swap in "aot_eager" (same capture, guards and traced backward; no C++ build)

# Measured with torch 2.13.0+cpu: inductor's CPU code for the MVUNet's backward leaves 86 of 240 parameter
# gradients at zero and 44 more wrong (aot_eager on the same graphs: all equal to eager). Training would go
# on, silently wrong, so the CPU is refused until a torch release computes them right.
CPU_REFUSAL = (
    "inductor on the CPU computes wrong UNet gradients with this torch (measured: 130 of 240 parameter "
    "gradients differ from eager); set train.compile=false on the CPU (compile is for CUDA runs)"
)


def compile_unet(unet: torch.nn.Module, cfg: RunConfig, device: torch.device) -> torch.nn.Module:
    """``unet`` itself, compiled in place when ``train.compile`` is on; ConfigError on the CPU (see above).

    ``nn.Module.compile`` (not ``torch.compile(unet)``) keeps the module and its parameter names, so DeepSpeed's
    ZeRO hooks, the EMA, checkpoints, resume and export see the same model as an eager run. Shapes are static:
    a training run has one micro-batch shape (one graph); validation's one-object batches add one more.
    """
    if not cfg.train.compile:
        return unet
    if device.type == "cpu" and BACKEND == "inductor":
        raise ConfigError(CPU_REFUSAL, key="train.compile", source=cfg.source_of("train.compile"))
    unet.compile(backend=BACKEND, dynamic=False)
    return unet
