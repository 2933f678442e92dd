"""Untrusted checkpoints: a pickle payload in any file of a real checkpoint never runs, through any entry point.

One tiny run is trained once; every case copies its run dir, plants a payload (an object whose ``__reduce__``
makes the unpickler call ``exec``, which writes a marker file) into one file, and goes through one entry point:
resume (``run.resume``), ``model.unet=<run dir>``, ``launcher/export.py`` and ``launcher/generate.py`` (on an
exported folder whose UNet weights are a pickle). Each must refuse in one line naming the file and the
payload's global (exec), exit 2, and never write the marker.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.engine.runs import REPO, env, launch, train

TAG = "step00000002"
FIRST = ["run.max_steps=2", "checkpoint.every=2"]


class Payload:
    """Unpickled with weights_only=False, this calls exec(), which writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('payload ran')",)


def _only(paths) -> Path:
    (path,) = list(paths)
    return path


def plant(tag_dir: Path, target: str, marker: Path) -> Path:
    """Add a payload to one file of the checkpoint; returns the file."""
    if target == "rank_file":  # our own per-rank state, as a pickle (the format gnn3d wrote before)
        for old in tag_dir.glob("gnn3d_rank00000.*"):
            old.unlink()
        path = tag_dir / "gnn3d_rank00000.pt"
        torch.save({"data_state": None, "rng": None, "payload": Payload(marker)}, path)
        return path
    path = _only(tag_dir.glob({"model_states": "*model_states.pt", "optimizer": "*optim_states.pt"}[target]))
    state = torch.load(path, map_location="cpu", weights_only=False)  # the fixture's own file: trusted
    state["payload"] = Payload(marker)
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("demo_cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache) -> Path:
    run_dir = tmp_path_factory.mktemp("untrusted") / "run"
    train(run_dir, cache, *FIRST, port=29721)
    return run_dir


def assert_refused(proc: subprocess.CompletedProcess, planted: Path, marker: Path) -> None:
    assert not marker.exists(), f"the payload in {planted.name} ran (marker written); exit {proc.returncode}"
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, f"exit {proc.returncode}, want 2:\n{proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert str(planted) in lines[-1] and "exec" in lines[-1] and "refused" in lines[-1], lines[-1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], env=env(), capture_output=True, text=True, timeout=300, cwd=REPO
    )


ENTRY_POINTS = ("resume", "model.unet", "export")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["model_states", "optimizer", "rank_file"])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_payload_in_a_checkpoint_file_is_refused(trained, cache, tmp_path, target, entry):
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(trained, run_dir)
    planted = plant(run_dir / "checkpoints" / TAG, target, marker)
    if entry == "resume":
        proc = launch(run_dir, cache, "run.max_steps=4", "checkpoint.every=2", port=29722)
    elif entry == "model.unet":
        proc = launch(tmp_path / "new", cache, f"model.unet={run_dir}", "run.max_steps=1", port=29723)
    else:
        proc = _cli("launcher/export.py", str(run_dir), "--out", str(tmp_path / "exported"))
    assert_refused(proc, planted, marker)


@pytest.mark.slow
def test_payload_in_an_exported_model_is_refused_by_generate(trained, tmp_path):
    model, marker = tmp_path / "model", tmp_path / "marker"
    proc = _cli("launcher/export.py", str(trained), "--out", str(model))
    assert proc.returncode == 0, proc.stderr[-2000:]
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    state = {**load_file(weights), "payload": Payload(marker)}
    weights.unlink()
    planted = model / "unet" / "diffusion_pytorch_model.bin"  # the loaders' pickle fallback
    torch.save(state, planted)
    image = REPO / "tests" / "faults" / "missing.png"  # never read: the model is refused first
    proc = _cli(
        "launcher/generate.py", "--model", str(model), "--image", str(image), "--out", str(tmp_path / "o")
    )
    assert_refused(proc, planted, marker)


def test_the_loader_itself_refuses_without_the_upfront_scan(tmp_path):
    # check_checkpoint_dir refuses first on every path above; load_allowed must refuse on its own too.
    from engine.safe_load import UntrustedCheckpointError, load_allowed

    marker, path = tmp_path / "marker", tmp_path / "state.pt"
    torch.save({"weight": torch.zeros(2), "payload": Payload(marker)}, path)
    with pytest.raises(UntrustedCheckpointError, match="exec") as refused:
        load_allowed(path)
    assert str(path) in str(refused.value) and not marker.exists()


def test_deepspeeds_own_loaders_refuse_inside_the_guard(tmp_path):
    # The up-front scan aside, DeepSpeed's checkpoint engine and zero_to_fp32 unpickle with weights_only=False;
    # inside only_allowed_types() their torch.load is the allow-listed one.
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.utils.zero_to_fp32 import parse_model_states

    from engine.safe_load import UntrustedCheckpointError, only_allowed_types

    marker, path = tmp_path / "marker", tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "payload": Payload(marker)}, path)
    for load in (
        lambda: TorchCheckpointEngine().load(str(path), map_location="cpu"),
        lambda: parse_model_states([path]),
    ):
        with only_allowed_types(), pytest.raises(UntrustedCheckpointError, match="exec"):
            load()
        assert not marker.exists()
    assert torch.load is not None and torch.load.__module__ == "torch.serialization"  # restored afterwards


def test_fp16_loss_scaler_is_allowed(tmp_path):
    # fp16 (CUDA only, so not in the CPU fixture) stores a DynamicLossScaler in every ZeRO partition.
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from engine.safe_load import check_allowed, load_allowed

    path = tmp_path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": DynamicLossScaler(2.0**16, 1000, 1, 2, False)}}, path)
    check_allowed(path)
    assert load_allowed(path)["optimizer_state_dict"]["loss_scaler"].cur_scale == 2.0**16
