"""A finished run exports to a model folder that the pipeline and launcher/generate.py load; DeepSpeed's own
zero_to_fp32.py reads our checkpoints."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from engine.sources import run_weights
from tests.engine.pretrained_folder import write_tiny_pretrained
from tests.engine.runs import REPO, env, train


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, demo_cache):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    train(run_dir, demo_cache, "run.max_steps=3", "checkpoint.every=3", "train.ema_decay=0.9")
    return run_dir


def _run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *args], env=env(), capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_export_then_generate(finished_run, tmp_path):
    from modeling.pipeline import MVDiffusionPipeline

    model = tmp_path / "model"
    _run("launcher/export.py", str(finished_run), "--out", str(model))
    for sub in ("unet", "vae", "image_encoder", "scheduler", "feature_extractor"):
        assert (model / sub).is_dir(), sub
    # Every exported UNet tensor is the last checkpoint's EMA weight, or its fp32 master weight where the
    # EMA holds none (frozen parameters), and nothing else is exported.
    ema = load_file(finished_run / "checkpoints" / "step00000003" / "ema.safetensors")
    _, master, _ = run_weights(finished_run, use_ema=False)
    exported = load_file(model / "unet" / "diffusion_pytorch_model.safetensors")
    assert exported.keys() == master.keys() and ema and ema.keys() <= exported.keys()
    for key, tensor in exported.items():
        assert torch.equal(tensor, ema[key].float() if key in ema else master[key]), key
    assert any(not torch.equal(ema[k].float(), master[k]) for k in ema)  # the EMA really differs
    pipe = MVDiffusionPipeline.from_pretrained(model)
    assert pipe.unet.config["num_views"] == 6

    image = tmp_path / "in.png"
    rgba = np.zeros((48, 48, 4), np.uint8)
    rgba[8:40, 12:36] = (200, 40, 40, 255)
    Image.fromarray(rgba).save(image)
    out = tmp_path / "gen"
    args = [
        "--model",
        str(model),
        "--image",
        str(image),
        "--out",
        str(out),
        "--steps",
        "2",
        "--resolution",
        "32",
    ]
    _run("launcher/generate.py", *args)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len([p for p in pngs if p.startswith(("normal_", "color_"))]) == 12
    assert "grid.png" in pngs


@pytest.mark.slow
def test_deepspeed_zero_to_fp32_reads_our_checkpoint(finished_run, tmp_path):
    ckpts = finished_run / "checkpoints"
    _run(str(ckpts / "zero_to_fp32.py"), str(ckpts), str(tmp_path / "fp32"), "--safe_serialization")
    files = list((tmp_path / "fp32").glob("*.safetensors"))
    assert files, "zero_to_fp32 wrote nothing"
    weights = {}
    for f in files:
        weights.update(load_file(f))
    raw = tmp_path / "raw"
    _run("launcher/export.py", str(finished_run), "--out", str(raw), "--no-ema")
    exported = load_file(raw / "unet" / "diffusion_pytorch_model.safetensors")
    assert weights.keys() == exported.keys()
    assert all(torch.equal(weights[k], exported[k]) for k in weights)
    assert all(v.dtype == torch.float32 for v in weights.values())


@pytest.mark.slow
def test_export_keeps_the_runs_prediction_type(tmp_path, demo_cache):
    # The run overrides its pretrained folder's scheduler (epsilon) with v-prediction; the export must not
    # reload the folder's scheduler and silently turn the model back into an epsilon model.
    from engine.build import build_components
    from engine.export import export_run

    pretrained = write_tiny_pretrained(tmp_path / "pretrained")
    assert (
        json.loads((pretrained / "scheduler" / "scheduler_config.json").read_text())["prediction_type"]
        == "epsilon"
    )
    run_dir = tmp_path / "run"
    train(run_dir, demo_cache, f"model.pretrained={pretrained}", "train.prediction_type=v_prediction",
          "run.max_steps=1", "checkpoint.every=1")  # fmt: skip
    export_run(run_dir, tmp_path / "model")
    exported = json.loads((tmp_path / "model" / "scheduler" / "scheduler_config.json").read_text())
    cfg, _, _ = run_weights(run_dir)
    trained_with = json.loads(build_components(cfg).noise_scheduler.to_json_string())  # what setup() built
    assert exported["prediction_type"] == "v_prediction"
    assert exported == trained_with
