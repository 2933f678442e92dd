"""Shard URLs and tar reading: resolve URL specs, open local paths or ``pipe:`` URLs, group tar members.

URL specs accepted by `resolve_shards`:
- a brace pattern ``data/train/shard-{000000..000099}.tar`` (or a list of patterns / URLs);
- a list file ``*.txt`` with one URL or pattern per line (``#`` comments; relative paths are relative to it);
- a manifest ``OUT/manifest.json`` or the folder holding it (then `split` picks train or val and the sample
  counts are known);
- any URL webdataset's ``gopen`` opens: local paths, ``pipe:aws s3 cp s3://bucket/x.tar -``, ``http(s)://``.

Tar members are grouped into samples by key (the member name up to the first dot of its base name), the
webdataset convention. Read errors (a truncated or corrupt tar) surface as `SampleError` naming the shard and
the last object key read.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import braceexpand
from webdataset.gopen import gopen

from datapipes.manifest import MANIFEST_NAME, load_manifest, manifest_path, manifest_views
from datapipes.render_folder import CAMERAS_KEY, RawObject, parse_cameras_json
from datapipes.sample import SampleError


@dataclass(frozen=True)
class ShardInfo:
    """One shard URL and its sample count when a manifest gives it (None = unknown)."""

    url: str
    samples: int | None = None


@dataclass
class ShardEntry:
    """One sample's members as read from a tar (bytes, undecoded) or the read error that ended the shard.

    lost: for an error entry, the samples of the shard it stands for (the shard's remaining samples when
    its count is known, see `entries_of`; else 1, the sample being read). A sample entry stands for itself.
    """

    url: str
    key: str
    members: dict[str, bytes]
    error: SampleError | None = None
    lost: int = 1
    lost_exact: bool = False  # `lost` comes from the shard's known sample count


def _expand(pattern: str, base: Path | None) -> list[str]:
    urls = list(braceexpand.braceexpand(pattern))
    if base is None:
        return urls
    return [u if ":" in u.split("/")[0] or Path(u).is_absolute() else str(base / u) for u in urls]


def resolve_shards(spec: str | Path | list[str], split: str = "train") -> list[ShardInfo]:
    """Turn a URL spec (see module docstring) into the ordered list of shards."""
    if isinstance(spec, (list, tuple)):
        return [info for item in spec for info in resolve_shards(item, split)]
    text = str(spec)
    path = Path(text)
    if not text.startswith("pipe:") and (path.name == MANIFEST_NAME or (path / MANIFEST_NAME).is_file()):
        return _from_manifest(path if path.name == MANIFEST_NAME else path / MANIFEST_NAME, split)
    if text.endswith(".txt") and path.is_file():
        lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
        return [ShardInfo(url) for line in lines if line for url in _expand(line, path.parent)]
    return [ShardInfo(url) for url in _expand(text, None)]


def _from_manifest(path: Path, split: str) -> list[ShardInfo]:
    manifest = load_manifest(path)
    shards = [s for s in manifest["shards"] if s["split"] == split]
    return [ShardInfo(str(path.parent / s["name"]), int(s["samples"])) for s in shards]


def stored_views(spec: str, split: str = "train") -> tuple[tuple[str, ...], str, str] | None:
    """(views every sample stores, condition view, where that was read) for a URL spec, or None.

    A manifest says it for all its shards; otherwise the first sample of the first shard is read when
    that shard is a local file. None when neither is possible (remote shards, an empty spec).
    Raises ManifestError / SampleError when the manifest or that sample is unreadable.
    """
    path = Path(spec)
    if not spec.startswith("pipe:") and (path.name == MANIFEST_NAME or (path / MANIFEST_NAME).is_file()):
        views, cond_view = manifest_views(load_manifest(path))
        return views, cond_view, str(manifest_path(path))
    shards = resolve_shards(spec, split)
    if not shards or not Path(shards[0].url).is_file():
        return None
    for entry in iter_shard_entries(shards[0].url):
        record = raw_from_entry(entry).cameras
        return tuple(record["view_names"]), str(record["cond_view"]), f"{shards[0].url}#{entry.key}"
    return None


def _key_and_member(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, rest = base.partition(".")
    if not dot:
        return name, ""
    return (f"{folder}/{stem}" if folder else stem), rest


def iter_shard_entries(url: str) -> Iterator[ShardEntry]:
    """Yield the samples of one shard as undecoded ShardEntry groups.

    A read failure (truncated, corrupt header, unreadable URL) ends the shard with one entry whose `error`
    is a SampleError naming the shard and the last key; the complete samples before it are yielded first.
    """
    key, members = None, {}
    try:
        with gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                name_key, member = _key_and_member(info.name)
                if key is not None and name_key != key:
                    yield ShardEntry(url, key, members)
                    members = {}
                key = name_key
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError(
                        f"member {info.name} truncated ({len(data)} of {info.size} bytes)"
                    )
                if member in members:
                    raise tarfile.ReadError(f"member {info.name} appears twice")
                members[member] = data
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:
        if isinstance(error.__context__, GeneratorExit):
            return  # the consumer stopped early and closing a pipe: URL complained; nothing to report
        last = key or "<start of shard>"
        yield ShardEntry(url, last, members, SampleError(last, "tar", f"cannot read shard: {error}", url))
        return
    if key is not None:
        yield ShardEntry(url, key, members)


def entries_of(shard: ShardInfo) -> list[ShardEntry]:
    """All entries of one shard; a read error's entry says how many samples it cost (``lost``).

    With a known sample count (a manifest) that is the count minus the complete samples read before the
    error (0 when only the tar's end was damaged), so the loss is counted exactly. Python's tarfile reads a
    tar cut at a header boundary as a shorter, valid archive; the count shows it, and an error entry for
    the missing samples is added.
    """
    entries = list(iter_shard_entries(shard.url))
    if shard.samples is None:
        return entries
    if entries and entries[-1].error is not None:
        entries[-1].lost, entries[-1].lost_exact = max(0, shard.samples - (len(entries) - 1)), True
    elif len(entries) < shard.samples:
        last = entries[-1].key if entries else "<start of shard>"
        problem = f"cannot read shard: it ends after {len(entries)} of {shard.samples} samples (truncated?)"
        error = SampleError(last, "tar", problem, shard.url)
        entries.append(ShardEntry(shard.url, last, {}, error, shard.samples - len(entries), True))
    return entries


def raw_from_entry(entry: ShardEntry) -> RawObject:
    """Turn a shard entry into a RawObject (parses cameras.json); raises SampleError on a bad entry."""
    if entry.error is not None:
        raise entry.error
    source = f"{entry.url}#{entry.key}"
    if CAMERAS_KEY not in entry.members:
        raise SampleError(entry.key, CAMERAS_KEY, f"missing member (has {sorted(entry.members)})", source)
    record = parse_cameras_json(entry.members[CAMERAS_KEY], entry.key, source)
    files = {name: data for name, data in entry.members.items() if name != CAMERAS_KEY}
    return RawObject(str(record["object_id"]), record["layout"], files, record, source)


def iter_raw_objects(url: str) -> Iterator[RawObject]:
    """Every sample of a shard as a RawObject; raises SampleError at the first bad one."""
    for entry in iter_shard_entries(url):
        yield raw_from_entry(entry)


def count_samples(url: str) -> int:
    """Number of samples in a shard (reads it through; raises SampleError if it is unreadable)."""
    count = 0
    for entry in iter_shard_entries(url):
        if entry.error is not None:
            raise entry.error
        count += 1
    return count
