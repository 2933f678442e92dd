"""Throughput numbers for the progress bar and logs: samples/s, data-stall %, MFU."""

import torch

from engine.config import RunConfig
from engine.distributed import DistInfo

# Dense bf16 peak TFLOP/s of common GPUs (per device), for MFU when logging.peak_tflops is 0.
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0}


def peak_flops(cfg: RunConfig, info: DistInfo) -> float | None:
    """Peak FLOP/s of one device, or None when unknown (CPU, unlisted GPU and no config value)."""
    if cfg.logging.peak_tflops:
        return cfg.logging.peak_tflops * 1e12
    if info.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(info.device)
    return next((tf * 1e12 for key, tf in KNOWN_PEAK_TFLOPS.items() if key in name), None)


class Throughput:
    """Turns per-step timings into rates. One step = grad_accum micro-batches on every rank."""

    def __init__(self, cfg: RunConfig, info: DistInfo, unet_config: dict | None = None):
        t = cfg.train
        self.objects_per_step = t.micro_batch_size * t.grad_accum * info.world_size
        images_per_object = (2 if cfg.data.mode == "joint" else 1) * cfg.model.num_views
        self.flops_per_step = None
        peak = peak_flops(cfg, info)
        if unet_config is not None and peak is not None:
            from modeling.flops import unet_train_flops

            images = self.objects_per_step * images_per_object
            self.flops_per_step = unet_train_flops(unet_config, images, cfg.data.resolution // 8)
            self.peak_total = peak * info.world_size

    def metrics(self, values: dict[str, float], step_seconds: float, *, lr: float) -> dict[str, float]:
        out = {k: v for k, v in values.items() if k != "data_wait_s"}
        out["lr"] = lr
        out["samples_per_s"] = self.objects_per_step / step_seconds
        out["data_stall_pct"] = 100.0 * min(1.0, values.get("data_wait_s", 0.0) / step_seconds)
        if self.flops_per_step is not None:
            out["mfu_pct"] = 100.0 * self.flops_per_step / step_seconds / self.peak_total
        return out

    @staticmethod
    def postfix(m: dict[str, float]) -> dict[str, str]:
        shown = {"loss": f"{m['loss']:.4f}", "lr": f"{m['lr']:.2e}", "obj/s": f"{m['samples_per_s']:.2f}"}
        shown["stall"] = f"{m['data_stall_pct']:.0f}%"
        if "mfu_pct" in m:
            shown["mfu"] = f"{m['mfu_pct']:.1f}%"
        if m.get("data/bad_samples"):  # lost data in sight while it happens (engine.data_loss)
            shown["bad"] = f"{m['data/bad_samples']:.0f} ({m['data/bad_shards']:.0f} shards)"
        return shown
