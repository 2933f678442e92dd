"""Converter command line: layout detection by evidence, 0 objects is an error, empty-val warning,
the reference's object / invalid lists. User mistakes end in one line and exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures_stream import make_render_root, write_render_script_object, write_wonder3d_object

from datapipes.manifest import load_manifest
from datapipes.render_folder import LayoutError, detect_layout, split_of
from launcher import convert as convert_cli

REPO = Path(__file__).resolve().parents[2]


def run_cli(capsys, *args) -> tuple[int, str, list[str]]:
    """(exit status, stdout, stderr lines) of launcher/convert.py run in-process; never a traceback."""
    try:
        code = convert_cli.main([str(arg) for arg in args])
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err.splitlines()


def _errors(lines: list[str]) -> list[str]:
    return [line for line in lines if "error:" in line]


def _report(stdout: str) -> dict:
    return json.loads(stdout.splitlines()[0])


def _converted(out: Path) -> list[str]:
    return sorted(oid for shard in load_manifest(out)["shards"] for oid in shard["objects"])


def _mixed_tree(root: Path, render_script: int, wonder3d: int) -> None:
    """Objects "a000".. in the render-script layout, then "b000".. in the wonder3d layout (id order)."""
    for index in range(render_script):
        write_render_script_object(root, f"a{index:03d}", index, res=8)
    for index in range(wonder3d):
        write_wonder3d_object(root, f"b{index:03d}", index, res=8)


# --------------------------------------------------------------------------------------------- layout


def test_one_stray_rt_file_does_not_flip_the_layout(tmp_path, capsys):
    src = tmp_path / "src"
    ids = make_render_root(src, 12, layout="wonder3d", res=8)
    np.savetxt(src / ids[0][:3] / ids[0] / "000_front_RT.txt", np.eye(3, 4))  # in the first folder
    assert detect_layout(src) == "wonder3d"
    code, stdout, err = run_cli(capsys, "--src", src, "--out", tmp_path / "out", "--samples-per-shard", 4)
    assert (code, _errors(err)) == (0, [])
    assert _report(stdout)["layout"] == "wonder3d" and _converted(tmp_path / "out") == ids


def test_a_mixed_tree_is_refused_with_the_evidence(tmp_path, capsys):
    _mixed_tree(tmp_path / "src", 4, 4)
    with pytest.raises(LayoutError) as err:
        detect_layout(tmp_path / "src")
    for words in ("of 8 sampled", "4 have RT files", "4 have masks", "--layout"):
        assert words in str(err.value)
    code, _, err = run_cli(capsys, "--src", tmp_path / "src", "--out", tmp_path / "out")
    assert code == 2 and len(_errors(err)) == 1 and "cannot detect the layout" in _errors(err)[0]


def test_detection_samples_the_whole_tree_not_its_head(tmp_path):
    # 20 render-script objects first in id order, 60 wonder3d after: the head alone says render-script,
    # votes spread over the tree (about 16 : 48) are too close to call.
    _mixed_tree(tmp_path, 20, 60)
    with pytest.raises(LayoutError, match=r"of 64 sampled object folders 16 have RT files"):
        detect_layout(tmp_path)


def test_a_conversion_that_converts_nothing_exits_2(tmp_path):
    make_render_root(tmp_path / "src", 3, layout="wonder3d", res=8)
    cmd = [
        sys.executable,
        "launcher/convert.py",
        "--src",
        str(tmp_path / "src"),
        "--out",
        str(tmp_path / "o"),
    ]
    done = subprocess.run([*cmd, "--layout", "render-script"], cwd=REPO, capture_output=True, text=True)
    errors = _errors(done.stderr.splitlines())
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(errors) == 1 and "0 objects converted" in errors[0] and "3 skipped" in errors[0]
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------------------------- val split


def test_a_val_fraction_that_selects_nothing_warns_with_the_share_that_would(tmp_path, capsys):
    ids = make_render_root(tmp_path / "src", 6, res=8)
    fraction = 1e-6
    assert all(split_of(oid, fraction) == "train" for oid in ids)
    code, _, err = run_cli(
        capsys, "--src", tmp_path / "src", "--out", tmp_path / "a", "--val-fraction", fraction
    )
    warnings = [line for line in err if line.startswith("WARNING")]
    assert code == 0 and len(warnings) == 1, err
    assert "--val-fraction 1e-06 of 6 objects selects 0" in warnings[0]
    needed = float(warnings[0].rsplit(">= ", 1)[1].split()[0])
    assert any(split_of(oid, needed) == "val" for oid in ids)  # the advice is right
    code, _, err = run_cli(
        capsys, "--src", tmp_path / "src", "--out", tmp_path / "b", "--val-fraction", needed
    )
    assert not any(line.startswith("WARNING") for line in err)
    assert load_manifest(tmp_path / "b")["splits"]["val"]["samples"] >= 1


# --------------------------------------------------------------------------------------------- id lists


def _write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value))
    return path


def test_object_and_exclude_lists_select_exactly_the_reference_objects(tmp_path, capsys):
    ids = make_render_root(tmp_path / "src", 6, res=8)
    # The reference's lists hold paths to the .glb files as well as bare ids.
    listed = [f"glbs/000-001/{ids[0]}.glb", ids[1], f"{ids[2]}.glb", ids[3]]
    objects = _write_json(tmp_path / "object_list.json", listed)
    invalid = _write_json(tmp_path / "invalid_list.json", [ids[3], "not-rendered-at-all"])
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        capsys, "--src", tmp_path / "src", "--out", out, "--object-list", objects, "--exclude-list", invalid
    )
    assert (code, _errors(err)) == (0, [])
    assert _converted(out) == sorted(ids[:3])
    selection = _report(stdout)["selection"]
    assert selection["listed"] == 4 and selection["excluded"] == 1 and selection["selected"] == 3
    assert selection["exclude_ids_not_in_source"] == 1 and selection["missing_from_source"] == 0
    assert load_manifest(out)["selection"] == selection
    # a resume must use the same lists
    _write_json(objects, listed[:2])
    code, _, err = run_cli(capsys, "--src", tmp_path / "src", "--out", out, "--object-list", objects)
    assert code == 2 and "same options" in _errors(err)[0]


@pytest.mark.parametrize(
    "content, words",
    [
        (None, ["--object-list", "cannot read"]),
        ("[not json", ["--object-list", "not valid JSON"]),
        ('{"a": 1}', ["--object-list", "JSON list of object id strings"]),
        (
            '["gone1", "gone2"]',
            ["--object-list", "2 of 3 ids are not in the source", "gone1", "--allow-missing"],
        ),
    ],
    ids=["missing_file", "bad_json", "not_a_list", "ids_not_in_source"],
)
def test_unusable_object_list_is_one_line_exit_2(tmp_path, capsys, content, words):
    ids = make_render_root(tmp_path / "src", 2, res=8)
    path = tmp_path / "object_list.json"
    if content is not None:
        path.write_text(content.replace('"gone1", ', f'"gone1", "{ids[0]}", '))
    code, _, err = run_cli(capsys, "--src", tmp_path / "src", "--out", tmp_path / "o", "--object-list", path)
    errors = _errors(err)
    assert code == 2 and len(errors) == 1, err
    for word in [*words, str(path)]:
        assert word in errors[0], f"{word!r} missing from {errors[0]!r}"
    assert not (tmp_path / "o" / "manifest.json").exists()  # refused before anything is written


def test_allow_missing_converts_the_present_ids_and_reports_the_rest(tmp_path, capsys):
    ids = make_render_root(tmp_path / "src", 3, res=8)
    objects = _write_json(tmp_path / "object_list.json", [ids[0], "gone"])
    args = ["--src", tmp_path / "src", "--out", tmp_path / "o", "--object-list", objects, "--allow-missing"]
    code, stdout, err = run_cli(capsys, *args)
    assert (code, _errors(err)) == (0, [])
    assert _converted(tmp_path / "o") == [ids[0]]
    selection = _report(stdout)["selection"]
    assert selection["missing_from_source"] == 1 and selection["missing_examples"] == ["gone"]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--shard-size", "1XB"], ["--shard-size", "1XB"]),
        (["--val-fraction", "2"], ["--val-fraction", "[0, 1)"]),
        (["--views", "front,top"], ["--views", "front,top"]),
    ],
    ids=["shard_size", "val_fraction", "views"],
)
def test_bad_options_are_one_line_exit_2(tmp_path, capsys, args, words):
    make_render_root(tmp_path / "src", 1, res=8)
    try:
        code, _, err = run_cli(capsys, "--src", tmp_path / "src", "--out", tmp_path / "o", *args)
    except Exception as error:  # today's main raised these as tracebacks
        pytest.fail(f"{type(error).__name__} instead of one line: {error}")
    errors = _errors(err)
    assert code == 2 and len(errors) == 1, err
    assert all(word in errors[0] for word in words), errors[0]


def test_an_empty_or_missing_source_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for src, words in ((tmp_path / "empty", "no object folders"), (tmp_path / "absent", "not a directory")):
        code, _, err = run_cli(capsys, "--src", src, "--out", tmp_path / "o")
        assert code == 2 and len(_errors(err)) == 1 and words in _errors(err)[0], err
