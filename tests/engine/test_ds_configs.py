"""Every shipped DeepSpeed JSON initialises a real DeepSpeed engine on CPU, so a typo fails CI."""

from pathlib import Path

import pytest
import torch

from engine.config import load_config, load_ds_config, resolve_ds_config
from engine.distributed import init_distributed

DS_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
DS_FILES = sorted(DS_DIR.glob("*.json"))


def test_all_expected_files_ship():
    names = {p.stem for p in DS_FILES}
    assert {"zero1", "zero2", "zero2_offload", "zero3"} <= names


@pytest.mark.parametrize("path", DS_FILES, ids=lambda p: p.stem)
def test_initialises_and_steps(path):
    import deepspeed

    info = init_distributed()
    cfg = load_config(None, ["train.micro_batch_size=2", "train.grad_accum=2"])
    ds = resolve_ds_config(
        load_ds_config(path), cfg, world_size=info.world_size, source=str(path), cuda=False
    )
    if ds["zero_optimization"].get("offload_optimizer"):
        # On GPU machines the engine uses DeepSpeedCPUAdam; here a torch optimizer avoids its C++ build.
        ds["zero_force_ds_cpu_optimizer"] = False
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    assert engine.zero_optimization_stage() == ds["zero_optimization"]["stage"]
    assert engine.gradient_accumulation_steps() == 2
    x, y = torch.randn(2, 8), torch.randn(2, 1)
    losses = []
    for _ in range(6):  # 3 optimizer steps of 2 micro-steps
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert engine.global_steps == 3
    assert losses[-1] < losses[0]
