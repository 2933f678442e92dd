"""Inspector: statistics match the manifest, the grid shows condition | colors | normals, CLI outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from fixtures_stream import make_shards
from PIL import Image

from datapipes.inspection import first_samples, resolve_target, sample_grid, shard_statistics
from datapipes.manifest import load_manifest

REPO = Path(__file__).resolve().parents[2]


def test_statistics_match_manifest(tmp_path):
    out = make_shards(tmp_path, 5, 2, res=16)
    manifest = load_manifest(out)
    stats = shard_statistics(resolve_target(str(out)))
    assert stats["samples"] == manifest["splits"]["train"]["samples"] == 5
    assert stats["bytes"] == manifest["splits"]["train"]["bytes"]
    assert stats["fields"]["rgb_front.png"]["count"] == 5 and stats["image_sizes"] == {"16x16": 5}
    assert abs(stats["decoded"]["normal_length_mean"]["mean"] - 1.0) < 0.02
    assert 0.1 < stats["decoded"]["alpha_coverage"]["mean"] < 0.9
    assert stats["errors"] == []
    folder_stats = shard_statistics(resolve_target(str(out / "train")))  # a plain folder of tars
    assert folder_stats["samples"] == 5


def test_grid_layout(tmp_path):
    out = make_shards(tmp_path, 3, 3, res=16)
    samples = first_samples(resolve_target(str(out)), 2)
    grid = np.asarray(sample_grid(samples, cell=16))
    assert grid.shape == (2 * 16, 13 * 16, 3)
    cond, front = grid[:16, :16], grid[:16, 16:32]
    np.testing.assert_array_equal(cond, front)  # the condition image is the front color view
    alpha = samples[0].color_rgba[0][..., 3:] / 255.0
    on_white = samples[0].color_rgba[0][..., :3] * alpha + 255 * (1 - alpha)
    assert np.abs(front.astype(float) - on_white).max() <= 1.0
    assert not np.array_equal(grid[:16, 16:32], grid[:16, 7 * 16 : 8 * 16])  # color vs normal of front


def test_cli_writes_grid_and_json(tmp_path):
    out = make_shards(tmp_path, 3, 2, res=16)
    cmd = [sys.executable, "launcher/inspect_shards.py", str(out), "--grid", str(tmp_path / "g.png")]
    cmd += ["--samples", "2", "--cell", "16", "--json", str(tmp_path / "s.json")]
    subprocess.run(
        cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True, capture_output=True
    )
    assert Image.open(tmp_path / "g.png").size == (13 * 16, 2 * 16)
    assert json.loads((tmp_path / "s.json").read_text())["samples"] == 3
