"""Throughput numbers for the progress bar and logs: samples/s, data-stall %, MFU.

Data stall = the time a step lost to its data: the time the loop blocked in ``next(loader)`` (queue wait and
whatever the main process does there: unpickling, collation, pinning) plus, where Linux reports it, the time
the data workers took the CPU from the step. The second part is what the queue wait alone missed when
cores are short (the demo showed 2.5 % while its step ran 1.14× slower than from memory): while this
process's threads waited for a CPU, the workers' share of the CPU the job (this process + its workers) got
is the share of the wall time the step lost to them, at most the time it waited.
"""

import os
from pathlib import Path

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


def _task_ns(task: Path, field: int) -> int:
    """A field of ``/proc/.../task/<tid>/schedstat``: 0 = ns on the CPU, 1 = ns runnable but waiting for one."""
    try:
        return int((task / "schedstat").read_text().split()[field])
    except (OSError, ValueError, IndexError):
        return 0  # the thread or process ended between listing and reading


class CpuContention:
    """Cumulative seconds this process's threads waited for a CPU and ran on one, and its children's (the
    data workers') CPU time.

    Linux only (``/proc/<pid>/task/*/schedstat``, kernel schedstats); elsewhere all stay 0 and the stall is
    the queue wait alone. Read once per ``Throughput.metrics`` call: a few small files.
    """

    def __init__(self, pid: int | None = None) -> None:
        self.tasks = Path(f"/proc/{pid or os.getpid()}/task")
        self.available = (self.tasks / str(pid or os.getpid()) / "schedstat").is_file()

    def _children(self) -> set[str]:
        pids: set[str] = set()
        for task in self.tasks.iterdir():
            try:
                pids.update((task / "children").read_text().split())
            except OSError:
                continue
        return pids

    def sample(self) -> tuple[float, float, float]:
        """(run-queue wait, CPU time) of this process's threads and the CPU time of its child processes,
        seconds since they started."""
        if not self.available:
            return 0.0, 0.0, 0.0
        tasks = list(self.tasks.iterdir())
        waited = sum(_task_ns(task, 1) for task in tasks)
        own_cpu = sum(_task_ns(task, 0) for task in tasks)
        worker_cpu = sum(
            _task_ns(task, 0) for pid in self._children() for task in Path(f"/proc/{pid}/task").glob("*")
        )
        return waited / 1e9, own_cpu / 1e9, worker_cpu / 1e9


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
        self.contention = CpuContention()
        self._last = self.contention.sample()

    def data_stall_s(self, data_wait_s: float, wall_s: float) -> float:
        """Seconds of the last ``wall_s`` lost to data: ``data_wait_s`` (blocked in next(loader)) plus the
        workers' share of the job's CPU time over ``wall_s``, at most the time this process waited for a CPU."""
        now = self.contention.sample()
        # A thread or worker that ended takes its counts with it: a delta may dip below 0, never count that.
        waited, own_cpu, worker_cpu = (max(0.0, b - a) for a, b in zip(self._last, now))
        self._last = now
        taken = wall_s * worker_cpu / (own_cpu + worker_cpu) if worker_cpu > 0 else 0.0
        return data_wait_s + min(waited, taken)

    def metrics(self, values: dict[str, float], step_seconds: float, *, lr: float) -> dict[str, float]:
        """Logged metrics of ``values`` (the step's, with ``data_wait_s``) over ``step_seconds`` of wall time."""
        out = {k: v for k, v in values.items() if k != "data_wait_s"}
        out["lr"] = lr
        out["samples_per_s"] = self.objects_per_step / step_seconds
        stall_s = self.data_stall_s(values.get("data_wait_s", 0.0), step_seconds)
        out["data_stall_pct"] = 100.0 * min(1.0, stall_s / step_seconds)
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
