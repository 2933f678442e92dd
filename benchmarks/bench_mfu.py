"""CPU MFU of the bf16 UNet step on the "small" config, against a bf16 matmul peak measured in the same run.

The UNet of ``configs/small_cpu.yaml`` (widths 128/256, 32² latents, 6 views × 2 domains, cross-domain
attention) in bf16, as DeepSpeed's bf16 mode holds it; one micro-batch (2·V images) forward + backward on
fixed inputs. FLOPs are the analytic ones of ``modeling.flops`` (checked against FlopCounterMode there);
the peak is the best of three 2048² bf16 matmuls at the same thread count.
MFU = FLOPs / step seconds / peak, each step against a peak measured just before it (the machine is shared:
both see the same load); the median over rounds is reported (goal ≥ 30 %). Side by side, in rotation:
- ``default``: the step as a run does it (NCHW, SDPA's bf16 CPU flash attention);
- ``channels_last``: the same weights and input in channels_last memory format;
- ``fp32_attention`` (full run only): SDPA's inputs upcast to its fp32 CPU kernel (a lever tried).
The full run also profiles one default step (torch.profiler, top operators).

    python benchmarks/bench_mfu.py            # 3 rounds + fp32_attention + profile (~5 min here)
    python benchmarks/bench_mfu.py --quick    # 1 round of default and channels_last (~1.5 min here)
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import main_args, write_result

from engine.build import build_unet
from engine.config import load_config
from modeling.flops import unet_train_flops

GOAL = 0.30
SMALL = Path(__file__).resolve().parent.parent / "configs" / "small_cpu.yaml"


def matmul_peak(side: int = 2048, repeats: int = 5) -> float:
    """Best bf16 ``side``² matmul rate in FLOP/s at the current thread count."""
    a, b = (torch.randn(side, side, dtype=torch.bfloat16) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * side**3 / best


def small_step():
    """(unet in bf16, inputs, analytic FLOPs of one forward + backward)."""
    cfg = load_config(SMALL)
    unet = build_unet(cfg).to(torch.bfloat16).train()
    images, side = 2 * cfg.train.micro_batch_size * cfg.model.num_views, cfg.data.resolution // 8
    g = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(images, 8, side, side, generator=g).bfloat16(),
        "timestep": torch.randint(0, 1000, (images,), generator=g),
        "encoder_hidden_states": torch.randn(
            images, 1, cfg.model.cross_attention_dim, generator=g
        ).bfloat16(),
        "class_labels": torch.randn(images, 10, generator=g).bfloat16(),
    }
    return unet, inputs, unet_train_flops(dict(unet.config), images, side)


def step_seconds(unet: torch.nn.Module, inputs: dict) -> float:
    t0 = time.perf_counter()
    unet(**inputs).sample.float().square().mean().backward()
    seconds = time.perf_counter() - t0
    unet.zero_grad(set_to_none=True)
    return seconds


def fp32_attention_step(unet: torch.nn.Module, inputs: dict) -> float:
    """The step with SDPA's inputs upcast to fp32 (its fp32 CPU kernel), the output cast back."""
    sdpa = F.scaled_dot_product_attention

    def upcast(q, k, v, *args, **kwargs):
        return sdpa(q.float(), k.float(), v.float(), *args, **kwargs).to(q.dtype)

    F.scaled_dot_product_attention = upcast  # modeling.attention looks it up through F at call time
    try:
        return step_seconds(unet, inputs)
    finally:
        F.scaled_dot_product_attention = sdpa


def top_operators(unet: torch.nn.Module, inputs: dict, rows: int = 6) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step_seconds(unet, inputs)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        {"op": e.key, "share": round(e.self_cpu_time_total / total, 3), "calls": e.count}
        for e in events[:rows]
    ]


def run(quick: bool) -> dict:
    unet, inputs, flops = small_step()
    last = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    last_inputs = {**inputs, "sample": inputs["sample"].contiguous(memory_format=torch.channels_last)}
    sides = {
        "default": lambda: step_seconds(unet, inputs),
        "channels_last": lambda: step_seconds(last, last_inputs),
    }
    if not quick:
        sides["fp32_attention"] = lambda: fp32_attention_step(unet, inputs)
    with torch.no_grad():  # warm-up: allocator, oneDNN primitives of both layouts
        unet(**inputs), last(**last_inputs)
    seconds, peaks, mfu = ({name: [] for name in sides} for _ in range(3))
    for _ in range(1 if quick else 3):
        for name, measure in sides.items():
            peaks[name].append(matmul_peak(repeats=3))
            seconds[name].append(measure())
            mfu[name].append(flops / seconds[name][-1] / peaks[name][-1])
    median = {name: statistics.median(values) for name, values in mfu.items()}
    raw = {
        "mfu_median": {name: round(value, 4) for name, value in median.items()},
        "mfu_all": {name: [round(v, 4) for v in values] for name, values in mfu.items()},
        "step_seconds": {name: [round(v, 3) for v in values] for name, values in seconds.items()},
        "peak_flops": {name: [round(v / 1e9, 1) for v in values] for name, values in peaks.items()},
        "flops_per_step": flops,
        "threads": torch.get_num_threads(),
    }
    if not quick:
        raw["profile_default"] = top_operators(unet, inputs)
    ratio = median["default"]
    peak = statistics.median(peaks["default"])
    return {
        "config": {"config": "configs/small_cpu.yaml", "dtype": "bfloat16", "step": "UNet forward+backward, 1 "
                   "micro-batch (12 images, 32x32 latents)", "quick": quick,
                   "cpu_amx": bool(torch.cpu._is_amx_tile_supported())},
        "raw": raw,
        "ratio": round(ratio, 4),
        "goal": f">= {GOAL:.0%} MFU",
        "met": ratio >= GOAL,
        "baseline": "2048² bf16 matmul peak, measured before each step, same threads",
        "summary": f"MFU {ratio:.1%} of a {peak / 1e9:.0f} GFLOP/s matmul peak (channels_last: "
        f"{median['channels_last']:.1%})",
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    args = main_args(__doc__, argv)
    payload = run(args.quick)
    print(f"{write_result('mfu', payload)}: {payload['summary']}")
    return payload


if __name__ == "__main__":
    main()
