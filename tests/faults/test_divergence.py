"""Divergence: a non-finite loss or gradient skips the step (no optimizer, EMA, LR or step advance) and is
counted; ``train.max_bad_steps`` bad steps in a row stop the run (exit 3) naming the last good checkpoint,
which is never pruned; a checkpoint is never written from non-finite weights.

The faults are real: ``train.lr=1e6`` (every loss after step 1 is NaN), a NaN in one rank's diffusion noise,
a NaN in a weight (``tests/faults/nan_injection.py``), a NaN loss in a real DeepSpeed engine per ZeRO config.
"""

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.config import ConfigError, load_config, load_ds_config, resolve_ds_config
from engine.distributed import init_distributed
from tests.engine.runs import REPO, TINY, command, env, launch, losses_by_step

EXIT_DIVERGED = 3  # engine.divergence.EXIT_DIVERGED, spelled out so the test also runs against older trees
DS_DIR = REPO / "ds_configs"


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def training_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in records(run_dir) if "loss" in r]


def step_dirs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())


def stop_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "training diverged" in line]


def assert_finite_checkpoint(tag_dir: Path, *, ema_updates: int) -> None:
    """The module weights DeepSpeed saved and the EMA are finite; the EMA saw ``ema_updates`` steps."""
    model = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    weights = model["module"]
    assert weights and all(torch.isfinite(w).all() for w in weights.values()), (
        f"{tag_dir}: non-finite weights"
    )
    with safe_open(str(tag_dir / "ema.safetensors"), "pt") as f:
        assert int(f.metadata()["updates"]) == ema_updates, f"{tag_dir}: EMA updates {f.metadata()}"
    ema = load_file(tag_dir / "ema.safetensors")
    assert ema and all(torch.isfinite(w).all() for w in ema.values()), f"{tag_dir}: non-finite EMA"


def launch_injected(
    run_dir: Path, cache: Path, inject: str, *overrides: str, nproc: int = 1, port: int = 29751
):
    """``launch`` through tests/faults/nan_injection.py, with GNN3D_INJECT_NAN=``inject``."""
    args = [*command(nproc, port)[:-1], "-m", "tests.faults.nan_injection"]
    args += [*TINY, f"run.dir={run_dir}", f"data.demo_cache={cache}", *overrides]
    return subprocess.run(
        args, env={**env(), "GNN3D_INJECT_NAN": inject}, capture_output=True, text=True, timeout=300, cwd=REPO
    )


# ------------------------------------------------------------------------------------ whole runs (real faults


@pytest.mark.slow
def test_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, demo_cache):
    run_dir = tmp_path / "run"
    overrides = ["train.lr=1e6", "run.max_steps=20", "checkpoint.every=1", "checkpoint.keep_last=1"]
    proc = launch(run_dir, demo_cache, *overrides, port=29741)  # train.max_bad_steps: the default, 5
    output = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_DIVERGED, f"exit {proc.returncode}:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    last_good = run_dir / "checkpoints" / "step00000001"
    (line,) = stop_lines(proc)
    assert f"{last_good} (step 1)" in line and "train.max_bad_steps=5" in line, line
    # The last good checkpoint is still there (keep_last=1 pruned nothing), complete, finite, and `latest`.
    assert (
        step_dirs(run_dir) == ["step00000001"]
        and (run_dir / "checkpoints" / "latest").read_text() == last_good.name
    )
    assert_finite_checkpoint(last_good, ema_updates=1)
    # The step counter and the LR stayed at step 1; the five skipped steps are in metrics.jsonl.
    assert training_steps(run_dir) == [1], records(run_dir)
    first, last = records(run_dir)[0], records(run_dir)[-1]
    assert last["step"] == 1 and last["skipped_steps"] == 5 and last["lr"] == first["lr"], last
    assert not (run_dir / "validation").exists(), "a diverged run must not validate"


@pytest.mark.slow
@pytest.mark.multiproc
def test_one_nan_step_on_one_rank_is_skipped_and_training_recovers(tmp_path, demo_cache):
    run_dir = tmp_path / "run"
    overrides = ["run.max_steps=6", "checkpoint.every=3", "train.warmup_steps=4"]
    proc = launch_injected(run_dir, demo_cache, "batch:3:1", *overrides, nproc=2, port=29752)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{output[-3000:]}"
    # Every step trained exactly once with a finite loss: the NaN try of step 3 was skipped on both ranks.
    assert training_steps(run_dir) == [1, 2, 3, 4, 5, 6], training_steps(run_dir)
    by_step = losses_by_step(run_dir)
    assert not [s for s, r in by_step.items() if "nonfinite" in r], [r for r in by_step.values()]
    assert [by_step[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert len([line for line in output.splitlines() if "step 3: skipped" in line]) == 1, output[-3000:]
    # The LR schedule did not advance on the skip: warmup (s+1)/4 of step s, then flat.
    lr = {s: by_step[s]["lr"] / by_step[1]["lr"] for s in range(1, 7)}
    assert lr == pytest.approx({1: 1.0, 2: 1.5, 3: 2.0, 4: 2.0, 5: 2.0, 6: 2.0}), lr
    # The EMA saw the 6 applied steps, not 7; the ranks' weights agree (the run's own check logs 1.0).
    assert_finite_checkpoint(run_dir / "checkpoints" / "step00000006", ema_updates=6)
    assert records(run_dir)[-1].get("replicas_in_sync") == 1.0


@pytest.mark.slow
def test_nonfinite_weights_are_never_saved(tmp_path, demo_cache):
    run_dir = tmp_path / "run"
    overrides = ["run.max_steps=6", "checkpoint.every=1", "checkpoint.keep_last=1"]
    proc = launch_injected(run_dir, demo_cache, "weights:3", *overrides, port=29753)
    output = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_DIVERGED, f"exit {proc.returncode}:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    last_good = run_dir / "checkpoints" / "step00000002"
    (line,) = stop_lines(proc)
    assert "non-finite after step 3" in line and f"{last_good} (step 2)" in line, line
    assert step_dirs(run_dir) == ["step00000002"], (
        "the NaN weights of step 3 were saved, or step 2 was pruned"
    )
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000002"
    assert_finite_checkpoint(last_good, ema_updates=2)


# ------------------------------------------------------- the skip itself, in a real engine per ZeRO config


def _engine(ds_name: str, precision: str, grad_accum: int):
    import deepspeed

    from engine.divergence import check_skips_nonfinite_gradients

    init_distributed()
    cfg = load_config(
        None, ["train.micro_batch_size=2", f"train.grad_accum={grad_accum}", f"train.precision={precision}"]
    )
    path = DS_DIR / ds_name
    ds = resolve_ds_config(load_ds_config(path), cfg, world_size=1, source=str(path), cuda=False)
    ds["zero_force_ds_cpu_optimizer"] = False  # offload on CPU: a torch optimizer, no C++ build
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (step + 1) / 10)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    check_skips_nonfinite_gradients(engine, source=str(path))
    return engine


def _one_step(engine, grad_accum: int, fault: str = "", bad_micro_step: int = 0) -> bool:
    """One optimizer step as engine.train.run_step takes it; ``bad_micro_step`` gets the fault: a NaN input
    (NaN through the graph) or an infinite loss whose gradient is finite (a loss reduction that overflowed)."""
    from engine.divergence import finite_on_every_rank, poison

    for micro_step in range(grad_accum):
        x = torch.randn(2, 8).to(next(engine.module.parameters()).dtype)
        if fault == "nan_input" and micro_step == bad_micro_step:
            x[0, 0] = math.nan
        loss = engine(x).float().pow(2).mean()
        if fault == "inf_loss" and micro_step == bad_micro_step:
            loss = loss + math.inf
        engine.backward(loss if finite_on_every_rank(loss) else poison(loss))
        engine.step()
    return engine.was_step_applied()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("ds_name", ["zero1.json", "zero2.json", "zero2_offload.json"])
@pytest.mark.parametrize("fault,bad_micro_step", [("nan_input", 0), ("inf_loss", 1)])
def test_a_nonfinite_micro_step_skips_the_whole_update(ds_name, precision, fault, bad_micro_step):
    engine = _engine(ds_name, precision, grad_accum=2)
    assert _one_step(engine, 2)
    weights = [p.detach().clone() for p in engine.module.parameters()]
    lr, state = (
        engine.get_lr(),
        str(engine.optimizer.state_dict()["base_optimizer_state"]["state"][0]["step"]),
    )
    assert not _one_step(engine, 2, fault, bad_micro_step), "the non-finite step was applied"
    assert all(torch.equal(w, p) for w, p in zip(weights, engine.module.parameters())), "weights moved"
    assert engine.get_lr() == lr, "the LR scheduler stepped on a skipped step"
    assert str(engine.optimizer.state_dict()["base_optimizer_state"]["state"][0]["step"]) == state
    # The discarded gradient leaves nothing behind: the next clean step applies, with finite weights.
    assert _one_step(engine, 2)
    assert all(torch.isfinite(p).all() for p in engine.module.parameters())
    assert engine.get_lr() != lr


def test_a_deepspeed_setup_that_would_apply_nan_gradients_is_refused(tmp_path):
    import deepspeed

    from engine.divergence import check_skips_nonfinite_gradients

    init_distributed()
    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps(
            {
                **load_ds_config(DS_DIR / "zero2.json"),
                "bf16": {"enabled": "auto", "check_grad_overflow": False},
            }
        )
    )
    cfg = load_config(None, ["train.micro_batch_size=2", "train.precision=bf16"])
    ds = resolve_ds_config(load_ds_config(path), cfg, world_size=1, source=str(path), cuda=False)
    model = torch.nn.Linear(8, 1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=ds)
    with pytest.raises(ConfigError, match=rf"{path}: bf16\.check_grad_overflow"):
        check_skips_nonfinite_gradients(engine, source=str(path))
