"""Resume: a SIGKILLed run continues from its newest checkpoint bit-exact; a resume that could not is refused."""

import json
import shutil
import time

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from engine.distributed import free_port
from tests.engine.runs import (
    launch,
    losses_by_step,
    metrics_lines,
    train,
    train_and_kill,
    training_records_after,
)

STEPS = ["run.max_steps=8", "checkpoint.every=2", "checkpoint.keep_last=2"]


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_and_resume_is_bit_exact(tmp_path, demo_cache, nproc):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train(straight, demo_cache, *STEPS, nproc=nproc, port=free_port())
    train_and_kill(crashed, demo_cache, *STEPS, kill_after_step=5, nproc=nproc, port=free_port())
    before = losses_by_step(crashed)
    assert max(before) >= 5 and max(before) < 8, "the kill must land mid-run"
    checkpoint = (crashed / "checkpoints" / "latest").read_text()
    resume_step = int(checkpoint.removeprefix("step"))
    assert 4 <= resume_step < 8, checkpoint
    logged = resume_step  # the resume keeps one record per step up to its checkpoint and drops the rest
    out = train(crashed, demo_cache, *STEPS, nproc=nproc, port=free_port())

    # The second run started at the checkpoint and trained only the steps after it.
    assert f"starting at step {resume_step}" in out.stdout, out.stdout[-2000:]
    rerun = [r["step"] for r in training_records_after(crashed, logged)]
    assert rerun == list(range(resume_step + 1, 9)), f"resumed from {checkpoint}, then trained steps {rerun}"
    expected, resumed = losses_by_step(straight), losses_by_step(crashed)
    assert sorted(expected) == sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        for key in ("loss", "loss_normal", "loss_color"):
            assert resumed[step][key] == expected[step][key], f"step {step} {key} differs"
    # The newest checkpoint is complete and the pointer names it; no temporary save is left behind.
    ckpts = crashed / "checkpoints"
    assert (ckpts / "latest").read_text() == "step00000008"
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")]
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step00000006", "step00000008"]


# ------------------------------------------------------------------- resumes that cannot continue the run


FIRST = ["run.max_steps=2", "checkpoint.every=2"]
WRITTEN = ("config.yaml", "ds_config.json", "metrics.jsonl")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, demo_cache):
    """A 2-step run with its checkpoint at step 2."""
    run_dir = tmp_path_factory.mktemp("resume_checks") / "run"
    train(run_dir, demo_cache, *FIRST, port=29641)
    return run_dir


def _refused(finished, demo_cache, *overrides: str) -> str:
    """Launch a resume of ``finished`` that must be refused: exit 2, one line, quickly, nothing written."""
    before = {name: (finished / name).read_bytes() for name in WRITTEN}
    started = time.monotonic()
    proc = launch(finished, demo_cache, *FIRST, "run.max_steps=4", *overrides)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert time.monotonic() - started < 30, "refused before the process group and the checkpoint load"
    assert {name: (finished / name).read_bytes() for name in WRITTEN} == before
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "words"),
    [
        ("run.seed=7", ["run.seed", "command line", "7", "ran with 42"]),
        ("train.grad_accum=2", ["train.grad_accum", "from 2 to 4 objects", "train.grad_accum=1 keeps it"]),
        # micro-batch 1 on 1 rank: the global batch would halve; accum 2 keeps it (the elastic tests run that)
        (
            "train.micro_batch_size=1",
            ["train.grad_accum", "from 2 to 1 objects", "train.grad_accum=2 keeps it"],
        ),
        # the global order depends on these: refused before the model is built, not by the loader after it
        ("data.shuffle_buffer=8", ["data.shuffle_buffer", "8, but", "shuffle blocks of 4"]),
    ],
)
def test_resume_with_another_seed_global_batch_or_data_order_is_refused(finished, demo_cache, change, words):
    line = _refused(finished, demo_cache, change)
    checkpoint = finished / "checkpoints" / "step00000002"  # each line names the checkpoint it compared with
    for word in [str(checkpoint), *words]:
        assert word in line, f"{word!r} missing from: {line}"


@pytest.mark.slow
def test_resume_on_other_shards_is_refused_before_the_model_is_built(finished, demo_cache):
    """Other shards (here: the demo rendered with 20 objects) have another global order; the loader would only
    notice after the engine is built. The demo's render progress comes first; then one line, exit 2."""
    before = {name: (finished / name).read_bytes() for name in WRITTEN}
    proc = launch(finished, demo_cache, *FIRST, "run.max_steps=4", "data.demo_objects=20")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    for word in ("data.shards", "lists other shards", str(finished / "checkpoints" / "step00000002")):
        assert word in line, f"{word!r} missing from: {line}"
    assert {name: (finished / name).read_bytes() for name in WRITTEN} == before


@pytest.mark.slow
def test_resume_of_a_v01_data_position_is_refused(finished, demo_cache, tmp_path):
    """A v0.1 checkpoint's stream state (per-worker shard cursors) has no place in the global order."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    rank_file = run_dir / "checkpoints" / "step00000002" / "gnn3d_rank00000.safetensors"
    with safe_open(str(rank_file), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["gnn3d"])  # noqa: SIM118
    meta["data_state"] = {"format": "gnn3d-stream-state/1", "seed": 42, "positions": []}
    save_file(tensors, str(rank_file), metadata={"gnn3d": json.dumps(meta)})
    line = _refused(run_dir, demo_cache)
    for word in ("run.resume", "gnn3d-stream-state/1", "model.unet="):
        assert word in line, f"{word!r} missing from: {line}"


@pytest.mark.slow
def test_resume_with_another_grad_accum_when_allowed(finished, demo_cache, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    logged = metrics_lines(run_dir)
    out = train(
        run_dir, demo_cache, *FIRST, "run.max_steps=3", "train.grad_accum=2", "run.allow_batch_change=true"
    )
    warnings = [line for line in out.stderr.splitlines() if "run.allow_batch_change" in line]
    assert len(warnings) == 1 and "from 2 to 4 objects" in warnings[0], out.stderr[-2000:]
    assert "starting at step 2" in out.stdout
    # where the start-up time went, once, at the first step of this process (engine/startup.py)
    startup = [line for line in out.stdout.splitlines() if line.startswith("startup: ")]
    assert len(startup) == 1 and "imports" in startup[0] and "command → first step" in startup[0], startup
    assert [r["step"] for r in training_records_after(run_dir, logged)] == [3]
