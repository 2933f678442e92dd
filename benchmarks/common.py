"""What every benchmark shares: the result record and its atomic write, and side-by-side timing.

A benchmark module ``benchmarks/bench_<name>.py`` has ``run(quick: bool) -> dict`` (the payload; writes
nothing) and ``main(argv=None)`` (argparse with ``--quick``; calls ``run`` then ``write_result``). The payload
holds the keys of ``PAYLOAD_KEYS``; ``write_result`` adds where and when it was measured and writes
``benchmarks/results/<name>.json``, from which ``readme_table.py`` makes the README table.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_ENV = "GNN3D_BENCH_RESULTS"  # another results folder (the smoke tests write there)

# key → type of its value; "config" and "raw" are free-form records of what ran and every measurement.
PAYLOAD_KEYS: dict[str, type | tuple[type, ...]] = {
    "config": dict,
    "raw": (dict, list),
    "ratio": float,
    "goal": str,
    "met": bool,
    "baseline": str,
    "summary": str,
}


class BenchmarkError(ValueError):
    """A payload that does not follow the result contract; the message names the benchmark and the key."""


def results_dir() -> Path:
    return Path(os.environ.get(RESULTS_ENV) or RESULTS_DIR)


def check_payload(name: str, payload: dict) -> None:
    """Raise BenchmarkError unless ``payload`` has every contract key with a value of the right type."""
    for key, kind in PAYLOAD_KEYS.items():
        if key not in payload:
            raise BenchmarkError(f"benchmark {name!r}: payload has no {key!r}")
        value = payload[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            continue  # an integral ratio is still a number
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise BenchmarkError(
                f"benchmark {name!r}: {key!r} must be {getattr(kind, '__name__', kind)}, "
                f"got {type(value).__name__}"
            )


def machine() -> dict:
    """CPU model, cores, RAM, GPU (or "none") and the load average when the result was written."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = "none"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram_gib, 1),
        "gpu": gpu,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def versions() -> dict:
    """Installed versions (package metadata: no slow import of deepspeed or diffusers)."""
    out = {"python": platform.python_version()}
    for package in ("torch", "deepspeed", "diffusers"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def write_result(name: str, payload: dict) -> Path:
    """Check ``payload``, add name/machine/versions/when, write ``<results>/<name>.json`` atomically."""
    check_payload(name, payload)
    record = {
        "name": name,
        **payload,
        "ratio": float(payload["ratio"]),
        "machine": machine(),
        "versions": versions(),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    out_dir = results_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1, allow_nan=False)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a result is for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def side_by_side(makers: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Call each measurement in rotation ``repeats`` times; every value kept, in call order.

    Rotation (a b a b …, not a a … b b …) makes both sides see the same background load on a shared machine.
    """
    runs: dict[str, list[float]] = {name: [] for name in makers}
    for _ in range(repeats):
        for name, measure in makers.items():
            runs[name].append(measure())
    return runs


def summarize(values: list[float]) -> dict:
    """Best (max, the least disturbed rate), median and every value."""
    return {
        "best": max(values),
        "median": statistics.median(values),
        "all": [round(v, 4) for v in values],
    }


class Stopwatch:
    """``with Stopwatch() as w: ...`` then ``w.seconds``."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def main_args(description: str, argv: list[str] | None = None, add_args: Callable | None = None):
    """The argparse every benchmark shares: ``--quick`` (≤ 2 min) plus the module's own options."""
    import argparse

    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats (≤ 2 min)")
    if add_args is not None:
        add_args(parser)
    return parser.parse_args(argv)
