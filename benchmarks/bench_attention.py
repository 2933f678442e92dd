"""Benchmark: memory and time of our multi-view attention vs a Wonder3D-style processor that repeats K/V.

The attention core of one multi-view self-attention layer (from the q/k/v projections to the merged heads) at
the first UNet level of Wonder3D (32² latent = 1024 tokens per view, 320 channels, 8 heads), one object with V
views, forward + backward (training) and forward alone:

* ``repeat_kv`` (the baseline, what Wonder3D feeds xformers): every view's queries get their own copy of the
  object's V·n keys and values (``(b·V, V·n, C)``, V copies), heads are split into the batch with copies, and
  one memory-efficient attention call runs (xformers on CUDA when installed, else SDPA's fused kernel);
* ``ours``: ``modeling.attention.MultiViewAttnProcessor``: the rows regrouped to ``(b, V·n, C)`` without a
  copy and one fused attention call -- the same FLOPs, no V-fold K/V;
* ``naive`` (context): scores ``(V·H, n, V·n)`` materialised and soft-maxed, skipped when predicted too big.

Peak memory: on CPU the growth of the process's peak RSS during the call (the kernel's high-water mark, reset
before each measurement; each view count in a fresh process with a fixed malloc mmap threshold so freed
buffers go back to the OS at once); on CUDA ``torch.cuda.max_memory_allocated``.

    python benchmarks/bench_attention.py            # writes benchmarks/results/attention.json
    python benchmarks/bench_attention.py --quick    # fewer repeats, naive only where small
    python benchmarks/bench_attention.py --device cuda
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Callable

import torch
from common import main_args, side_by_side, write_result
from torch import Tensor

VIEWS = (1, 2, 4, 6)
HEADLINE_VIEWS = 6
GOAL = 4.0


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """``(B, L, H·d) -> (B·H, L, d)``, a contiguous copy, as diffusers' ``head_to_batch_dim`` makes it."""
    b, length, c = x.shape
    return x.reshape(b, length, heads, c // heads).permute(0, 2, 1, 3).reshape(b * heads, length, c // heads)


def _merge_heads(x: Tensor, heads: int) -> Tensor:
    bh, length, d = x.shape
    return (
        x.reshape(bh // heads, heads, length, d).permute(0, 2, 1, 3).reshape(bh // heads, length, heads * d)
    )


def _memory_efficient(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``(B, L, d)`` attention through xformers on CUDA when installed (as the reference), else SDPA."""
    if q.is_cuda:
        try:
            import xformers.ops as xops

            return xops.memory_efficient_attention(q, k, v)
        except ImportError:
            pass
    return torch.nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]


def repeat_kv_attention(q: Tensor, k: Tensor, v: Tensor, views: int, heads: int) -> Tensor:
    """Wonder3D-style: ``(b·V, n, C)`` inputs; each view's queries over its own copy of all V·n keys/values."""
    rows, n, c = k.shape
    k, v = (t.reshape(rows // views, views * n, c).repeat_interleave(views, dim=0) for t in (k, v))
    out = _memory_efficient(*(_split_heads(t, heads) for t in (q, k, v)))  # (b·V·H, n, d)
    return _merge_heads(out, heads)


def naive_attention(q: Tensor, k: Tensor, v: Tensor, views: int, heads: int) -> Tensor:
    """Repeated K/V and the scores ``(b·V·H, n, V·n)`` materialised (the reference's math path)."""
    rows, n, c = k.shape
    k, v = (t.reshape(rows // views, views * n, c).repeat_interleave(views, dim=0) for t in (k, v))
    q, k, v = (_split_heads(t, heads) for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return _merge_heads(scores.softmax(-1) @ v, heads)


@functools.cache
def _layer(channels: int, heads: int, views: int, device: str) -> tuple:
    """A diffusers Attention (only its heads and scale are used) and our dense multi-view processor."""
    from diffusers.models.attention_processor import Attention

    from modeling.attention import MultiViewAttnProcessor

    attn = Attention(query_dim=channels, heads=heads, dim_head=channels // heads).to(device)
    return attn, MultiViewAttnProcessor(views, backend="auto" if device == "cuda" else "sdpa")


def ours_attention(q: Tensor, k: Tensor, v: Tensor, views: int, heads: int) -> Tensor:
    """The processor the UNet runs (dense multi-view), on the same projected q/k/v."""
    attn, processor = _layer(q.shape[-1], heads, views, q.device.type)
    return processor.grouped_attention(attn, q, k, v)


IMPLS: dict[str, Callable[..., Tensor]] = {
    "repeat_kv": repeat_kv_attention,
    "ours": ours_attention,
    "naive": naive_attention,
}


class PeakMemory:
    """Peak extra memory (MB) of a block: CUDA allocator stats, or the process's RSS high-water mark."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM, so an earlier peak cannot hide this one
            self.base = _status_mb("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = _status_mb("VmHWM")
        self.mb = max(peak - self.base, 0.0)


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _call(impl: str, inputs: tuple[Tensor, ...], views: int, heads: int, train: bool) -> None:
    if not train:
        with torch.no_grad():
            IMPLS[impl](*inputs, views, heads)
        return
    out = IMPLS[impl](*inputs, views, heads)
    out.backward(torch.ones_like(out))
    for t in inputs:
        t.grad = None


def _timed_ms(impl: str, inputs: tuple[Tensor, ...], views: int, heads: int, train: bool) -> float:
    start = time.perf_counter()
    _call(impl, inputs, views, heads, train)
    if inputs[0].is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def measure_views(views: int, settings: dict) -> list[dict]:
    """Every implementation at ``views`` views: peak extra MB and median ms, training and forward-only.

    Memory first (one call each, the first call); then the timed calls in rotation (a b a b), so the
    implementations share the machine's background load.
    """
    torch.manual_seed(0)
    device = torch.device(settings["device"])
    tokens, channels, heads = settings["latent"] ** 2, settings["channels"], settings["heads"]
    _layer(channels, heads, views, device.type)  # built before any measurement: its weights are not counted
    impls = [
        i for i in IMPLS if i != "naive" or predicted_naive_mb(views, settings) <= settings["max_naive_mb"]
    ]
    rows = []
    for mode in ("train", "forward"):
        train = mode == "train"
        inputs = tuple(
            torch.randn(views, tokens, channels, device=device, requires_grad=train) for _ in range(3)
        )
        peaks, first_ms = {}, {}
        for impl in impls:
            start = time.perf_counter()
            with PeakMemory(device) as peak:
                _call(impl, inputs, views, heads, train)  # also the warm-up
            first_ms[impl] = (time.perf_counter() - start) * 1e3
            peaks[impl] = peak.mb

        makers = {impl: functools.partial(_timed_ms, impl, inputs, views, heads, train) for impl in impls}
        times = side_by_side(makers, settings["repeats"])
        times = {impl: times[impl] or [first_ms[impl]] for impl in impls}  # repeats 0 (quick): the first call
        rows += [
            {"impl": impl, "views": views, "mode": mode, "peak_mb": round(peaks[impl], 2),
             "time_ms": round(statistics.median(times[impl]), 2), "times_ms": [round(t, 2) for t in times[impl]]}
            for impl in impls
        ]  # fmt: skip
    return rows


def predicted_naive_mb(views: int, settings: dict) -> float:
    """Scores + softmax of the naive path (fp32): 2 · V·H·n·V·n · 4 bytes."""
    n = settings["latent"] ** 2
    return 2 * views * settings["heads"] * n * views * n * 4 / 2**20


def measure_all(settings: dict) -> list[dict]:
    """``measure_views`` for every view count; on CPU each in a fresh process (the RSS mark is per process)."""
    if settings["device"] != "cpu":
        return [row for views in settings["views"] for row in measure_views(views, settings)]
    # A fixed mmap threshold: freed large buffers are unmapped at once, so RSS follows the live tensors.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    rows = []
    with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        for views in settings["views"]:
            rows += pool.apply(measure_views, (views, settings))
    return rows


def settings_for(quick: bool, device: str = "cpu") -> dict:
    return {
        "views": list(VIEWS),
        "latent": 32,
        "channels": 320,
        "heads": 8,
        "repeats": 0 if quick else 5,
        "device": device,
        "max_naive_mb": 512 if quick else 4096,
        "threads": torch.get_num_threads(),
    }


def payload(rows: list[dict], settings: dict) -> dict:
    """The result record: ratio = Wonder3D-style peak / ours at 6 views (training), goal ≥ 4×."""
    by = {(r["impl"], r["views"], r["mode"]): r for r in rows}
    views = HEADLINE_VIEWS if HEADLINE_VIEWS in settings["views"] else max(settings["views"])
    ratios = {
        f"{mode}_{v}_views": {
            "memory": round(by[("repeat_kv", v, mode)]["peak_mb"] / max(by[("ours", v, mode)]["peak_mb"], 1e-3), 2),
            "time": round(by[("repeat_kv", v, mode)]["time_ms"] / max(by[("ours", v, mode)]["time_ms"], 1e-3), 2),
        }
        for v in settings["views"]
        for mode in ("train", "forward")
    }  # fmt: skip
    ratio = ratios[f"train_{views}_views"]["memory"]
    fwd = ratios[f"forward_{views}_views"]
    return {
        "config": settings,
        "raw": {"rows": rows, "ratios_repeat_kv_over_ours": ratios},
        "ratio": ratio,
        "goal": f">= {GOAL:g}x less memory at {HEADLINE_VIEWS} views",
        "met": ratio >= GOAL,
        "baseline": "Wonder3D-style processor repeating K/V per view into memory-efficient attention",
        "summary": (
            f"At {views} views ({settings['latent']}² latent, {settings['channels']} ch) our grouped attention "
            f"needs {ratio:.1f}x less peak memory than repeated K/V for forward+backward "
            f"({fwd['memory']:.1f}x forward only), time ratio {ratios[f'train_{views}_views']['time']:.2f}x."
        ),
    }


def run(quick: bool, device: str = "cpu") -> dict:
    settings = settings_for(quick, device)
    return payload(measure_all(settings), settings)


def main(argv: list[str] | None = None) -> dict:
    def add_args(p) -> None:
        p.add_argument("--device", default="cpu", help="cpu or cuda")

    args = main_args(__doc__.split("\n\n")[0], argv, add_args)
    result = run(args.quick, args.device)
    name = "attention" if args.device == "cpu" else f"attention_{args.device}"
    print(result["summary"])
    print(f"wrote {write_result(name, result)}")
    return result


if __name__ == "__main__":
    main()
