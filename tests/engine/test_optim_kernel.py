"""The run's AdamW uses torch's fused kernel where there is one (CUDA, CPU), else the foreach one."""

import torch

from engine.distributed import init_distributed
from engine.optim import adamw_kernel
from engine.train import run_step
from tests.engine.fixed_batch import fixed_batch_run, global_batch, tiny_config


def test_the_run_optimizer_under_zero2_is_fused_adamw_and_steps():
    run = fixed_batch_run(tiny_config("train.micro_batch_size=1"), init_distributed())
    inner = run.engine.optimizer.optimizer  # ZeRO-2 wraps the torch optimizer that build_engine made
    assert isinstance(inner, torch.optim.AdamW)
    assert inner.defaults["fused"] is True, f"AdamW options {inner.defaults}"
    before = [p.detach().clone() for group in inner.param_groups for p in group["params"]]
    run_step(run, iter([global_batch(1)]), 0)  # the fused kernel accepts ZeRO's flat fp32 partitions
    after = [p.detach() for group in inner.param_groups for p in group["params"]]
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "the step changed no weight"


def test_devices_without_a_fused_kernel_get_foreach():
    assert adamw_kernel("cuda") == {"fused": True}
    assert adamw_kernel(torch.device("cpu")) == {"fused": True}
    assert adamw_kernel("meta") == {"foreach": True}
