"""Render a whole synthetic dataset folder in parallel (what `launcher/synth.py` runs)."""

from __future__ import annotations

import json
import os
import time
from multiprocessing import get_context
from pathlib import Path

from tqdm import tqdm

from datapipes.sample import VIEW_NAMES
from datapipes.synth.object import object_id_for_seed, object_seed, render_object
from datapipes.synth.writer import is_complete, remove_stale_staging, write_object

OBJECT_LIST = "synth_objects.json"


def _render_one(job: tuple[int, str, int, str, int, str]) -> float:
    """Render and write one object; returns the CPU seconds it took (throughput independent of load)."""
    seed, out, res, fmt, supersample, normal_space = job
    start = time.process_time()
    write_object(render_object(seed, res, supersample, normal_space), out, fmt)
    return time.process_time() - start


def render_dataset(
    out: str | Path,
    objects: int,
    res: int = 256,
    seed: int = 0,
    workers: int = 2,
    fmt: str = "png",
    supersample: int = 1,
    overwrite: bool = False,
    normal_space: str = "camera",
) -> dict:
    """Render `objects` objects into `out` (render-script layout); skip complete folders unless overwrite.

    Object i is a function of (seed, i) only, so a resumed or repeated run writes identical bytes.
    normal_space: see `render_object` ("camera" = what the reference render script writes).
    Writes `out/synth_objects.json` (seed, res, sorted object ids). Returns a summary with objects/s.
    """
    if objects < 0 or seed < 0 or res < 2 or supersample < 1:
        raise ValueError(
            f"need objects >= 0, seed >= 0, res >= 2, supersample >= 1; got {objects}, {seed}, "
            f"{res}, {supersample}"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    seeds = [object_seed(seed, index) for index in range(objects)]
    todo = [
        (object_seed_, str(out), res, fmt, supersample, normal_space)
        for object_seed_ in seeds
        if overwrite or not is_complete(out, object_id_for_seed(object_seed_), VIEW_NAMES, fmt)
    ]
    start = time.perf_counter()
    cpu_seconds = 0.0
    with tqdm(total=len(todo), desc="render", unit="obj") as bar:
        if workers <= 1:
            for job in todo:
                cpu_seconds += _render_one(job)
                bar.update()
        else:
            # One BLAS thread per worker: the renderer is elementwise numpy, extra threads only contend.
            os.environ.setdefault("OMP_NUM_THREADS", "1")
            with get_context("spawn").Pool(workers) as pool:
                for cpu in pool.imap_unordered(_render_one, todo, chunksize=4):
                    cpu_seconds += cpu
                    bar.update()
    seconds = time.perf_counter() - start
    ids = sorted(object_id_for_seed(object_seed_) for object_seed_ in seeds)
    listing = {"seed": seed, "res": res, "format": fmt, "normal_space": normal_space, "object_ids": ids}
    (out / OBJECT_LIST).write_text(json.dumps(listing, indent=1))
    return {
        "rendered": len(todo),
        "skipped": objects - len(todo),
        "seconds": round(seconds, 3),
        "objects_per_s": round(len(todo) / seconds, 3) if todo else None,
        # CPU cost per object: on a shared machine this, not wall time, says what N free cores would do
        "cpu_s_per_object": round(cpu_seconds / len(todo), 4) if todo else None,
        "workers": workers,
        "res": res,
    }
