"""train.compile: the compiled UNet trains like the eager UNet and compiles once; inductor on the CPU is refused.

The test compiles through dynamo + AOTAutograd (``aot_eager``): graph capture, guards (recompiles) and the
traced backward are what our model code can break. Inductor itself is refused on the CPU (``engine.compile``:
with torch 2.13.0+cpu its code gives wrong UNet gradients), and its cold C++ build of even the tiny UNet
takes minutes here; on CUDA it is what ``train.compile`` runs.
"""

import pytest
import torch
import torch._dynamo

from engine import compile as compile_module
from engine.build import build_unet
from engine.compile import compile_unet
from engine.config import ConfigError
from engine.config.loader import load_config

STEPS = 4
VIEWS = 2


def _losses(compiled: bool) -> tuple[list[float], list[int]]:
    """Losses of STEPS AdamW steps on fixed random inputs, and the dynamo graph count after each step."""
    cfg = load_config(
        None,
        [f"model.num_views={VIEWS}", "data.views=[front,right]", "data.resolution=32", "train.compile="
         + str(compiled).lower()],
    )  # fmt: skip
    unet = compile_unet(build_unet(cfg), cfg, torch.device("cpu"))
    # SGD, not AdamW: Adam's first update is lr*sign(g), which turns float noise in near-zero gradients into
    # full-size steps; SGD keeps a compiled-vs-eager difference proportional to the gradient difference.
    optimizer = torch.optim.SGD(unet.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    n = 2 * VIEWS  # one object, both domains
    x = torch.randn(n, 8, 4, 4, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    ctx = torch.randn(n, 1, cfg.model.cross_attention_dim, generator=g)
    cam = torch.randn(n, 10, generator=g)
    target = torch.randn(n, 4, 4, 4, generator=g)
    losses, graphs = [], []
    for _ in range(STEPS):
        loss = (unet(x, t, ctx, class_labels=cam).sample - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    return losses, graphs


def test_compiled_unet_matches_eager_and_compiles_once(monkeypatch):
    monkeypatch.setattr(compile_module, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    eager, no_graphs = _losses(compiled=False)
    assert no_graphs == [0] * STEPS
    compiled, graphs = _losses(compiled=True)
    assert graphs[0] > 0, "train.compile=true did not compile the UNet"
    assert graphs[1:] == [graphs[1]] * (STEPS - 1), f"recompiled after step 2: graphs per step {graphs}"
    # fp32, aot_eager: the same aten kernels run, only the backward is traced ahead; observed gap 0.0 (equal
    # bits). rel 1e-6 (~10 float32 ulps) leaves room for a decomposition reordering a sum in another torch;
    # a wrong or missing gradient moves the SGD step-2 loss by ~1e-2 (inductor on this CPU: 2.7e-2).
    for step, (a, b) in enumerate(zip(eager, compiled, strict=True)):
        assert b == pytest.approx(a, rel=1e-6), f"step {step + 1}: compiled loss {b} vs eager {a}"
    assert len(set(eager)) == STEPS, "the losses must change (training happened)"


def test_inductor_on_the_cpu_is_refused_naming_the_key():
    cfg = load_config(None, ["train.compile=true"])
    unet = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match=r"command line: train.compile: inductor on the CPU computes wrong"):
        compile_unet(unet, cfg, torch.device("cpu"))
    assert not hasattr(unet, "_compiled_call_impl") or unet._compiled_call_impl is None
