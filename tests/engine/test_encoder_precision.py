"""The frozen VAE and CLIP run in the training precision; the bf16 step and validation both work with them."""

import math

import pytest
import torch

from engine.build import build_components, in_training_precision
from engine.distributed import init_distributed
from engine.train import run_step
from engine.validation import run_validation
from tests.engine.fixed_batch import fixed_batch_run, global_batch, tiny_config


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_encoders_take_the_training_precision(precision, dtype):
    cfg = tiny_config(f"train.precision={precision}")
    components = in_training_precision(build_components(cfg), cfg)
    assert {p.dtype for p in components.vae.parameters()} == {dtype}
    assert {p.dtype for p in components.image_encoder.parameters()} == {dtype}


def test_bf16_encoders_train_and_validate(tmp_path):
    cfg = tiny_config(
        "train.precision=bf16", "train.micro_batch_size=1", "validation.steps=2", "validation.num_objects=1"
    )
    run = fixed_batch_run(cfg, init_distributed())
    in_training_precision(run.components, cfg)  # in place, as engine.train.setup does: the objective's too
    assert run.objective.vae.dtype == torch.bfloat16
    totals = run_step(run, iter([global_batch(1)]), 0)
    assert math.isfinite(float(totals["loss"]))
    scores = run_validation(run.engine.module, run.components, None, global_batch(1), cfg, tmp_path / "v.png")
    assert (tmp_path / "v.png").is_file()
    assert all(math.isfinite(v) for v in scores.values()), scores
