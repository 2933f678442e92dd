"""A finished run exports to a model folder that the pipeline and launcher/generate.py load; DeepSpeed's own
zero_to_fp32.py reads our checkpoints."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

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
    # The exported UNet carries the EMA weights of the last checkpoint.
    ema = load_file(finished_run / "checkpoints" / "step00000003" / "ema.safetensors")
    exported = load_file(model / "unet" / "diffusion_pytorch_model.safetensors")
    name = next(iter(ema))
    assert torch.equal(exported[name], ema[name])
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
