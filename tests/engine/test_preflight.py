"""Every mistake a run can be started with fails in one line (key + file), exit 2, before any expensive work.

Each case launches ``launcher/train.py`` for real (not ``--check``) on the demo config: failing before the
demo render is shown by the demo cache folder never being created.
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datapipes.convert import ConvertOptions, convert
from datapipes.synth.dataset import render_dataset
from tests.engine.runs import REPO, TINY, TRAIN, env

QUICK_S = 30  # a refused start imports the config stack only; the demo render + VAE fit take minutes


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """8 objects at 32², one per shard: 7 train shards, 1 val shard (the split is by object-id hash)."""
    root = tmp_path_factory.mktemp("preflight_shards")
    render_dataset(root / "renders", 8, res=32, seed=0, workers=1)
    convert(root / "renders", root / "shards", ConvertOptions(samples_per_shard=1, val_fraction=0.3))
    manifest = json.loads((root / "shards" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["shards"] == 7 and manifest["splits"]["val"]["samples"] == 1
    return root / "shards" / "manifest.json"


def _copy_manifest(manifest: Path, out: Path, keep) -> Path:
    """A manifest in ``out`` naming the original shards (absolute paths), only those for which ``keep``."""
    data = json.loads(manifest.read_text())
    data["shards"] = [{**s, "name": str(manifest.parent / s["name"])} for s in data["shards"] if keep(s)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps(data))
    return out / "manifest.json"


def launch(tmp_path: Path, *overrides: str, config: Path | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, TRAIN, *(["--config", str(config)] if config else [])]
    args += [*TINY, f"run.dir={tmp_path / 'run'}", f"data.demo_cache={tmp_path / 'cache'}", *overrides]
    return subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300, cwd=REPO)


def assert_refused(tmp_path: Path, proc, started: float, *words: str) -> str:
    """Exit 2, one stderr line holding every word, no traceback, nothing rendered or written, quickly."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for word in words:
        assert word in lines[0], f"{word!r} missing from: {lines[0]}"
    assert not (tmp_path / "cache").exists(), "the demo data was rendered before the check"
    assert not (tmp_path / "run" / "config.yaml").exists()
    assert time.monotonic() - started < QUICK_S
    return lines[0]


def unet_folder(tmp_path: Path, **config) -> Path:
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "MVUNet", "in_channels": 8, **config}))
    return folder


def test_missing_unet_folder_named_with_its_yaml_file(tmp_path):
    config = tmp_path / "my_run.yaml"
    config.write_text(f"model:\n  unet: {tmp_path / 'absent'}\n")
    started = time.monotonic()
    proc = launch(tmp_path, config=config)
    assert_refused(tmp_path, proc, started, "model.unet", str(config), "does not exist")


def test_unet_with_other_num_views_names_both_values_and_the_file(tmp_path):
    folder = unet_folder(tmp_path, num_views=6)
    started = time.monotonic()
    proc = launch(tmp_path, f"model.unet={folder}", "model.num_views=4", "data.views=[front,right,back,left]")
    line = assert_refused(tmp_path, proc, started, "model.num_views", str(folder / "config.json"))
    assert "num_views=6" in line and "4" in line


@pytest.mark.parametrize(
    ("config", "key", "word"),
    [
        ({"in_channels": 4}, "model.unet", "in_channels=4"),
        ({"cd_attention_last": True}, "model.cd_attention_last", "cd_attention_last=true"),
    ],
)
def test_unet_that_does_not_fit_the_run_config(tmp_path, config, key, word):
    folder = unet_folder(tmp_path, num_views=6, **config)
    started = time.monotonic()
    proc = launch(tmp_path, f"model.unet={folder}")
    assert_refused(tmp_path, proc, started, key, word, str(folder / "config.json"))


def test_pretrained_folder_without_the_diffusers_layout(tmp_path):
    (tmp_path / "sd" / "vae").mkdir(parents=True)
    started = time.monotonic()
    proc = launch(tmp_path, f"model.pretrained={tmp_path / 'sd'}")
    assert_refused(tmp_path, proc, started, "model.pretrained", "command line", "image_encoder/")


def test_pretrained_hub_id_not_in_the_offline_cache(tmp_path):
    started = time.monotonic()
    proc = launch(tmp_path, "model.pretrained=nobody-here/not-a-model")
    assert_refused(tmp_path, proc, started, "model.pretrained", "command line", "nobody-here/not-a-model")


def test_run_dir_that_cannot_be_created(tmp_path):
    (tmp_path / "a_file").write_text("x")
    started = time.monotonic()
    args = [f"run.dir={tmp_path / 'a_file' / 'run'}"]
    proc = launch(tmp_path, *args)
    assert_refused(tmp_path, proc, started, "run.dir", "command line", "is not a folder")


def test_missing_manifest(tmp_path):
    started = time.monotonic()
    proc = launch(tmp_path, f"data.shards={tmp_path / 'absent' / 'manifest.json'}")
    assert_refused(tmp_path, proc, started, "data.shards", "command line", "absent")


def test_missing_shard_listed_by_the_manifest(tmp_path, shards):
    copy = tmp_path / "copy"
    shutil.copytree(shards.parent, copy)
    gone = next((copy / "train").glob("shard-*.tar"))
    gone.unlink()
    started = time.monotonic()
    proc = launch(tmp_path, f"data.shards={copy / 'manifest.json'}")
    assert_refused(tmp_path, proc, started, "data.shards", "command line", str(gone), "does not exist")


def test_global_batch_that_micro_batch_and_world_size_do_not_divide(tmp_path, shards):
    started = time.monotonic()
    proc = launch(tmp_path, f"data.shards={shards}", "train.global_batch_size=3")  # micro-batch 2, 1 rank
    assert_refused(tmp_path, proc, started, "train.global_batch_size", "command line", "3", "= 2")


def test_empty_validation_split_with_periodic_validation(tmp_path, shards):
    no_val = _copy_manifest(shards, tmp_path / "no_val", keep=lambda s: s["split"] == "train")
    started = time.monotonic()
    proc = launch(tmp_path, f"data.shards={no_val}", "validation.every=5")
    assert_refused(tmp_path, proc, started, "data.shards", str(no_val), "validation split holds no objects")


def test_more_validation_objects_than_the_split_holds(tmp_path, shards):
    started = time.monotonic()
    proc = launch(tmp_path, f"data.shards={shards}", "validation.num_objects=3")
    assert_refused(tmp_path, proc, started, "validation.num_objects", str(shards), "holds 1 object")


def test_check_flag_runs_the_same_checks(tmp_path, shards):
    args = [sys.executable, TRAIN, "--check", *TINY, f"run.dir={tmp_path / 'run'}"]
    bad = subprocess.run(
        [*args, f"data.shards={shards}", "train.global_batch_size=3"],
        env=env(),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert bad.returncode == 2 and "train.global_batch_size" in bad.stderr and "Traceback" not in bad.stderr
    good = subprocess.run(  # more workers than shards: fine, they read slots of one global order
        [*args, f"data.shards={shards}", "data.workers=8"],
        env=env(),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert good.returncode == 0 and "config OK" in good.stdout, good.stderr


@pytest.mark.slow
def test_empty_validation_split_without_periodic_validation_trains_with_one_warning(tmp_path, shards):
    """validation.every=0 (only the final validation): an empty split turns validation off, with one warning."""
    no_val = _copy_manifest(shards, tmp_path / "no_val", keep=lambda s: s["split"] == "train")
    proc = launch(tmp_path, f"data.shards={no_val}", "validation.every=0", "run.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "validation is off" in line]
    assert len(warnings) == 1 and str(no_val) in warnings[0], proc.stderr[-3000:]
    assert not (tmp_path / "run" / "validation").exists()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 2
