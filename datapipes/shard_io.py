"""Shard URLs and tar reading: resolve URL specs, open local paths or ``pipe:`` URLs, group tar members.

URL specs accepted by `resolve_shards`:
- a brace pattern ``data/train/shard-{000000..000099}.tar`` (or a list of patterns / URLs);
- a list file ``*.txt`` with one URL or pattern per line (``#`` comments; relative paths are relative to it);
- a manifest ``OUT/manifest.json`` or the folder holding it (then `split` picks train or val and the sample
  counts are known);
- any URL webdataset's ``gopen`` opens: local paths, ``pipe:aws s3 cp s3://bucket/x.tar -``, ``http(s)://``.

Tar members are grouped into samples by key (the member name up to the first dot of its base name), the
webdataset convention. Read errors (a truncated or corrupt tar, a missing file) surface as `SampleError`
naming the shard and the last object key read.

Two ways to read a shard: `iter_shard_entries` streams it in order (any URL); for a local ``.tar``
(`is_seekable`), `index_shard` reads only the tar headers and `read_indexed` reads one sample's members by
offset -- what lets a training worker read just the samples of its own windows (datapipes.shards).
"""

from __future__ import annotations

import os
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
    """One sample's members as read from a tar (bytes, undecoded), or the read error that ended the shard."""

    url: str
    key: str
    members: dict[str, bytes]
    error: SampleError | None = None


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


class _MemberGroups:
    """Groups a tar's file members into samples by key; `key` is the sample being read (for error messages)."""

    def __init__(self) -> None:
        self.key: str | None = None

    def groups(self, tar: tarfile.TarFile, payload) -> Iterator[tuple[str, dict]]:
        """(key, {member: payload(info)}) per sample; a member twice in one sample is a tarfile.ReadError."""
        members: dict = {}
        for info in tar:
            if not info.isfile():
                continue
            name_key, member = _key_and_member(info.name)
            if self.key is not None and name_key != self.key:
                yield self.key, members
                members = {}
            self.key = name_key
            if member in members:
                raise tarfile.ReadError(f"member {info.name} appears twice")
            members[member] = payload(tar, info)
        if self.key is not None:
            yield self.key, members


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    data = tar.extractfile(info).read()
    if len(data) != info.size:
        raise tarfile.ReadError(f"member {info.name} truncated ({len(data)} of {info.size} bytes)")
    return data


def _read_error(url: str, key: str | None, error: Exception) -> SampleError:
    last = key or "<start of shard>"
    return SampleError(last, "tar", f"cannot read shard: {error}", url)


_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)


def iter_shard_entries(url: str) -> Iterator[ShardEntry]:
    """Yield the samples of one shard as undecoded ShardEntry groups (reads the whole shard in order).

    A read failure (truncated, corrupt header, unreadable URL) ends the shard with one entry whose `error`
    is a SampleError naming the shard and the last key; the complete samples before it are yielded first.
    """
    grouping = _MemberGroups()
    try:
        with gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for key, members in grouping.groups(tar, _read_member):
                yield ShardEntry(url, key, members)
    except _TAR_ERRORS as error:
        if isinstance(error.__context__, GeneratorExit):
            return  # the consumer stopped early and closing a pipe: URL complained; nothing to report
        error_key = grouping.key
        yield ShardEntry(url, error_key or "<start of shard>", {}, _read_error(url, error_key, error))


# ------------------------------------------------------------------------------------- random access


def is_seekable(url: str) -> bool:
    """A local uncompressed tar: samples can be read by offset (`index_shard`) instead of streaming it."""
    return not url.startswith("pipe:") and "://" not in url and url.endswith(".tar")


@dataclass
class ShardIndex:
    """Member offsets of one local shard's samples, from its tar headers only (no member data read).

    samples[i] = (key, {member: (offset, size)}) for the complete samples; `error` is the read failure that
    ended the index (a truncated or corrupt tar, a missing file), None when the whole tar was read.
    """

    url: str
    samples: list[tuple[str, dict[str, tuple[int, int]]]]
    error: SampleError | None = None


def index_shard(url: str) -> ShardIndex:
    """Index a local tar (see `ShardIndex`): reads the headers, seeking over the data."""
    grouping, samples = _MemberGroups(), []
    try:
        # unbuffered: a buffered file would read 8 KiB per 512-byte header, i.e. most of a small-member tar
        with open(url, "rb", buffering=0) as file, tarfile.open(fileobj=file, mode="r:") as tar:
            size = os.fstat(file.fileno()).st_size

            def span(_tar: tarfile.TarFile, info: tarfile.TarInfo) -> tuple[int, int]:
                if info.offset_data + info.size > size:
                    got = max(0, size - info.offset_data)
                    raise tarfile.ReadError(f"member {info.name} truncated ({got} of {info.size} bytes)")
                return info.offset_data, info.size

            samples.extend(grouping.groups(tar, span))
    except _TAR_ERRORS as error:
        # the sample being grouped when the error hit is incomplete: only the ones before it count
        return ShardIndex(url, samples, _read_error(url, grouping.key, error))
    return ShardIndex(url, samples)


def read_indexed(index: ShardIndex, sample: int) -> ShardEntry:
    """One sample of an indexed shard, read by offset; a read failure gives an error entry."""
    key, spans = index.samples[sample]
    first = min(offset for offset, _ in spans.values())
    stop = max(offset + size for offset, size in spans.values())
    try:
        with open(index.url, "rb", buffering=0) as file:  # one read: a sample's members are contiguous
            file.seek(first)
            data = file.read(stop - first)
        if len(data) != stop - first:
            raise tarfile.ReadError(f"sample {key} truncated ({len(data)} of {stop - first} bytes)")
        members = {
            member: data[offset - first : offset - first + size] for member, (offset, size) in spans.items()
        }
    except _TAR_ERRORS as error:
        return ShardEntry(index.url, key, {}, _read_error(index.url, key, error))
    return ShardEntry(index.url, key, members)


def shard_name(url: str) -> str:
    """The shard's file name in a URL (``pipe:cat /d/shard-000001.tar`` -> ``shard-000001.tar``): what
    identifies a shard when the data set moves."""
    tars = [token for token in url.split() if ".tar" in token]
    return (tars[-1] if tars else url).rstrip("/").rsplit("/", 1)[-1]


def count_slots(url: str) -> tuple[int, bool]:
    """(samples, exact) of a shard without a manifest count: the complete samples, plus one slot for a read
    error that ended the shard (exact False: the samples after it are unknown). Local tars: headers only."""
    if is_seekable(url):
        index = index_shard(url)
        return len(index.samples) + (index.error is not None), index.error is None
    count = 0
    for entry in iter_shard_entries(url):
        if entry.error is not None:
            return count + 1, False
        count += 1
    return count, True


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
