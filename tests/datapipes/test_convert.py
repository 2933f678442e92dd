"""Converter: byte-identical round trip, manifest, split, malformed objects, resume, verify, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from fixtures_stream import make_render_root, write_render_script_object

import datapipes.convert as convert_module
from datapipes.convert import (
    ConvertError,
    ConvertOptions,
    convert,
    parse_size,
    plan_shards,
    verify,
)
from datapipes.manifest import load_manifest
from datapipes.render_folder import decode_raw_object, list_objects, read_sample, split_of
from datapipes.sample import VIEW_NAMES
from datapipes.shard_io import iter_raw_objects

REPO = Path(__file__).resolve().parents[2]


def _shard_objects(out: Path) -> dict[str, object]:
    manifest = load_manifest(out)
    return {
        raw.object_id: raw
        for shard in manifest["shards"]
        for raw in iter_raw_objects(str(out / shard["name"]))
    }


@pytest.mark.parametrize("layout", ["render-script", "wonder3d"])
def test_round_trip_is_byte_identical(tmp_path, layout):
    ids = make_render_root(tmp_path / "src", 5, layout=layout, res=16)
    manifest = convert(
        tmp_path / "src", tmp_path / "out", ConvertOptions(samples_per_shard=2, val_fraction=0.3)
    )
    assert manifest["complete"] and manifest["layout"] == layout and manifest["skipped"] == []
    raws = _shard_objects(tmp_path / "out")
    assert sorted(raws) == ids
    kinds = ("rgb", "normals", "mask") if layout == "wonder3d" else ("rgb", "normals")
    for ref in list_objects(tmp_path / "src"):
        raw = raws[ref.object_id]
        assert set(raw.files) == {f"{k}_{v}.png" for k in kinds for v in VIEW_NAMES}
        for kind in kinds:
            for view in VIEW_NAMES:
                assert raw.files[f"{kind}_{view}.png"] == (ref.path / f"{kind}_000_{view}.png").read_bytes()
        assert raw.cameras["object_id"] == ref.object_id and raw.cameras["layout"] == layout
        assert raw.cameras["image_sizes"]["rgb_front.png"] == [16, 16]
        if layout == "render-script":
            np.testing.assert_array_equal(
                raw.cameras["w2c"]["back"], np.loadtxt(ref.path / "000_back_RT.txt")
            )
    for shard in manifest["shards"]:
        assert all(split_of(oid, 0.3) == shard["split"] for oid in shard["objects"])
        assert shard["samples"] == len(shard["objects"]) <= 2
    assert manifest["splits"]["train"]["samples"] + manifest["splits"]["val"]["samples"] == 5
    assert verify(tmp_path / "out") == []


def test_conversion_is_deterministic_and_worker_independent(tmp_path):
    make_render_root(tmp_path / "src", 6, res=16)
    a = convert(tmp_path / "src", tmp_path / "a", ConvertOptions(samples_per_shard=2, val_fraction=0.0))
    b = convert(
        tmp_path / "src", tmp_path / "b", ConvertOptions(samples_per_shard=2, val_fraction=0.0, workers=2)
    )
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert len(a["shards"]) == 3


def test_malformed_objects_are_reported_not_dropped(tmp_path):
    src = tmp_path / "src"
    make_render_root(src, 4, res=16)
    bad_view = write_render_script_object(src, "ee_missing", seed=9, res=16)
    (bad_view / "rgb_000_back.png").unlink()
    bad_rt = write_render_script_object(src, "ee_badrt", seed=9, res=16)
    (bad_rt / "000_left_RT.txt").write_text("1 2 3\n")
    bad_image = write_render_script_object(src, "ee_unreadable", seed=9, res=16)
    (bad_image / "normals_000_front.png").write_bytes(b"\x89PNG garbage")
    manifest = convert(src, tmp_path / "out", ConvertOptions(samples_per_shard=3, val_fraction=0.0))
    reasons = {item["object_id"]: item["reason"] for item in manifest["skipped"]}
    assert set(reasons) == {"ee_missing", "ee_badrt", "ee_unreadable"}
    assert "rgb_000_back" in reasons["ee_missing"] and "000_left_RT.txt" in reasons["ee_badrt"]
    assert "normals_000_front.png" in reasons["ee_unreadable"]
    assert manifest["splits"]["train"]["samples"] == 4
    result = subprocess.run(
        [sys.executable, "launcher/convert.py", "--src", str(src), "--out", str(tmp_path / "cli"),
         "--samples-per-shard", "3", "--val-fraction", "0", "--verify"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "SKIPPED ee_badrt" in result.stdout and "verify: ok" in result.stdout


def crash_on_third_commit(monkeypatch) -> tuple:
    """Make the converter crash (KeyboardInterrupt) while committing its third shard, as a kill would.

    Returns (the real commit function, the list of shards committed before the crash)."""
    real_commit, commits = convert_module._commit_shard, []

    def crash_on_third(out, plan, tmp, objects, manifest):
        if len(commits) == 2:
            raise KeyboardInterrupt("simulated crash while a shard is half written")
        commits.append(plan.name)
        real_commit(out, plan, tmp, objects, manifest)

    monkeypatch.setattr(convert_module, "_commit_shard", crash_on_third)
    return real_commit, commits


def test_interrupted_conversion_resumes_without_loss_or_duplicates(tmp_path, monkeypatch):
    src = tmp_path / "src"
    ids = make_render_root(src, 9, res=16)
    opts = ConvertOptions(samples_per_shard=2, val_fraction=0.0)
    reference = convert(src, tmp_path / "ref", opts)
    real_commit, _ = crash_on_third_commit(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "out", opts)
    partial = load_manifest(tmp_path / "out")
    assert not partial["complete"] and len(partial["shards"]) == 2
    assert (tmp_path / "out" / "train" / "shard-000002.tar.tmp").exists()  # the half-written shard
    (tmp_path / "out" / "train" / "shard-000003.tar").write_bytes(b"renamed but never listed")
    monkeypatch.setattr(convert_module, "_commit_shard", real_commit)
    final = convert(src, tmp_path / "out", opts)
    listed = [oid for shard in final["shards"] for oid in shard["objects"]]
    assert sorted(listed) == ids and len(listed) == len(set(listed))
    assert [s["sha256"] for s in final["shards"]] == [s["sha256"] for s in reference["shards"]]
    assert not list((tmp_path / "out").rglob("*.tmp"))
    assert verify(tmp_path / "out") == []


def test_resume_with_other_options_is_refused(tmp_path):
    make_render_root(tmp_path / "src", 2, res=16)
    convert(tmp_path / "src", tmp_path / "out", ConvertOptions(samples_per_shard=2))
    with pytest.raises(ConvertError, match="same options"):
        convert(tmp_path / "src", tmp_path / "out", ConvertOptions(samples_per_shard=3))


def test_verify_detects_corruption_and_missing_shards(tmp_path):
    make_render_root(tmp_path / "src", 4, res=16)
    convert(tmp_path / "src", tmp_path / "out", ConvertOptions(samples_per_shard=2, val_fraction=0.0))
    first, second = tmp_path / "out/train/shard-000000.tar", tmp_path / "out/train/shard-000001.tar"
    data = bytearray(first.read_bytes())
    data[700] ^= 0xFF
    first.write_bytes(bytes(data))
    second.unlink()
    problems = verify(tmp_path / "out")
    assert any("shard-000000" in p and "sha256" in p for p in problems)
    assert any("shard-000001" in p and "missing" in p for p in problems)


def test_byte_budget_planning(tmp_path):
    make_render_root(tmp_path / "src", 6, res=16)
    objects = list_objects(tmp_path / "src")
    one = convert_module._estimate_bytes(objects[0])
    plans = plan_shards(objects, ConvertOptions(shard_bytes=int(2.5 * one), val_fraction=0.0), {})
    assert [len(p.objects) for p in plans] == [2, 2, 2]
    manifest = convert(
        tmp_path / "src", tmp_path / "out", ConvertOptions(shard_bytes=int(2.5 * one), val_fraction=0)
    )
    assert all(s["bytes"] <= 2.5 * one for s in manifest["shards"])
    with tarfile.open(tmp_path / "out/train/shard-000000.tar") as tar:
        assert all(m.mtime == 0 and m.uname == "" for m in tar.getmembers())


def test_parse_size():
    assert parse_size("1GB") == 10**9 and parse_size("64MiB") == 64 * 2**20 and parse_size("1000") == 1000
    with pytest.raises(ValueError):
        parse_size("lots")


def test_manifest_is_strict_json(tmp_path):
    make_render_root(tmp_path / "src", 2, res=16)
    convert(tmp_path / "src", tmp_path / "out", ConvertOptions(samples_per_shard=1, val_fraction=0.0))
    text = (tmp_path / "out" / "manifest.json").read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-strict JSON constant {name}"))


def test_resume_after_an_all_invalid_shard_never_overwrites_a_finished_one(tmp_path, monkeypatch):
    src = tmp_path / "src"
    ids = make_render_root(src, 8, res=16)
    for uid in ids[2:4]:  # exactly the objects of the second shard
        next(src.glob(f"*/{uid}/000_front_RT.txt")).write_text("bad")
    opts = ConvertOptions(samples_per_shard=2, val_fraction=0.0)
    real_commit, commits = crash_on_third_commit(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "out", opts)
    assert commits == ["train/shard-000000.tar", "train/shard-000002.tar"]
    monkeypatch.setattr(convert_module, "_commit_shard", real_commit)
    final = convert(src, tmp_path / "out", opts)
    listed = [oid for shard in final["shards"] for oid in shard["objects"]]
    assert sorted(listed) == ids[:2] + ids[4:] and len(set(listed)) == 6
    assert sorted(item["object_id"] for item in final["skipped"]) == ids[2:4]
    assert verify(tmp_path / "out") == []


def test_reencode_on_request_keeps_pixels(tmp_path):
    src = tmp_path / "src"
    write_render_script_object(src, "ff01", seed=4, res=16, ext="webp")
    convert(src, tmp_path / "out", ConvertOptions(samples_per_shard=2, val_fraction=0.0, reencode="png"))
    (raw,) = _shard_objects(tmp_path / "out").values()
    assert set(raw.files) == {f"{k}_{v}.png" for k in ("rgb", "normals") for v in VIEW_NAMES}
    assert raw.cameras["source_files"]["rgb_front.png"] == "rgb_000_front.webp"
    shard_sample = decode_raw_object(raw)
    folder_sample = read_sample(list_objects(src)[0], "render-script")
    np.testing.assert_array_equal(shard_sample.color_rgba, folder_sample.color_rgba)
    np.testing.assert_array_equal(shard_sample.normal_rgba, folder_sample.normal_rgba)
