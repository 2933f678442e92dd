"""Run every benchmark, each in a fresh process, print the ratios, and regenerate the README table.

    python benchmarks/run_all.py --quick                 # every CPU result in ≤ 15 min
    python benchmarks/run_all.py --only overhead,stall   # a few (names with or without "bench_")

Each module in ``BENCHMARKS`` runs as ``python benchmarks/<module>.py [--quick]`` in its own process so
that threads, allocator state and peak memory of one never leak into the next. A module may define
``unavailable() -> str | None`` (why it cannot run here, e.g. needs root) and ``QUICK = False`` (left out
of ``--quick``). A benchmark that fails or writes no result makes the exit status 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import results_dir

HERE = Path(__file__).resolve().parent  # common.py: every benchmark imports it
BENCH_DIR = HERE  # where the modules of BENCHMARKS are
ROOT = HERE.parent

# Module stems under benchmarks/, in the README table's order; the result is <stem without "bench_">.json.
BENCHMARKS = [
    "bench_latents",
    "bench_overhead",
    "bench_stall",
    "bench_data",
    "bench_mfu",
    "bench_checkpointing",
    "bench_attention",
    "bench_scaling",
    "bench_startup",
    "bench_procs",
    "bench_background",
    "bench_multinode",
    "param_counts",
]


def result_name(module: str) -> str:
    return module.removeprefix("bench_")


def _load(module: str):
    spec = importlib.util.spec_from_file_location(module, BENCH_DIR / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


def skip_reason(module: str, quick: bool) -> str | None:
    """Why ``module`` is not run now, or None."""
    if not (BENCH_DIR / f"{module}.py").is_file():
        return "missing"
    mod = _load(module)
    if quick and not getattr(mod, "QUICK", True):
        return "not in --quick"
    check = getattr(mod, "unavailable", None)
    return check() if check is not None else None


def run_one(module: str, quick: bool, timeout_s: float) -> tuple[str, float]:
    """Run one benchmark in a fresh process; returns (status, seconds)."""
    out = results_dir() / f"{result_name(module)}.json"
    before = out.stat().st_mtime if out.exists() else None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(map(str, (ROOT, HERE, BENCH_DIR))))}
    cmd = [sys.executable, str(BENCH_DIR / f"{module}.py")] + (["--quick"] if quick else [])
    start = time.perf_counter()
    try:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout_s:.0f} s", time.perf_counter() - start
    seconds = time.perf_counter() - start
    if rc != 0:
        return f"failed (exit {rc})", seconds
    if not out.exists() or out.stat().st_mtime == before:
        return f"wrote no {out.name}", seconds
    return "ok", seconds


def _row(module: str, status: str, seconds: float | None) -> list[str]:
    path = results_dir() / f"{result_name(module)}.json"
    if status == "ok":
        r = json.loads(path.read_text())
        ratio, goal, met = f"{r['ratio']:.3g}×", r["goal"], "yes" if r["met"] else "NO"
    else:
        ratio = goal = met = "–"
    took = f"{seconds:.0f} s" if seconds is not None else "–"
    return [result_name(module), ratio, goal, met, took, status]


def print_table(rows: list[list[str]]) -> None:
    header = ["benchmark", "ratio", "goal", "met", "took", "status"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)), flush=True)


def select(only: str | None) -> list[str]:
    if not only:
        return list(BENCHMARKS)
    wanted = [name.strip() for name in only.split(",") if name.strip()]
    by_name = {result_name(m): m for m in BENCHMARKS} | {m: m for m in BENCHMARKS}
    unknown = [w for w in wanted if w not in by_name]
    if unknown:
        sys.exit(f"--only: unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    return [by_name[w] for w in wanted]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="each benchmark's quick size (≤ 2 min each)")
    parser.add_argument("--only", help="comma-separated benchmarks to run (default: all)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per benchmark (default: 900)")
    args = parser.parse_args(argv)
    rows, failed = [], False
    for module in select(args.only):
        reason = skip_reason(module, args.quick)
        if reason is not None:
            print(f"== {module}: skipped ({reason})", flush=True)
            rows.append(_row(module, f"skipped: {reason}", None))
            failed |= reason == "missing"
            continue
        print(f"== {module}{' --quick' if args.quick else ''}", flush=True)
        status, seconds = run_one(module, args.quick, args.timeout)
        failed |= status != "ok"
        rows.append(_row(module, status, seconds))
    print_table(rows)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])}
    subprocess.run([sys.executable, str(HERE / "readme_table.py")], cwd=ROOT, env=env, check=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
