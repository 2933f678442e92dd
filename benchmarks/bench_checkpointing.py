"""Gradient checkpointing: activation memory and step time with vs without, on the same model and batch.

The UNet of ``configs/small_cpu.yaml`` in bf16 (as ``bench_mfu``), one micro-batch forward + backward, once
with ``model.gradient_checkpointing`` (``build_unet`` turns it on, as a run does) and once without, the same
weights and inputs. Activation memory = bytes of the tensors autograd keeps for backward, counted exactly
with ``torch.autograd.graph.saved_tensors_hooks`` (storages counted once; inside a checkpointed block the
checkpoint's own hooks keep nothing, so what it recomputes is not counted), plus the attention outputs that
selective checkpointing keeps in its own cache (counted from one forward). Goal: ≥ 2× less activation
memory for ≤ 1.35× the step time. Steps in rotation. The full run adds ``full_recompute``: diffusers' default
checkpointing, which also recomputes the attention kernels (``engine.recompute`` keeps their outputs).

    python benchmarks/bench_checkpointing.py            # 2 rounds
    python benchmarks/bench_checkpointing.py --quick    # 1 round (~1.5 min here)
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from common import main_args, summarize, write_result
from torch.utils._python_dispatch import TorchDispatchMode

from engine.build import build_unet
from engine.config import load_config
from engine.recompute import KEPT_OPS

MEMORY_GOAL, TIME_GOAL = 2.0, 1.35
SMALL = Path(__file__).resolve().parent.parent / "configs" / "small_cpu.yaml"


def build(checkpointing: bool) -> tuple[torch.nn.Module, dict]:
    cfg = load_config(SMALL, [f"model.gradient_checkpointing={str(checkpointing).lower()}"])
    unet = build_unet(cfg).to(torch.bfloat16).train()  # build_unet seeds: the same weights on both sides
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
    return unet, inputs


def measured_step(unet: torch.nn.Module, inputs: dict) -> tuple[float, int]:
    """(seconds of forward + backward, bytes saved for backward)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = unet(**inputs).sample.float().square().mean()
    loss.backward()
    seconds = time.perf_counter() - t0
    unet.zero_grad(set_to_none=True)
    params = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    return seconds, sum(n for ptr, n in storages.items() if ptr not in params)  # weights are not activations


def kept_attention_bytes(unet: torch.nn.Module, inputs: dict) -> int:
    """Bytes of the attention kernels' outputs in one forward: what selective checkpointing keeps in its own
    cache (the saved-tensor hooks do not see it)."""
    total = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in KEPT_OPS:
                total.extend(t.untyped_storage().nbytes() for t in out if isinstance(t, torch.Tensor))
            return out

    with torch.no_grad(), Count():
        unet(**inputs)
    return sum(total)


def run(quick: bool) -> dict:
    sides = {"plain": build(False), "checkpointing": build(True)}
    if not quick:  # before: diffusers' own checkpointing, which recomputes the attention too
        unet, inputs = build(True)
        unet.enable_gradient_checkpointing()
        sides["full_recompute"] = unet, inputs
    with torch.no_grad():  # warm-up: allocator, oneDNN primitives
        for unet, inputs in sides.values():
            unet(**inputs)
    seconds = {name: [] for name in sides}
    activation = {}
    for _ in range(1 if quick else 2):
        for name, (unet, inputs) in sides.items():
            step, saved = measured_step(unet, inputs)
            seconds[name].append(step)
            activation[name] = saved
    activation["checkpointing"] += kept_attention_bytes(*sides["checkpointing"])
    memory_ratio = activation["plain"] / activation["checkpointing"]
    time_ratio = min(seconds["checkpointing"]) / min(seconds["plain"])
    met = memory_ratio >= MEMORY_GOAL and time_ratio <= TIME_GOAL
    return {
        "config": {"config": "configs/small_cpu.yaml", "dtype": "bfloat16", "quick": quick,
                   "step": "UNet forward+backward, 1 micro-batch (12 images, 32x32 latents)"},
        "raw": {
            "activation_bytes": activation,
            "step_seconds": {name: summarize(v) | {"best": min(v)} for name, v in seconds.items()},
            "time_ratio": round(time_ratio, 3),
            **({"full_recompute": {"memory_ratio": round(activation["plain"] / activation["full_recompute"], 3),
                "time_ratio": round(min(seconds["full_recompute"]) / min(seconds["plain"]), 3)}}
               if "full_recompute" in seconds else {}),
            "threads": torch.get_num_threads(),
        },
        "ratio": round(memory_ratio, 3),
        "goal": f">= {MEMORY_GOAL:g}x less activation memory for <= {TIME_GOAL:g}x time",
        "met": met,
        "baseline": "the same model and batch without gradient checkpointing",
        "summary": f"{memory_ratio:.1f}x less activation memory ({activation['plain'] / 2**20:.0f} -> "
        f"{activation['checkpointing'] / 2**20:.0f} MiB) for {time_ratio:.2f}x the step time",
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    args = main_args(__doc__, argv)
    payload = run(args.quick)
    print(f"{write_result('checkpointing', payload)}: {payload['summary']}")
    return payload


if __name__ == "__main__":
    main()
