"""Lost data made visible: real damaged shards (truncated tars, corrupt image bytes), a shard deleted while a
run reads, a shard missing at start -- counted exactly, logged, reported, limited.

Shards: 16 disc objects at 32², 2 per shard (6 train shards of 2 samples, 2 val shards), so a lost shard is
2 samples and the manifest lets the reader count them exactly.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from datapipes.shards import build_train_loader
from datapipes.transform import TransformOptions
from tests.datapipes.fixtures_stream import corrupt_member, make_shards
from tests.engine import runs

EXIT_DATA_LOSS = (
    65  # engine.data_loss.EXIT_DATA_LOSS (sysexits EX_DATAERR), spelt out: a test of the contract
)
TRAIN_SAMPLES, PER_SHARD = 12, 2
OPTS = TransformOptions(resolution=16, num_views=6, background="white", clip_size=16)


@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("lost_data"), 16, PER_SHARD, res=32, val_fraction=0.2)


@pytest.fixture
def shards(clean_shards, tmp_path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(clean_shards, tmp_path / "shards"))


def train_shard(shards: Path, index: int) -> Path:
    return shards / "train" / f"shard-{index:06d}.tar"


def truncate(path: Path, keep: float) -> None:
    """Cut a tar file to a share of its bytes (a partial copy, a full disk at conversion time)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def report(run_dir: Path) -> dict:
    return json.loads((run_dir / "data_report.json").read_text())


def last_record_with(run_dir: Path, key: str) -> dict:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if key in record][-1]


def launch_on(shards: Path, run_dir: Path, *overrides: str, **options) -> subprocess.CompletedProcess:
    return runs.launch(
        run_dir,
        run_dir.parent / "cache",
        f"data.shards={shards}",
        "checkpoint.every=1000",
        *overrides,
        **options,
    )


def assert_counts_agree(run_dir: Path) -> dict:
    """metrics.jsonl's last counts == the report's totals == the sum of its per-skip records."""
    found, last = report(run_dir), last_record_with(run_dir, "data/bad_samples")
    skipped = found["skipped"]
    assert last["data/bad_samples"] == found["bad_samples"] == sum(r["lost"] for r in skipped)
    assert last["data/bad_shards"] == found["bad_shards"] == sum(r["kind"] == "shard" for r in skipped)
    assert found["samples_read"] == found["good_samples"] + found["bad_samples"]
    return found


# --------------------------------------------------------------------------------------------- at start


def test_manifest_shard_missing_at_start_is_refused_in_one_line(shards, tmp_path):
    train_shard(shards, 3).unlink()
    proc = launch_on(shards, tmp_path / "run", "run.max_steps=2", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"shard {train_shard(shards, 3)}" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before any training


# --------------------------------------------------------------------------------------------- loader


def test_loader_counts_every_lost_sample_exactly(shards):
    """Real worker processes, a truncated tar, a corrupt image and a shard deleted mid-iteration: after 3
    data epochs good + bad == 3 x 12 exactly, and every skip is listed with its shard, object and reason."""
    truncate(train_shard(shards, 1), 0.3)  # 2 samples lost: the cut one and the one after it
    bad_object = corrupt_member(train_shard(shards, 2), "normals_left.png")
    deleted = train_shard(shards, 4)
    loader = build_train_loader(
        str(shards), batch_size=2, rank=0, world_size=1, seed=0, transform=OPTS, workers=2,
        shuffle_buffer=2, max_epochs=3,
    )  # fmt: skip
    seen = []
    with pytest.warns(UserWarning, match="skipping bad sample"):
        for index, batch in enumerate(loader):
            seen += batch["object_id"]
            if index == 1:
                deleted.unlink()  # the workers have read ahead: the first epoch may or may not miss it
    # a window whose slots are all bad (here: a whole lost shard) carries one filler sample
    assert loader.samples + loader.fillers == len(seen) and loader.fillers > 0
    assert loader.samples + loader.bad_samples == 3 * TRAIN_SAMPLES
    by_shard: dict[str, list[dict]] = {}
    for record in loader.skipped:
        by_shard.setdefault(Path(record["shard"]).name, []).append(record)
    assert sum(r["lost"] for r in loader.skipped) == loader.bad_samples
    assert loader.bad_shards == sum(r["kind"] == "shard" for r in loader.skipped)
    for epoch in range(3):  # tarfile ends a tar cut at a header silently; the manifest count exposes it
        truncated = [r for r in by_shard["shard-000001.tar"] if r["epoch"] == epoch]
        assert sum(r["lost"] for r in truncated) == 2 and [r["kind"] for r in truncated].count("shard") == 1
    corrupt = by_shard["shard-000002.tar"]
    assert [(r["kind"], r["object"], r["key"], r["lost"]) for r in corrupt] == [
        ("sample", bad_object, "normals_left.png", 1)
    ] * 3
    gone = by_shard["shard-000004.tar"]
    assert 2 in {r["epoch"] for r in gone} and all(r["lost"] == 2 and r["exact"] for r in gone)
    assert all("No such file" in r["reason"] for r in gone)


# --------------------------------------------------------------------------------------------- training runs


@pytest.mark.slow
def test_shard_deleted_mid_run_is_counted_logged_and_reported(shards, tmp_path):
    run_dir, victim = tmp_path / "run", train_shard(shards, 3)
    args = [
        *runs.command(1, 0), *runs.TINY, f"run.dir={run_dir}", f"data.demo_cache={tmp_path / 'cache'}",
        f"data.shards={shards}", "run.max_steps=24", "checkpoint.every=1000", "data.max_bad_fraction=0.5",
    ]  # fmt: skip
    proc = subprocess.Popen(
        args, env=runs.env(), cwd=runs.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240
    while not any(step >= 2 for step in runs.losses_by_step(run_dir)) and proc.poll() is None:
        assert time.time() < deadline, "the run never reached step 2"
        time.sleep(0.05)
    victim.unlink()
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    found = assert_counts_agree(run_dir)
    assert found["samples_read"] == 24 * 2  # every slot of every step counted: a bad slot shortens its batch
    assert found["bad_shards"] >= 1
    for record in found["skipped"]:  # one record per batch: "shard" holds the failure, "lost" the rest
        expected = {"shard": str(victim), "exact": True}
        assert {key: record[key] for key in expected} == expected and record["kind"] in ("shard", "lost")
        assert "No such file" in record["reason"]
    epochs = sorted({r["epoch"] for r in found["skipped"]})
    assert epochs == list(range(epochs[0], epochs[0] + len(epochs)))  # in every data epoch since
    for epoch in epochs:  # at most its 2 samples and one failure per epoch
        records = [r for r in found["skipped"] if r["epoch"] == epoch]
        assert sum(r["lost"] for r in records) <= 2 and [r["kind"] for r in records].count("shard") <= 1
    assert "bad=" in err  # on the progress bar
    assert f"data: {found['bad_samples']} of {found['samples_read']} samples read were skipped" in out + err
    assert str(victim) in out + err  # the end-of-run summary names the shard


@pytest.mark.multiproc
@pytest.mark.slow
def test_damaged_shards_are_summed_over_two_ranks(shards, tmp_path):
    """A truncated tar and a corrupt image under `skip`, 2 ranks: each rank counts its own, the logs and the
    report hold the sum, and every slot of every step is counted once (good or bad)."""
    truncate(train_shard(shards, 0), 0.7)  # inside its second sample: 1 sample lost per data epoch
    bad_object = corrupt_member(train_shard(shards, 5), "rgb_front.png")
    run_dir = tmp_path / "run"
    proc = launch_on(shards, run_dir, "run.max_steps=12", "data.max_bad_fraction=0.5", nproc=2, port=29661)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = assert_counts_agree(run_dir)
    assert found["samples_read"] == 12 * 2 * 2  # steps x micro-batch x ranks: every slot counted once
    kinds = {
        (Path(r["shard"]).name, r["kind"], r["object"] if r["kind"] == "sample" else "", r["lost"])
        for r in found["skipped"]
    }
    assert kinds <= {("shard-000000.tar", "shard", "", 1), ("shard-000005.tar", "sample", bad_object, 1)}
    assert found["bad_samples"] > 0 and {r["rank"] for r in found["skipped"]} <= {0, 1}


@pytest.mark.slow
def test_bad_fraction_above_the_limit_stops_the_run_in_one_line(shards, tmp_path):
    """Half the shards unreadable: instead of training on what is left, the run stops (default limit)."""
    for index in (0, 2, 4):
        truncate(train_shard(shards, index), 0.1)
    run_dir = tmp_path / "run"
    proc = launch_on(shards, run_dir, "run.max_steps=40")
    assert proc.returncode == EXIT_DATA_LOSS, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "data error" in line]
    assert (
        len(lines) == 1 and "above data.max_bad_fraction=0.05" in lines[0] and "data_report.json" in lines[0]
    )
    assert "Traceback" not in proc.stderr
    found = assert_counts_agree(run_dir)
    assert found["stopped"] and found["bad_fraction"] > 0.05
    assert {Path(r["shard"]).name for r in found["skipped"]} <= {f"shard-00000{i}.tar" for i in (0, 2, 4)}
    assert max(runs.losses_by_step(run_dir)) < 40


@pytest.mark.slow
def test_raise_policy_stops_naming_shard_object_and_member(shards, tmp_path):
    damaged = train_shard(shards, 2)
    bad_object = corrupt_member(damaged, "normals_left.png")
    proc = launch_on(shards, tmp_path / "run", "run.max_steps=20", "data.bad_sample=raise")
    assert proc.returncode == EXIT_DATA_LOSS, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = next(line for line in proc.stderr.splitlines() if "data error" in line)
    assert str(damaged) in line and bad_object in line and "normals_left.png" in line
