"""Benchmark: naive multi-view attention (repeated K/V, materialised scores) vs ours (grouped, SDPA).

Measures the attention core of one self-attention layer at the first UNet level of Wonder3D (32² latent =
1024 tokens per view, 320 channels, 8 heads) for one object with V views, forward pass:

* naive: Wonder3D's math path: K/V of the V views concatenated and repeated for each view's queries,
  scores ``(V·H, n, V·n)`` materialised and soft-maxed;
* ours: queries, keys and values regrouped to ``(1, V·n, C)`` (no copies) and one fused SDPA call.

Peak memory: on CPU the growth of the process's peak RSS during the call, each measurement in a fresh
process (so earlier runs do not hide a peak); on CUDA ``torch.cuda.max_memory_allocated``.

    PYTHONPATH=. python benchmarks/bench_attention.py          # CPU, writes benchmarks/results/attention.json
    PYTHONPATH=. python benchmarks/bench_attention.py --device cuda --out benchmarks/results/attention_cuda.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from modeling.attention import attention, group_views, ungroup_views


def naive_multiview(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, views: int, heads: int
) -> torch.Tensor:
    """Reference-style: per-view queries over V-times-repeated keys/values, scores materialised."""
    k = group_views(k, views).repeat_interleave(views, dim=0)  # (V, V·n, C) copied
    v = group_views(v, views).repeat_interleave(views, dim=0)
    q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (V, H, n, V·n)
    return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


def ours_multiview(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, views: int, heads: int) -> torch.Tensor:
    """Ours: regroup rows into one sequence per object, one SDPA call."""
    q, k, v = (group_views(t, views) for t in (q, k, v))  # (1, V·n, C), no copy
    q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    out = attention(q, k, v, scale=q.shape[-1] ** -0.5, backend="sdpa")
    return ungroup_views(out.transpose(1, 2).flatten(2), views)


IMPLS = {"naive": naive_multiview, "ours": ours_multiview}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) so an import-time peak cannot hide the call's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # older kernels / no permission: the fresh process still bounds the error


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(impl: str, views: int, args: dict) -> dict:
    """Time (median ms) and peak extra memory (MB) of one implementation; runs in a fresh process on CPU."""
    torch.manual_seed(0)
    device = torch.device(args["device"])
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    tokens, channels = args["latent"] ** 2, args["channels"]
    q, k, v = (torch.randn(views, tokens, channels, device=device) for _ in range(3))
    fn = IMPLS[impl]
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            _reset_peak_rss()
            base = _rss_mb()
        fn(q, k, v, views, args["heads"])  # warm-up, and the measured peak
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            peak_mb = _peak_rss_mb() - base
        times = []
        for _ in range(args["repeats"]):
            start = time.perf_counter()
            fn(q, k, v, views, args["heads"])
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
    return {"impl": impl, "views": views, "time_ms": statistics.median(times), "peak_mb": max(peak_mb, 0.0)}


def predicted_naive_gb(views: int, args: dict) -> float:
    """Scores + softmax output of the naive path in GB (fp32): 2 · V·H·n·V·n · 4 bytes."""
    n = args["latent"] ** 2
    return 2 * views * args["heads"] * n * views * n * 4 / 1e9


def run(args: dict) -> list[dict]:
    jobs = [(impl, v) for v in args["views"] for impl in IMPLS]
    rows = []
    ctx = mp.get_context("spawn")
    for impl, views in tqdm(jobs, desc="attention benchmark"):
        if impl == "naive" and predicted_naive_gb(views, args) > args["max_naive_gb"]:
            gb = predicted_naive_gb(views, args)
            rows.append({"impl": impl, "views": views, "skipped": f"needs ~{gb:.1f} GB > --max-naive-gb"})
            continue
        if args["device"] == "cpu":  # fresh process: ru_maxrss is a per-process high-water mark
            with ctx.Pool(1) as pool:
                rows.append(pool.apply(measure, (impl, views, args)))
        else:
            rows.append(measure(impl, views, args))
    return rows


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--views", type=int, nargs="+", default=[1, 2, 4, 6, 12], help="numbers of views to measure"
    )
    p.add_argument("--latent", type=int, default=32, help="latent side; tokens per view = latent²")
    p.add_argument("--channels", type=int, default=320, help="attention width (SD level-0 width)")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument(
        "--repeats", type=int, default=3, help="timed repetitions after the warm-up (median reported)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument(
        "--max-naive-gb", type=float, default=6.0, help="skip naive runs predicted to need more memory"
    )
    p.add_argument("--out", default="benchmarks/results/attention.json", help="where the JSON results go")
    return p.parse_args()


def main() -> None:
    args = vars(parse_args())
    rows = run(args)
    by = {(r["impl"], r["views"]): r for r in rows}
    print(f"{'views':>5} {'naive ms':>9} {'ours ms':>8} {'naive MB':>9} {'ours MB':>8} {'mem ratio':>9}")
    for v in args["views"]:
        n, o = by[("naive", v)], by[("ours", v)]
        if "skipped" in n:
            print(
                f"{v:>5} {'skipped':>9} {o['time_ms']:>8.1f} {'-':>9} {o['peak_mb']:>8.1f} {'-':>9}  ({n['skipped']})"
            )
            continue
        ratio = n["peak_mb"] / max(o["peak_mb"], 1e-6)
        n["mem_ratio_naive_over_ours"] = ratio
        print(
            f"{v:>5} {n['time_ms']:>9.1f} {o['time_ms']:>8.1f} {n['peak_mb']:>9.1f} {o['peak_mb']:>8.1f} {ratio:>9.1f}"
        )
    out = Path(args["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "machine": platform.machine(), "cpu_threads": torch.get_num_threads()}
    if args["device"] == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    out.write_text(json.dumps({"args": args, "meta": meta, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
