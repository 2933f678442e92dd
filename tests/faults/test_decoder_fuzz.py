"""Property-based fuzz of the sample decoder the DataLoader workers run (`datapipes.shards.decode_entry`:
tar member bytes -> `raw_from_entry` -> `decode_raw_object` -> `make_example`).

Valid members of one object (8x8 images, both layouts) are mutated -- truncated / garbage / empty image
bytes, images of other sizes, modes and formats, a header claiming a huge image, missing or renamed members,
bad or deeply nested cameras.json, NaN / huge / wrongly typed fields, wrong view names -- and the decoder
must return a valid example or raise SampleError: never another exception (which would kill the worker
and the run) and never hang. Case counts: see tests/faults/conftest.py (1,000 in CI, 10,000 nightly).
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import zlib
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from datapipes.cameras import reference_rig_array
from datapipes.render_folder import CAMERAS_KEY, LAYOUTS, cameras_json_bytes, cameras_record
from datapipes.sample import VIEW_NAMES, SampleError
from datapipes.shard_io import ShardEntry
from datapipes.shards import decode_entry
from datapipes.transform import TransformOptions, check_example
from tests.datapipes.fixtures_stream import disc_images

RES = 8  # tiny images keep 1,000 cases within seconds
URL = "fuzz/shard-000000.tar"
OPTIONS = (
    TransformOptions(resolution=RES, num_views=6, background="random", clip_size=RES),
    TransformOptions(resolution=RES, num_views=2, background="white", clip_size=RES, views=("front", "back")),
)
MODES = ("1", "L", "LA", "P", "I", "I;16", "F", "RGB", "RGBA", "CMYK", "YCbCr")
FORMATS = ("PNG", "TIFF", "JPEG", "WEBP", "GIF", "BMP")
HANG_SECONDS = 10  # a single case running this long is a hang, whatever the machine


def fuzz_settings() -> settings:
    """The profile named by GNN3D_FUZZ_PROFILE (ci | nightly), with GNN3D_FUZZ_EXAMPLES cases if set."""
    profile = settings.get_profile(os.environ.get("GNN3D_FUZZ_PROFILE", "ci"))
    examples = os.environ.get("GNN3D_FUZZ_EXAMPLES")
    return settings(profile, max_examples=int(examples)) if examples else profile


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def _base_members(layout: str) -> dict[str, bytes]:
    """The members of one valid shard sample, as the converter writes them."""
    members: dict[str, bytes] = {}
    for index, view in enumerate(VIEW_NAMES):
        color, normal = disc_images(7, index, RES)
        if layout == "wonder3d":
            members[f"rgb_{view}.png"] = _encode(Image.fromarray(color[..., :3], "RGB"))
            members[f"normals_{view}.png"] = _encode(Image.fromarray(normal[..., :3], "RGB"))
            members[f"mask_{view}.png"] = _encode(Image.fromarray(color[..., 3], "L"))
        else:
            members[f"rgb_{view}.png"] = _encode(Image.fromarray(color, "RGBA"))
            members[f"normals_{view}.png"] = _encode(Image.fromarray(normal, "RGBA"))
    record = cameras_record("obj-0", layout, VIEW_NAMES, reference_rig_array(), {}, {})
    members[CAMERAS_KEY] = cameras_json_bytes(record)
    return members


def _other_encodings() -> list[bytes]:
    """An 8x8 image in every mode / format pair PIL can write (other modes than the decoder expects)."""
    pixels = Image.fromarray(disc_images(3, 0, RES)[0], "RGBA")
    found = []
    for mode in MODES:
        for fmt in FORMATS:
            try:
                found.append(_encode(pixels.convert(mode), fmt))
            except (OSError, ValueError, KeyError):
                continue  # this format cannot store this mode
    return found


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds one row of data (a decompression-bomb header)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    chunk = lambda kind, body: (  # noqa: E731
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    )
    data = zlib.compress(b"\0" + b"\0" * 4 * min(width, 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


BASE = {layout: _base_members(layout) for layout in LAYOUTS}
ENCODINGS = _other_encodings()
IMAGE_KINDS = ("rgb", "normals", "mask")
IDENTITY_FIELDS = (
    "format",
    "object_id",
    "layout",
    "view_names",
    "cond_view",
    "w2c",
)  # what the decoder reads
VIEW_LIKE = st.sampled_from([*VIEW_NAMES, "top", "FRONT", "", "front.png", "front_right_", "back "])
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)  # beyond float64: OverflowError bait
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.text(
        st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2
    )  # lone surrogates
    | VIEW_LIKE
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(VIEW_LIKE | st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=12,
)
pose_like = st.lists(
    st.lists(json_scalars | st.floats(-2, 2), min_size=0, max_size=5), min_size=0, max_size=5
)


def _image_keys(members: dict[str, bytes]) -> list[str]:
    return sorted(key for key in members if key != CAMERAS_KEY)


def _new_image_bytes(draw, old: bytes) -> bytes:
    choice = draw(st.sampled_from(("truncate", "empty", "garbage", "flip", "size", "encoding", "bomb")))
    if choice == "truncate":
        return old[: draw(st.integers(0, max(0, len(old) - 1)))]
    if choice == "empty":
        return b""
    if choice == "garbage":
        return draw(st.binary(max_size=128))
    if choice == "flip":
        position = draw(st.integers(0, len(old) - 1)) if old else 0
        return (
            old[:position]
            + bytes([(old[position] if old else 0) ^ draw(st.integers(1, 255))])
            + old[position + 1 :]
        )
    if choice == "size":
        width, height = draw(st.integers(1, 16)), draw(st.integers(1, 16))
        return _encode(Image.new("RGBA", (width, height), (200, 10, 10, 255)))
    if choice == "encoding":
        return draw(st.sampled_from(ENCODINGS))
    return _png_claiming(draw(st.sampled_from((0, 1, 9000, 70000, 2**31 - 1))), draw(st.integers(1, 70000)))


def _mutate_image(draw, members: dict[str, bytes]) -> None:
    keys = _image_keys(members)
    if keys:
        key = draw(st.sampled_from(keys))
        members[key] = _new_image_bytes(draw, members[key])


def _drop_member(draw, members: dict[str, bytes]) -> None:
    if members:
        del members[draw(st.sampled_from(sorted(members)))]


def _rename_member(draw, members: dict[str, bytes]) -> None:
    keys = _image_keys(members)
    if keys:
        kind, view = draw(st.sampled_from(IMAGE_KINDS)), draw(VIEW_LIKE)
        ext = draw(st.sampled_from(("png", "webp", "jpg", "", "png.png")))
        members[f"{kind}_{view}.{ext}"] = members.pop(draw(st.sampled_from(keys)))


def _mutate_cameras_bytes(draw, members: dict[str, bytes]) -> None:
    old = members.get(CAMERAS_KEY, b"{}")
    choice = draw(st.sampled_from(("garbage", "truncate", "nested", "not-utf8", "constant", "list")))
    members[CAMERAS_KEY] = {
        "garbage": lambda: draw(st.binary(max_size=64)),
        "truncate": lambda: old[: draw(st.integers(0, max(0, len(old) - 1)))],
        "nested": lambda: b"[" * draw(st.integers(1, 200_000)) + b"]" * draw(st.integers(0, 3)),
        "not-utf8": lambda: b"\xff\xfe" + old,
        "constant": lambda: draw(st.sampled_from((b"NaN", b"-Infinity", b"1e999", b"null", b"0", b'"x"'))),
        "list": lambda: b"[" + old + b"]",
    }[choice]()


def _record(members: dict[str, bytes]) -> dict | None:
    try:
        record = json.loads(members.get(CAMERAS_KEY, b""))
    except (ValueError, RecursionError):  # an earlier mutation already broke it
        return None
    return record if isinstance(record, dict) else None


def _mutate_cameras_field(draw, members: dict[str, bytes]) -> None:
    record = _record(members)
    if record is None:
        return
    field = draw(st.sampled_from(sorted(record)) | st.sampled_from(IDENTITY_FIELDS))
    if draw(st.integers(0, 3)) == 0:
        record.pop(field, None)
    elif field == "view_names":
        record[field] = draw(st.lists(VIEW_LIKE, max_size=7) | json_values)
    elif field == "cond_view":
        record[field] = draw(VIEW_LIKE | json_values)
    elif field == "object_id":  # ids are hashed as UTF-8: strings that are valid JSON but not UTF-8
        record[field] = draw(st.sampled_from(("\ud800", "obj\udfff", "", "é")) | json_scalars)
    else:
        record[field] = draw(json_values)
    members[CAMERAS_KEY] = json.dumps(record, allow_nan=True).encode()


def _mutate_pose(draw, members: dict[str, bytes]) -> None:
    record = _record(members)
    if record is None or not isinstance(record.get("w2c"), dict) or not record["w2c"]:
        return
    view = draw(st.sampled_from(sorted(record["w2c"])))
    pose = record["w2c"][view]
    if draw(st.booleans()) and isinstance(pose, list) and pose and isinstance(pose[0], list) and pose[0]:
        row, col = draw(st.integers(0, len(pose) - 1)), draw(st.integers(0, len(pose[0]) - 1))
        if isinstance(pose[row], list) and col < len(pose[row]):
            pose[row][col] = draw(json_scalars)
    else:
        record["w2c"][view] = draw(pose_like | json_values)
    members[CAMERAS_KEY] = json.dumps(record, allow_nan=True).encode()


MUTATIONS: tuple[Callable, ...] = (
    _mutate_image,
    _drop_member,
    _rename_member,
    _mutate_cameras_bytes,
    _mutate_cameras_field,
    _mutate_pose,
)


@st.composite
def damaged_entries(draw) -> ShardEntry:
    """A shard entry: a valid sample of either layout with 0-3 random mutations."""
    members = dict(BASE[draw(st.sampled_from(LAYOUTS))])
    for _ in range(draw(st.integers(0, 3))):
        draw(st.sampled_from(MUTATIONS))(draw, members)
    return ShardEntry(URL, "obj-0", members)


@st.composite
def damaged_cameras(draw) -> ShardEntry:
    """A valid sample with exactly one cameras.json field changed: the record's own checks must hold."""
    members = dict(BASE[draw(st.sampled_from(LAYOUTS))])
    draw(st.sampled_from((_mutate_cameras_field, _mutate_pose)))(draw, members)
    return ShardEntry(URL, "obj-0", members)


@contextmanager
def _hang_guard(seconds: int):
    """Fail a case that runs `seconds` (SIGALRM): a true hang would never reach hypothesis' deadline check."""

    def _raise(signum, frame):
        raise TimeoutError(f"decoder hung for {seconds} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def decode_or_sample_error(entry: ShardEntry, opts: TransformOptions) -> dict | None:
    """The worker's decode; None when it raised SampleError (anything else propagates and fails the test)."""
    with _hang_guard(HANG_SECONDS):
        try:
            return decode_entry(entry, opts, seed=0, epoch=0)
        except SampleError:
            return None


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("opts", OPTIONS, ids=("6-views", "2-views"))
def test_unmutated_members_decode(layout, opts):
    """The fuzz starts from members that decode: a mutation, not the base, is what fails."""
    example = decode_or_sample_error(ShardEntry(URL, "obj-0", dict(BASE[layout])), opts)
    assert example is not None
    check_example(example, opts, "obj-0")


def assert_valid_or_sample_error(entry: ShardEntry, opts: TransformOptions) -> None:
    example = decode_or_sample_error(entry, opts)
    if example is not None:
        check_example(example, opts, example["object_id"])
        assert isinstance(example["object_id"], str) and example["object_id"]
        assert all(np.isfinite(v.numpy()).all() for k, v in example.items() if k != "object_id")


@fuzz_settings()
@given(entry=damaged_entries(), opts=st.sampled_from(OPTIONS))
def test_decoder_gives_a_valid_example_or_sample_error(entry, opts):
    assert_valid_or_sample_error(entry, opts)


@fuzz_settings()
@given(entry=damaged_cameras(), opts=st.sampled_from(OPTIONS))
def test_decoder_on_one_bad_cameras_field(entry, opts):
    """Few mutations at once reach the checks behind the first one: a fuzz of single-field changes."""
    assert_valid_or_sample_error(entry, opts)
