"""Render folders -> webdataset shards + ``manifest.json`` (its format: `datapipes.manifest`).

One shard sample per object: its encoded image files byte-identical to the source (members
``{key}.rgb_front.png``, ``{key}.normals_front.png``, ``{key}.mask_front.png`` for wonder3d) plus
``{key}.cameras.json`` (strict JSON, see `render_folder.cameras_record`). Objects are split into train/val by
a sha256 hash of the object id and written to ``OUT/train/shard-000000.tar`` and ``OUT/val/shard-000000.tar``.
Tar headers carry no time stamps or owners, so the same input always gives byte-identical shards.

Resume: the manifest is rewritten atomically after each finished shard. A restart keeps the shards listed in
it, deletes half-written ones (``*.tmp``, or a shard file the manifest does not list) and converts only the
objects not yet in a finished shard or in the skipped list -- no object is lost or duplicated.
Invalid objects are never dropped silently: they are listed under ``skipped`` with the reason. Which
objects are taken at all (the reference's object / invalid lists) is `datapipes.selection`.

    python launcher/convert.py --src renders/ --out shards/ --samples-per-shard 256 --workers 2
"""

from __future__ import annotations

import hashlib
import io
import math
import multiprocessing
import os
import re
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from datapipes.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    SPLITS,
    load_manifest,
    write_manifest_atomic,
)
from datapipes.render_folder import (
    CAMERAS_KEY,
    ObjectRef,
    RawObject,
    cameras_json_bytes,
    list_objects,
    read_object,
    resolve_layout,
    split_of,
    stable_unit_hash,
    tar_key,
)
from datapipes.sample import COND_VIEW, VIEW_NAMES, SampleError
from datapipes.selection import IdList, read_id_list, select_objects
from datapipes.shard_io import iter_raw_objects

REENCODE_FORMATS = ("none", "png", "webp")
TAR_HEADER_BYTES = 1024  # a tar header block plus padding, to estimate shard sizes before reading files


class ConvertError(RuntimeError):
    """Conversion cannot proceed or a verification failed; the message names the shard / file."""


@dataclass(frozen=True)
class ConvertOptions:
    """What a conversion does. A resumed run must use the same options (checked against the manifest)."""

    layout: str = "auto"
    # At most this many objects per shard, or (when None) at most about shard_bytes bytes per shard.
    samples_per_shard: int | None = None
    shard_bytes: int | None = 1 << 30
    val_fraction: float = 0.01
    workers: int = 0  # 0 = read objects in this process
    reencode: str = "none"  # "none" keeps the source bytes; "png" / "webp" re-encode losslessly
    object_list: str | None = None  # JSON list of ids to convert (the reference's object_list.json)
    exclude_list: str | None = None  # JSON list of ids to leave out (the reference's invalid_list.json)
    allow_missing: bool = False  # object_list ids absent from the source: reported instead of an error
    views: tuple[str, ...] = VIEW_NAMES  # the views every object must have and every sample stores


@dataclass
class ShardPlan:
    """One shard to write: its split, file name (relative to OUT) and objects in order."""

    split: str
    name: str
    objects: list[ObjectRef]


def parse_size(text: str) -> int:
    """'1GB', '256MB', '64KiB', '1000' -> bytes (decimal units for kB/MB/GB, binary for KiB/MiB/GiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*", text)
    if not match:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 1GB, 500MB, 64MiB")
    number, unit = float(match.group(1)), (match.group(2) or "b").lower().rstrip("b")
    powers = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
    base = 1024 if unit.endswith("i") else 1000
    return int(number * base ** powers[unit.rstrip("i")])


# --------------------------------------------------------------------------------------------- manifest


def new_manifest(src: Path, layout: str, record: dict[str, Any], selection: dict[str, Any]) -> dict[str, Any]:
    """An empty manifest for a fresh conversion (`record`: `_option_record`; `selection`: its counts)."""
    return {
        "format": MANIFEST_FORMAT,
        "source": str(src),
        "layout": layout,
        "options": record,
        "views": list(record.get("views", VIEW_NAMES)),
        "cond_view": COND_VIEW,
        "shards": [],
        "skipped": [],
        "selection": selection,
        "splits": {split: {"shards": 0, "samples": 0, "bytes": 0} for split in SPLITS},
        "complete": False,
    }


def _option_record(opts: ConvertOptions, layout: str, lists: dict[str, IdList | None]) -> dict[str, Any]:
    """What a resume must match: the options that change the output (lists by content, not path)."""
    record = asdict(opts)
    record.pop("workers")  # the worker count does not change the output
    record["layout"] = layout
    for key, id_list in lists.items():
        # Absent when unused, so manifests written before these options existed still resume.
        record.pop(key)
        if id_list is not None:
            record[key] = {"ids": len(id_list.ids), "sha256": id_list.digest()}
    if not record["allow_missing"]:
        record.pop("allow_missing")
    record["views"] = list(opts.views)  # as JSON reads it back
    if opts.views == VIEW_NAMES:
        record.pop("views")
    return record


def _discard_unfinished(out: Path, manifest: dict[str, Any]) -> list[str]:
    """Delete ``*.tmp`` files and shard files the manifest does not list (a crash before its update)."""
    listed = {shard["name"] for shard in manifest["shards"]}
    removed = []
    for split in SPLITS:
        for path in sorted((out / split).glob("shard-*")) if (out / split).is_dir() else []:
            name = f"{split}/{path.name}"
            if name not in listed:
                path.unlink()
                removed.append(name)
    return removed


# --------------------------------------------------------------------------------------------- planning


def _estimate_bytes(ref: ObjectRef) -> int:
    files = [p for p in ref.path.iterdir() if p.is_file()]
    return sum(p.stat().st_size + TAR_HEADER_BYTES for p in files) + 2 * TAR_HEADER_BYTES


def plan_shards(
    objects: list[ObjectRef], opts: ConvertOptions, first_index: dict[str, int]
) -> list[ShardPlan]:
    """Group objects (already in id order) into shards per split, numbering from `first_index[split]`.

    A shard closes at `samples_per_shard` objects or, when that is None, before its estimated size passes
    `shard_bytes` (every shard holds at least one object).
    """
    if opts.samples_per_shard is None and opts.shard_bytes is None:
        raise ValueError("give samples_per_shard or shard_bytes")
    plans: list[ShardPlan] = []
    for split in SPLITS:
        members = [ref for ref in objects if split_of(ref.object_id, opts.val_fraction) == split]
        index, current, size = first_index.get(split, 0), [], 0
        for ref in members:
            cost = 0 if opts.samples_per_shard else _estimate_bytes(ref)
            full = (
                len(current) >= opts.samples_per_shard
                if opts.samples_per_shard
                else current and size + cost > opts.shard_bytes
            )
            if full:
                plans.append(ShardPlan(split, f"{split}/shard-{index:06d}.tar", current))
                index, current, size = index + 1, [], 0
            current.append(ref)
            size += cost
        if current:
            plans.append(ShardPlan(split, f"{split}/shard-{index:06d}.tar", current))
    return plans


# --------------------------------------------------------------------------------------------- writing


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata (no mtime/owner) keeps shards byte-identical across runs and machines.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def add_sample(tar: tarfile.TarFile, raw: RawObject) -> None:
    """Append one object as a webdataset sample: images in key order, then cameras.json."""
    key = tar_key(raw.object_id)
    for member in sorted(raw.files):
        _tar_member(tar, f"{key}.{member}", raw.files[member])
    _tar_member(tar, f"{key}.{CAMERAS_KEY}", cameras_json_bytes(raw.cameras))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def reencode_images(raw: RawObject, fmt: str) -> RawObject:
    """Re-encode every image of an object losslessly as `fmt` ("png" or "webp"); pixels and mode unchanged."""
    files = {}
    for key, data in raw.files.items():
        out = io.BytesIO()
        options = {"lossless": True, "exact": True} if fmt == "webp" else {}
        Image.open(io.BytesIO(data)).save(out, format=fmt.upper(), **options)
        files[_with_ext(key, fmt)] = out.getvalue()
    cameras = dict(raw.cameras)
    cameras["image_sizes"] = {_with_ext(k, fmt): v for k, v in raw.cameras["image_sizes"].items()}
    cameras["source_files"] = {
        (_with_ext(k, fmt) if k in raw.files else k): v for k, v in raw.cameras["source_files"].items()
    }
    return RawObject(raw.object_id, raw.layout, files, cameras, raw.source)


def _with_ext(key: str, ext: str) -> str:
    return f"{key.rsplit('.', 1)[0]}.{ext}"


def _load_object(
    job: tuple[ObjectRef, str, str, tuple[str, ...]],
) -> tuple[ObjectRef, RawObject | None, str]:
    ref, layout, reencode, views = job
    try:
        raw = read_object(ref, layout, views)
        return ref, raw if reencode == "none" else reencode_images(raw, reencode), ""
    except SampleError as error:
        return ref, None, str(error)
    except OSError as error:  # permission errors, vanished files: report the object, keep converting
        return ref, None, f"object {ref.object_id!r} in {ref.path}: {error}"


def _commit_shard(
    out: Path, plan: ShardPlan, tmp: Path, objects: list[str], manifest: dict[str, Any]
) -> None:
    final = out / plan.name
    os.replace(tmp, final)
    entry = {"name": plan.name, "split": plan.split, "samples": len(objects), "bytes": final.stat().st_size}
    entry.update({"sha256": sha256_file(final), "objects": objects})
    manifest["shards"].append(entry)
    write_manifest_atomic(out, manifest)


def _write_plans(
    out: Path, plans: list[ShardPlan], layout: str, opts: ConvertOptions, manifest: dict[str, Any]
) -> None:
    jobs = [(ref, layout, opts.reencode, opts.views) for plan in plans for ref in plan.objects]
    results = _map_ordered(_load_object, jobs, opts.workers)
    bar = tqdm(total=len(jobs), desc="convert", unit="obj")
    for plan in plans:
        tmp = out / f"{plan.name}.tmp"
        written: list[str] = []
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            for _ in plan.objects:
                ref, raw, problem = next(results)
                bar.update(1)
                if raw is None:
                    manifest["skipped"].append(
                        {"object_id": ref.object_id, "path": str(ref.path), "reason": problem}
                    )
                    continue
                add_sample(tar, raw)
                written.append(raw.object_id)
        if written:
            _commit_shard(out, plan, tmp, written, manifest)
        else:  # every object of this shard was invalid: keep the report, write no empty shard
            tmp.unlink()
            write_manifest_atomic(out, manifest)
    bar.close()


def _map_ordered(func: Callable, jobs: list, workers: int) -> Iterator:
    if workers <= 1:
        yield from map(func, jobs)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(func, jobs, chunksize=4)


def convert(src: str | Path, out: str | Path, opts: ConvertOptions) -> dict[str, Any]:
    """Convert the object folders under `src` into shards under `out`; resumes an interrupted run.

    Takes every object, or those of `opts.object_list` minus `opts.exclude_list` (`datapipes.selection`).
    Returns the final manifest (also written to ``out/manifest.json``); the caller decides what a
    conversion that wrote no object means. Raises ConvertError when `out` holds a manifest written with
    different options, LayoutError / SelectionError on an unusable source or list.
    """
    src, out = Path(src), Path(out)
    if opts.reencode not in REENCODE_FORMATS:
        raise ConvertError(f"reencode must be one of {REENCODE_FORMATS}, got {opts.reencode!r}")
    _check_views(opts.views)
    if not 0.0 <= opts.val_fraction < 1.0:  # also refuses NaN
        raise ConvertError(f"--val-fraction must be in [0, 1), got {opts.val_fraction}")
    objects = list_objects(src)
    layout = resolve_layout(src, opts.layout, objects)
    lists = {
        "object_list": read_id_list(opts.object_list, "--object-list") if opts.object_list else None,
        "exclude_list": read_id_list(opts.exclude_list, "--exclude-list") if opts.exclude_list else None,
    }
    selection = select_objects(objects, lists["object_list"], lists["exclude_list"], opts.allow_missing)
    warning = empty_val_warning([ref.object_id for ref in selection.objects], opts.val_fraction)
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
    manifest = _resume_or_new(src, out, layout, _option_record(opts, layout, lists), selection.report)
    done = {oid for shard in manifest["shards"] for oid in shard["objects"]}
    done |= {item["object_id"] for item in manifest["skipped"]}
    remaining = [ref for ref in selection.objects if ref.object_id not in done]
    first = {split: _next_index(manifest, split) for split in SPLITS}
    _write_plans(out, plan_shards(remaining, opts, first), layout, opts, manifest)
    manifest["complete"] = True
    write_manifest_atomic(out, manifest)
    return manifest


def _check_views(views: tuple[str, ...]) -> None:
    unknown = [view for view in views if view not in VIEW_NAMES]
    if unknown or len(set(views)) != len(views) or COND_VIEW not in views:
        raise ConvertError(
            f"--views {','.join(views)}: give distinct names of {list(VIEW_NAMES)} including "
            f"{COND_VIEW!r} (the condition view)"
        )


def empty_val_warning(object_ids: list[str], val_fraction: float) -> str | None:
    """A one-line warning when `val_fraction` > 0 puts none of the objects in val, with the share that would.

    The split is by id hash, so the smallest hash among the ids is the least fraction that selects one.
    (A fraction of 0 asks for no validation split and is not warned about.)
    """
    if val_fraction <= 0 or not object_ids:
        return None
    if any(split_of(oid, val_fraction) == "val" for oid in object_ids):
        return None
    smallest = min(stable_unit_hash(oid) for oid in object_ids)
    digits = max(3, 1 - math.floor(math.log10(max(smallest, 1e-12))))
    needed = math.ceil(smallest * 10**digits + 1e-9) / 10**digits
    return (
        f"--val-fraction {val_fraction:g} of {len(object_ids)} objects selects 0 for validation; "
        f"use --val-fraction >= {needed:g} to hold out at least one"
    )


def _next_index(manifest: dict[str, Any], split: str) -> int:
    # After the highest finished shard, not the count: a shard whose objects were all invalid leaves a gap,
    # and reusing its neighbour's number would overwrite a finished shard.
    names = [s["name"] for s in manifest["shards"] if s["split"] == split]
    return 1 + max((int(re.search(r"shard-(\d+)\.tar$", n).group(1)) for n in names), default=-1)


def _resume_or_new(
    src: Path, out: Path, layout: str, record: dict[str, Any], selection: dict[str, Any]
) -> dict[str, Any]:
    if not (out / MANIFEST_NAME).exists():
        _discard_unfinished(out, {"shards": []})
        manifest = new_manifest(src, layout, record, selection)
        write_manifest_atomic(out, manifest)
        return manifest
    manifest = load_manifest(out)
    if manifest["options"] != record:
        raise ConvertError(
            f"{out / MANIFEST_NAME} was written with options {manifest['options']}, this run uses "
            f"{record}; use the same options to resume or a new --out"
        )
    for name in _discard_unfinished(out, manifest):
        print(f"discarding unfinished shard {name}")
    manifest["selection"] = selection
    manifest["complete"] = False
    return manifest


# --------------------------------------------------------------------------------------------- verify


def verify(out: str | Path) -> list[str]:
    """Re-read every shard listed in the manifest; return a list of problems (empty = all good).

    Checks the file exists, its size and sha256, that it parses as a tar, and that the sample count and
    object ids (from each cameras.json) match the manifest.
    """
    out = Path(out)
    manifest = load_manifest(out)
    problems: list[str] = []
    for shard in tqdm(manifest["shards"], desc="verify", unit="shard"):
        path = out / shard["name"]
        if not path.is_file():
            problems.append(f"{shard['name']}: missing")
            continue
        if path.stat().st_size != shard["bytes"] or sha256_file(path) != shard["sha256"]:
            problems.append(f"{shard['name']}: size or sha256 differs from the manifest")
        try:
            ids = [raw.object_id for raw in iter_raw_objects(str(path))]
        except SampleError as error:
            problems.append(f"{shard['name']}: {error}")
            continue
        if ids != shard["objects"]:
            problems.append(f"{shard['name']}: holds {len(ids)} samples, manifest lists {shard['samples']}")
    return problems
